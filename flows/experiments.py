"""DVC's side of a flow run: record it as an experiment, push it, and check the way is clear.

A finished flow run becomes ``dvc exp save -n <flow run name>`` (a git ref under
``refs/exps``: params, dvc.lock, metrics and code as they were), then ``dvc push`` puts its
data and models on the DVC remote and, when ``orchestrate.git_remote`` is set, ``dvc exp
push`` puts the experiment's ref on that git remote. On any clone with the same remotes:

    dvc exp pull origin <run>  &&  dvc exp apply <run>  &&  dvc repro --pull

The checks here run before a flow run touches anything, so a remote that cannot be reached
fails the run at once instead of after an hour of training.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class PreflightError(RuntimeError):
    """The run cannot start (or be recorded) as configured; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Names


def experiment_name(flow_run_name: str, flow_run_id: str, taken: set[str]) -> str:
    """A valid, unused experiment name for a flow run: its own name whenever possible.

    Prefect's generated names (``tangerine-lizard``) are valid git ref names as they are; a
    custom ``--flow-run-name`` is cleaned up (anything but letters, digits, ``.``, ``_``,
    ``-`` becomes ``-``). A name already used by an experiment gets the run id's first 8
    characters appended, so ``dvc exp apply <name>`` is never ambiguous.
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", flow_run_name)
    name = re.sub(r"\.{2,}", ".", name).strip("-.")
    name = re.sub(r"(\.lock)+$", "", name) or "run"
    short_id = re.sub(r"[^A-Za-z0-9]", "", flow_run_id)[:8] or "0"
    if name in taken:
        name = f"{name}-{short_id}"
    return name


def existing_experiment_names(root: Path) -> set[str]:
    """Names of every experiment in this repository, on any baseline commit."""
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import exp_refs

    with Repo(str(root)) as repo:
        return {ref.name for ref in exp_refs(repo.scm)}


# ---------------------------------------------------------------------------------------------
# Checks before a run


def _git(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=timeout, check=False
    )


def has_commit(root: Path) -> bool:
    return _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}").returncode == 0


OBJECT_STORES = ("s3", "gs", "gcs", "azure", "abfs", "oss")  # paths that start with a bucket


def check_dvc_lock_file(root: Path) -> None:
    """DVC's own lock file (``.dvc/tmp/rwlock``) must be readable: a DVC command killed while it
    wrote the file leaves it empty, and DVC then refuses every command until it is removed."""
    import json

    rwlock = root / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(rwlock.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        raise PreflightError(
            f"{rwlock.relative_to(root)} is empty or not JSON (a DVC command was stopped while "
            "it wrote it), and DVC refuses to run until it is gone: if no DVC command is "
            f"running in {root}, delete it (rm {rwlock.relative_to(root)}) and run again"
        ) from None


def check_dvc_remote(root: Path, name: str) -> str:
    """Make sure the DVC remote is configured and answers; return ``"name (url)"``.

    A local folder is created on first use (as ``dvc push`` would) and must be writable; any
    other kind gets one round trip (credentials, DNS, network, bucket).
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remotes = repo.config.get("remote", {})
        name = name or repo.config.get("core", {}).get("remote", "")
        if not name:
            raise PreflightError(
                "no DVC remote to push to: add one with `dvc remote add -d <name> <url>` "
                "(see .dvc/config) or set orchestrate.push: false"
            )
        if name not in remotes:
            known = ", ".join(sorted(remotes)) or "none"
            raise PreflightError(
                f"orchestrate.remote: no DVC remote named {name!r} (configured: {known})"
            )
        url = remotes[name].get("url", "?")
        try:
            remote = repo.cloud.get_remote(name, "push")
            fs, path = remote.fs, remote.path
            if fs.protocol == "local":
                target = Path(path)
                target.mkdir(parents=True, exist_ok=True)
                probe = target / ".dvc-write-probe"
                probe.write_bytes(b"")
                probe.unlink()
            elif fs.protocol in OBJECT_STORES and not fs.exists(path.split("/")[0]):
                # One round trip (credentials, DNS, network). A new prefix is no error (the
                # first push makes it), a missing bucket is: S3 says neither on its own.
                raise FileNotFoundError(f"no bucket {path.split('/')[0]!r} there")
            else:
                fs.exists(path)  # one round trip: credentials, DNS, network
        except Exception as exc:  # any backend's error: auth, DNS, network, bucket, config
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise PreflightError(f"DVC remote {name!r} ({url}) is unreachable: {reason}") from None
    return f"{name} ({url})"


def check_git_remote(root: Path, git_remote: str) -> str:
    """Make sure experiment refs can go to this git remote; return its url."""
    url = _git(root, "remote", "get-url", git_remote)
    if url.returncode != 0:
        raise PreflightError(
            f"orchestrate.git_remote: no git remote named {git_remote!r} "
            f"(`git remote -v` lists them)"
        )
    try:
        probe = _git(root, "ls-remote", "--heads", git_remote, timeout=60)
    except subprocess.TimeoutExpired:
        raise PreflightError(f"git remote {git_remote!r} did not answer in 60 s") from None
    if probe.returncode != 0:
        reason = " ".join(probe.stderr.split())[-300:]
        raise PreflightError(f"git remote {git_remote!r} is unreachable: {reason}")
    return url.stdout.strip()


# ---------------------------------------------------------------------------------------------
# What DVC and git say about the workspace


def stage_address(stage, root: Path) -> str:
    """What `dvc repro` run from the root accepts for a DVC stage: its name for the root
    dvc.yaml's stages (DVC's own ``addressing`` is relative to the current folder, not the
    root), ``path/dvc.yaml:name`` for the others."""
    dvcfile = Path(stage.path).resolve()
    if dvcfile.parent == Path(root).resolve():
        return stage.name
    return f"{dvcfile.relative_to(Path(root).resolve()).as_posix()}:{stage.name}"


def stages_in_order(repo, root: Path) -> tuple[list[str], list[str]]:
    """The stages of an open DVC ``repo`` in graph order (DVC's own topological sort of its
    stage graph), and the source stages among them: those that depend on no other stage."""
    import networkx as nx  # DVC's own dependency

    graph = repo.index.graph  # edges point from a stage to the stages it depends on
    order = [stage_address(s, root) for s in reversed(list(nx.topological_sort(graph)))]
    sources = {stage_address(s, root) for s in graph if graph.out_degree(s) == 0}
    return order, [s for s in order if s in sources]


@dataclass(frozen=True)
class Match:
    """What a run with nothing to do matched: one of the last experiments on this commit, or
    the commit itself when it holds the run (its results were committed)."""

    what: str  # "experiment" or "commit"
    name: str  # the experiment's name, or the commit's short hash

    def __str__(self) -> str:
        return f"{self.what} {self.name}"

    @property
    def experiment(self) -> str | None:
        return self.name if self.what == "experiment" else None

    @property
    def reproduce(self) -> str:
        """The command that brings this run back in a clone."""
        if self.what == "experiment":
            return f"dvc exp apply {self.name}"
        return f"git checkout {self.name} && dvc pull"


def matching_run(root: Path, newest: int = 10) -> Match | None:
    """What the workspace is as it is, byte for byte: the newest of the last ``newest``
    experiments on this commit that holds it (every file git tracks here or the experiment
    holds: code, params.yaml, dvc.lock, metrics), else the commit itself when git finds nothing
    changed and nothing untracked (a run whose results were committed: ``dvc exp save`` would
    record the same tree again). None when neither matches.

    A few git commands and one read of each tracked file (DVC's data is not in git): well
    under a second. Contents only: a changed file mode alone does not count.
    """

    def git(*args: str) -> str:
        """Its output, or "" when git fails."""
        done = _git(root, *args)
        return done.stdout if done.returncode == 0 else ""

    top = Path(git("rev-parse", "--show-toplevel").strip() or root)
    head = git("rev-parse", "--verify", "--quiet", "HEAD^{commit}").strip()
    if not head:
        return None
    refs = git(
        "for-each-ref", f"--count={newest}", "--sort=-committerdate", "--format=%(refname)",
        f"refs/exps/{head[:2]}/{head[2:]}/",
    ).split()  # fmt: skip
    # The commit last: an experiment on it names the run better (its Prefect run, its message).
    # Only a workspace with no untracked file is the commit: such a file may be the run's
    # (dvc.lock or a metric before their first commit, a new stage's output), which an
    # experiment would hold and the commit does not. A stray file leaves it to the flow.
    others = _git(top, "ls-files", "--others", "--exclude-standard", "-z")
    if others.returncode == 0 and not others.stdout:
        refs.append(head)
    tracked = {p for p in git("-C", str(top), "ls-files", "-z").split("\0") if p}
    blobs: dict[str, str | None] = {}

    def blob(path: str) -> str | None:
        """The git blob id of the workspace's file (None when there is none)."""
        if path not in blobs:
            full = top / path
            if full.is_symlink():
                data = os.readlink(full).encode()
            elif full.is_file():
                data = full.read_bytes()
            else:
                blobs[path] = None
                return None
            header = b"blob %d\0" % len(data)
            blobs[path] = hashlib.sha1(header + data, usedforsecurity=False).hexdigest()
        return blobs[path]

    for ref in refs:
        held = {}
        for entry in git("ls-tree", "-r", "-z", "--full-tree", ref).split("\0"):
            if entry:
                meta, path = entry.split("\t", 1)
                _, kind, sha = meta.split()
                if kind == "blob":
                    held[path] = sha
        if held and all(blob(path) == held.get(path) for path in tracked | held.keys()):
            if ref == head:
                return Match("commit", git("rev-parse", "--short", head).strip() or head[:12])
            return Match("experiment", ref.rsplit("/", 1)[-1])
    return None


def commit_not_on_remote(root: Path, matched: Match, git_remote: str) -> str | None:
    """For a run matched as a commit, with ``orchestrate.git_remote`` set: a note when no branch
    of that remote holds the commit (as this clone last fetched it), so that another clone
    could not check it out. None otherwise: an experiment's ref is pushed with the run."""
    if matched.what != "commit" or not git_remote:
        return None
    held = _git(root, "branch", "-r", "--contains", matched.name, "--list", f"{git_remote}/*")
    if held.returncode == 0 and held.stdout.strip():
        return None
    return (
        f"git: commit {matched.name} is on no branch of {git_remote} yet: `git push` it, so "
        "that other clones can reproduce this run"
    )


# ---------------------------------------------------------------------------------------------
# Recording a run


def _untracked_files(root: Path) -> list[str]:
    out = _git(root, "ls-files", "--others", "--exclude-standard", "-z")
    return [p for p in out.stdout.split("\0") if p]


def files_the_experiment_needs(root: Path) -> list[str]:
    """Untracked files a run wrote that belong in its experiment commit.

    ``dvc exp save`` commits what git tracks plus top-level metrics; a stage's own
    ``cache: false`` outputs (metrics, plots), the ``.gitignore`` files DVC writes for its
    outputs and the records the pipeline keeps in git (a file named in params.yaml's
    ``paths:``, e.g. the champion record) are left out while git does not know them yet (a new
    stage, a fresh clone).
    """
    from dvc.repo import Repo

    from components.config import load_params

    untracked = _untracked_files(root)
    if not untracked:
        return []
    resolved = Path(root).resolve()
    with Repo(str(root)) as repo:
        uncached = [
            Path(out.fs_path).resolve().relative_to(resolved).as_posix()
            for stage in repo.index.stages
            for out in stage.outs
            if not out.use_cache
        ]
    records = set()
    for value in load_params(Path(root) / "params.yaml").paths.model_dump().values():
        path = (resolved / value).resolve()
        if path.is_file() and path.is_relative_to(resolved):
            records.add(path.relative_to(resolved).as_posix())
    wanted = []
    for path in untracked:
        if (
            path == "dvc.lock"
            or Path(path).name == ".gitignore"
            or path in records
            or any(path == u or path.startswith(u + "/") for u in uncached)
        ):
            wanted.append(path)
    return wanted


# Who commits an experiment when git has no user configured (a fresh server, a CI runner).
FALLBACK_IDENTITY = {"NAME": "data-to-bento pipeline", "EMAIL": "pipeline@localhost"}


@contextlib.contextmanager
def _git_identity(root: Path) -> Iterator[list[str]]:
    """Let ``dvc exp save`` commit even where git has no user: a stand-in identity, for the
    duration of the save only. Yields the variables it had to set."""
    missing = {}
    for role in ("AUTHOR", "COMMITTER"):
        for field, key in (("NAME", "user.name"), ("EMAIL", "user.email")):
            var = f"GIT_{role}_{field}"
            if not os.environ.get(var) and not _git(root, "config", key).stdout.strip():
                missing[var] = FALLBACK_IDENTITY[field]
    os.environ.update(missing)
    try:
        yield sorted(missing)
    finally:
        for var in missing:
            os.environ.pop(var, None)


def save_experiment(root: Path, name: str, message: str) -> list[str]:
    """``dvc exp save -n name``: record the workspace (params, dvc.lock, metrics, code).

    Returns the git identity variables it had to stand in for (none where git has a user).
    """
    from dvc.repo import Repo

    include = files_the_experiment_needs(root)
    with _git_identity(root) as stand_ins, Repo(str(root)) as repo:
        repo.experiments.save(name=name, include_untracked=include, message=message)
    return stand_ins


def push_data(root: Path, remote: str) -> int:
    """``dvc push``: the data and models of the workspace to the DVC remote; files sent."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.push(remote=remote or None)


def push_experiment_ref(root: Path, git_remote: str, name: str) -> None:
    """``dvc exp push <git_remote> <name> --no-cache``: the run's git ref (data went already)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.experiments.push(git_remote, [name], push_cache=False)


# The names of a flow's Failed state when it did not start: its checks refused the input, or
# another run holds the workspace. The command lines turn them into exit codes 2 and 3.
NOT_STARTED = "NotStarted"
BUSY = "WorkspaceBusy"


def start_temporary_server() -> None:
    """Start Prefect's temporary server now (when no ``PREFECT_API_URL`` names a server), with
    SIGINT blocked while it starts: the server inherits the block, so Ctrl-C in a terminal,
    which signals every process of the foreground group, reaches the flow and not the server.
    Stopped by it, the server left the flow's roll-back to report to nothing: minutes of
    retries and tracebacks before the process ended. Prefect stops it at exit (SIGTERM), as
    before; a flow run later finds it started."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return  # before the server's import: ~2 s of CPU that a run against a server saves
    from prefect.server.api.server import SubprocessASGIServer

    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        SubprocessASGIServer().start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # a Ctrl-C held meanwhile arrives now


def exit_code(state, what: str) -> int:
    """A flow's final state as a command's exit code, with a line on stderr when it failed:
    0 completed, 1 failed, 2 not started (bad input), 3 not started (workspace busy)."""
    if state.name in (NOT_STARTED, BUSY):
        print(f"\n{what} not started: {state.message}", file=sys.stderr)
        return 2 if state.name == NOT_STARTED else 3
    if not state.is_completed():
        print(f"\n{what} failed: {state.message}", file=sys.stderr)
        return 1
    return 0
