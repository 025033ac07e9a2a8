"""What several test modules need: a fresh project repository, a flow run the way a user starts
it, a free port, a Prefect server, and a bento served by ``bentoml serve`` until the test is
done with it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from components.overrides import apply_overrides
from tests.conftest import REPO_ROOT

# What a clone of the project holds that the pipeline needs (not tests, docs or state).
PROJECT_FILES = (
    "components", "flows", "deploy", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore",
)  # fmt: skip
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
# Two cheap compressed variants (no fine-tuning, no student) for the tests of something else
# than compression: the variants themselves are tests/test_compress.py's.
QUICK_VARIANTS = {"int8": ["quantize_static"], "int8_dynamic": ["quantize_dynamic"]}
BENTOML = [sys.executable, "-m", "bentoml"]


# -- a project repository and its flow ------------------------------------------------------


def flatten(overrides: dict) -> list[str]:
    """``{section: {key: value}}`` as ``section.key=<json>`` overrides."""
    return [
        f"{section}.{key}={json.dumps(value)}"
        for section, values in overrides.items()
        for key, value in values.items()
    ]


def project_repo(
    root: Path,
    remote: Path | None,
    write_data: Callable[[Path], None],
    overrides: list[str],
    edit_params: Callable[[Path], None] | None = None,
    env: dict | None = None,
) -> Path:
    """A fresh clone-like repository at ``root``: our code, git, DVC with the project's own
    .dvc/config, the data ``write_data`` puts into data/external/, params.yaml with
    ``overrides``; committed once.

    ``remote`` redirects the default DVC remote there (in .dvc/config.local, which git keeps
    out); ``None`` keeps the project's own (under ``$HOME``). A ``root`` that is already a git
    clone stays one: its remotes are kept."""
    for name in PROJECT_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            # Not the git-ignored lock and last-written copy of this checkout's champion record
            # (components/champion.py): a clone has none, and the copy would bring it back.
            shutil.copytree(
                src, root / name, ignore=shutil.ignore_patterns("__pycache__", ".champion.json.*")
            )
        elif src.is_file():
            shutil.copy(src, root / name)
    # A fresh start: the repository's own champion record (if any) is another data set's.
    (root / "deploy" / "champion.json").unlink(missing_ok=True)
    (root / "data" / "external").mkdir(parents=True)
    write_data(root / "data" / "external")
    if not (root / ".git").exists():
        subprocess.run([*GIT, "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    shutil.copy(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO_ROOT / ".dvc" / "plots", root / ".dvc" / "plots")  # dvc.yaml's templates
    if remote is not None:
        (root / ".dvc" / "config.local").write_text(f"['remote \"local\"']\n    url = {remote}\n")
    apply_overrides(overrides, root / "params.yaml")
    if edit_params is not None:
        edit_params(root / "params.yaml")
    subprocess.run([*GIT, "add", "-A"], cwd=root, check=True, env=env)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=root, check=True, env=env)
    return root


def only_variants(params_file: Path, variants: dict = QUICK_VARIANTS) -> None:
    """Make ``compress.variants`` exactly ``variants`` (a whole mapping: no --set override)."""
    params = yaml.safe_load(params_file.read_text())
    params["compress"]["variants"] = variants
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def run_flow(root: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Start the flow the way a user does: `python -m flows.pipeline --set ...`."""
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# -- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrated_prefect_database(folder: Path) -> Path:
    """An empty Prefect database with every migration applied, made once in ``folder`` (under a
    file lock: the test processes of one `make test` share it) and copied by each server.

    A server's first start on a new SQLite file runs Prefect's whole migration history, ~6 s of
    CPU; on a migrated copy it starts in ~3 s."""
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    database = folder / "prefect.db"
    with FileLock(str(folder / "prefect.db.lock")):
        if not database.is_file():
            building = folder / "building.db"
            building.unlink(missing_ok=True)
            env = {
                **os.environ,
                "PREFECT_HOME": str(folder / "home"),
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{building}",
            }
            env.pop("PREFECT_API_URL", None)
            subprocess.run(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                env=env, check=True, capture_output=True, timeout=300,
            )  # fmt: skip
            building.rename(database)
    return database


# The background services a server that only records flow runs does not need: schedules, late
# and paused runs, worker health, automations, vacuum. Each wakes every 5-20 s; together they
# cost an idle server ~1.6 s of CPU a minute, and the flows' task states (events, the task run
# recorder) need none of them.
RECORDING_ONLY = {
    f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
    for name in ("SCHEDULER", "LATE_RUNS", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP",
                 "CLEANUP_RECONCILER", "FOREMAN", "REPOSSESSOR", "TRIGGERS")
} | {"PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "[]"}  # fmt: skip


@contextlib.contextmanager
def serving_prefect(
    root: Path,
    env: dict,
    seconds: float = 90,
    database: Path | None = None,
    services: dict | None = None,
) -> Iterator[str]:
    """A real Prefect server on a free loopback port, its SQLite database and log in ``root``;
    yields its API URL; stopped (its whole process group) on the way out.

    ``database``: a migrated empty database to start from (:func:`migrated_prefect_database`);
    ``services``: settings that switch background services off (:data:`RECORDING_ONLY`)."""
    port = free_port()
    if database is not None:
        shutil.copy(database, root / "prefect.db")
    server_env = {
        **env,
        **(services or {}),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",
    }
    server_env.pop("PREFECT_API_URL", None)  # it is the API; it asks no other one
    log_file = root / "server.log"
    with log_file.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
            + ["--port", str(port)],
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.monotonic() + seconds
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, log_file.read_text()[-3000:]
                assert time.monotonic() < deadline, f"prefect server did not start in {seconds} s"
                time.sleep(0.3)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)


def drain_prefect_logs() -> None:
    """Send the logs a flow run in this process left queued, while its server still listens.
    Left queued, Prefect sends them when the process exits, after the session's server has
    stopped, and retries for ~75 s before it gives up ("Error logging to API")."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)


def wait_ready(
    base: str, server: subprocess.Popen, seconds: float = 90, log: Path | None = None
) -> None:
    """Until ``base``/readyz answers 200; fail (with the end of ``log``) if the server exits or
    takes too long."""

    def tail() -> str:
        return f"; its log ends:\n{log.read_text(errors='replace')[-3000:]}" if log else ""

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            pytest.fail(f"the server for {base} exited with {server.returncode}{tail()}")
        time.sleep(0.3)
    pytest.fail(f"{base} did not become ready in {seconds:.0f} s{tail()}")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no server outlives it."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_bentoml(target: str, port: int, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """``bentoml serve <target>`` on 127.0.0.1:port, its output in ``cwd/serve-<port>.log``."""
    log = (Path(cwd) / f"serve-{port}.log").open("wb")
    return subprocess.Popen(
        [*BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen
    log: Path  # its stdout and stderr

    def wait_ready(self, seconds: float = 90) -> None:
        wait_ready(self.url, self.process, seconds, self.log)


@contextlib.contextmanager
def serving(
    target: str, cwd: Path, env: dict | None = None, ready: bool = True
) -> Iterator[Server]:
    """``bentoml serve <target>`` on a free loopback port, stopped on the way out; ready unless
    ``ready=False`` (then call ``wait_ready()``: servers that start together start faster)."""
    port = free_port()
    process = start_bentoml(target, port, cwd, env)
    server = Server(f"http://127.0.0.1:{port}", process, Path(cwd) / f"serve-{port}.log")
    try:
        if ready:
            server.wait_ready()
        yield server
    finally:
        stop(process)


# -- the OpenAPI page of a served bento -------------------------------------------------------

# What every route of a bento can answer, as its OpenAPI page must list (deploy/base.py).
STATUSES = {"200", "400", "413", "415", "503"}
# How an upload route's description says to make a file it takes (deploy/image.py).
FILE_EXAMPLE = re.compile(r'`python -c "(?P<code>[^"]+)" && curl -F (?P<field>\w+)=@(?P<file>\S+) ')


def try_every_openapi_example(client: httpx.Client, folder: Path) -> list[str]:
    """Send every route on the served bento's OpenAPI page (``/docs.json``) the example the
    page offers, as Swagger's "Try it out" would: a JSON route its request body's example, an
    upload route the file its description's command writes (run here, in ``folder``), /info
    an empty object. Fails unless each answers 200 and lists exactly :data:`STATUSES`, each
    with a line saying when; returns the routes tried."""
    spec = client.get("/docs.json").json()
    routes = {
        p: ops["post"]
        for p, ops in spec["paths"].items()
        if "x-bentoml-name" in ops.get("post", {})
    }
    for path, post in routes.items():
        responses = post["responses"]
        assert set(responses) == STATUSES, (path, sorted(responses))
        assert all(r["description"] for r in responses.values()), (path, responses)
        content = post["requestBody"]["content"]
        if "multipart/form-data" in content:
            made = FILE_EXAMPLE.search(post["description"])
            assert made, (path, post["description"])
            subprocess.run([sys.executable, "-c", made["code"]], cwd=folder, check=True)
            upload = (folder / made["file"]).read_bytes()
            reply = client.post(path, files={made["field"]: (made["file"], upload)})
        else:
            example = content["application/json"].get("example", {})
            assert example or path == "/info", (path, "no example")
            reply = client.post(path, json=example)
        assert reply.status_code == 200, (path, reply.status_code, reply.text[:500])
    return list(routes)


def stage_workspace(root: Path, source: Path, ingest_updates: dict | None = None,
                    **train_updates) -> Path:  # fmt: skip
    """A folder with params.yaml (the tiny params, paths relative) and ingested data, where
    ``python -m components.<stage>`` runs as DVC would run it."""
    from components import ingest
    from components.config import parse_params
    from tests.conftest import tiny_params_dict

    raw = tiny_params_dict(root, str(source))
    raw["paths"] = {k: v.removeprefix(str(root) + "/") for k, v in raw["paths"].items()}
    raw["paths"]["external_dir"] = str(source.parent)
    raw["ingest"].update(ingest_updates or {})
    raw["train"].update(train_updates)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cwd = Path.cwd()
    try:
        os.chdir(root)
        ingest.run(parse_params(raw))
    finally:
        os.chdir(cwd)
    return root


def file_hashes(root: Path, folders: tuple[str, ...] = (".",), skip: tuple[str, ...] = ()):
    """SHA-256 of every file under ``folders`` of ``root`` (file names in ``skip`` left out),
    by path relative to ``root``: equal before and after when nothing was written."""
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for folder in folders
        for f in sorted((root / folder).rglob("*"))
        if f.is_file() and f.name not in skip
    }
