"""A run with nothing to do, answered in a second or two, before Prefect starts.

With nothing changed, the flow ends where DVC's own status already was: every stage skipped, no
experiment saved, 0 files pushed. Getting there cost ~25 s, nearly all of it Prefect (its
import, a temporary server) and one DVC status per stage. So ``python -m flows.pipeline``
(``make pipeline``) without overrides first asks, holding the workspace like any run:

- DVC: ``dvc status`` of the whole graph is empty: every stage's code, data, params and outputs
  are as dvc.lock records them (DVC's own hashes, the same check the flow makes per stage);
- git: the workspace is byte for byte one of the last experiments on this commit (params.yaml,
  dvc.lock, metrics, the champion record, code), the experiment the flow would name; or the
  commit itself, when the run's results were committed and nothing is changed or untracked.

When both hold, it does what the flow does in that case: ``dvc push`` (and ``dvc exp push``
when a git remote is set, for an experiment), then prints the closing summary, which names the
matched experiment or commit and the champion, and exits 0. With a Prefect server configured
(``PREFECT_API_URL``, or the active Prefect profile) the run is recorded there as a completed
run of the ``pipeline`` flow, tagged ``no-op``, with the summary as its log and artifact,
through four calls to the server's REST API (a tenth of a second; Prefect's own client costs
seconds to import). Anything else, or anything this check cannot settle cheaply (overrides, a
killed run's params to put back, a busy workspace, a Prefect configuration it does not read),
is left to the flow, which decides as before.
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from components.stage import redact, set_quiet_env
from flows.experiments import Match
from flows.summary import SUMMARY_ARTIFACT

# The flow's name in Prefect (flows/pipeline.py) and the tag of the runs answered here.
FLOW_NAME = "pipeline"
NO_OP_TAG = "no-op"


@dataclass(frozen=True)
class NothingToDo:
    """What the check found: the experiment or commit the workspace matches, the stages (as
    dvc.yaml lists them), and what the push said (None when ``orchestrate.push`` is off)."""

    matched: Match
    stages: list[str]
    pushed: str | None
    unpushed: str | None = None  # a matched commit that the git remote does not hold yet


class _CannotTell(Exception):
    """This check cannot settle the question cheaply: the flow decides."""


def plain_run_root(argv: list[str]) -> Path | None:
    """The repository root when the command line asks for a plain run (no ``--set``, no
    ``--only-if-data-changed``, no ``--help``), else None. ``--keep-params`` alone keeps
    nothing, so it is still a plain run."""
    root, args = ".", list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--keep-params":
            continue
        if arg == "--root" and args:
            root = args.pop(0)
        elif arg.startswith("--root="):
            root = arg.removeprefix("--root=")
        else:
            return None
    return Path(root).resolve()


def check(root: Path) -> NothingToDo | None:
    """Holding the workspace: the matched experiment (or commit) when DVC finds every stage up
    to date and the workspace is one of the last experiments on this commit, or the commit
    itself (after the push the flow would make); None when there is something to do or the
    flow must decide.

    Raises what DVC, git or the params raise: the flow reports those in its own words.
    """
    from flows.workspace_lock import WorkspaceBusy, workspace_lock

    if not (root / "dvc.yaml").is_file():
        return None
    try:
        with workspace_lock(root, run="no-op check (python -m flows.pipeline)"):
            return _check_holding_the_workspace(root)
    except WorkspaceBusy:
        return None  # the flow waits for it (orchestrate.lock_wait_seconds) or says who holds it


def _check_holding_the_workspace(root: Path) -> NothingToDo | None:
    from dvc.repo import Repo, lock_repo

    from components.config import load_params
    from flows.experiments import commit_not_on_remote, has_commit, matching_run, stage_address
    from flows.workspace_lock import params_backup

    if params_backup(root).exists():
        return None  # a killed run's overrides to put back first: the flow does that
    orc = load_params(root / "params.yaml").orchestrate
    if not (orc.save_experiment and has_commit(root)):
        return None  # the flow says why nothing is saved
    matched = matching_run(root)  # git alone: the cheap half first
    if matched is None:
        return None
    # One DVC lock around status and push: DVC reads dvc.yaml and dvc.lock once (each
    # locked call on its own would read them again), and no other DVC command runs between.
    with Repo(str(root)) as repo, lock_repo(repo):
        if repo.status():  # `dvc status` of every stage: {} when all are up to date
            return None
        # As dvc.yaml lists them (every one is skipped): the graph's order would cost
        # networkx's import, a third of a second.
        order = [stage_address(stage, root) for stage in repo.index.stages]
        pushed = None
        if orc.push:
            sent = repo.push(remote=orc.remote or None)  # as flows.experiments.push_data
            pushed = f"{sent} file(s) pushed to {orc.remote or 'the default DVC remote'}"
            if orc.git_remote and matched.experiment:  # as flows.experiments.push_experiment_ref
                repo.experiments.push(orc.git_remote, [matched.experiment], push_cache=False)
                pushed += f", experiment ref pushed to {orc.git_remote}"
    return NothingToDo(matched, order, pushed, commit_not_on_remote(root, matched, orc.git_remote))


def prefect_api_url(env: dict | None = None, folders: tuple[Path, ...] = ()) -> str | None:
    """The Prefect API this process would talk to, read without importing Prefect (its settings
    alone take a second or more to import): ``PREFECT_API_URL`` from the environment, else from
    the active profile in the profiles file (``prefect config set``; ``PREFECT_PROFILE`` or the
    file's ``active``). None: no server, a flow run would start a temporary one. Raises
    :class:`_CannotTell` where Prefect could find settings this does not read (a
    ``prefect.toml``, a ``.env`` or ``[tool.prefect]`` in one of ``folders``, by default the
    current one) or would send credentials. tests/test_flows.py checks the answers against
    Prefect's own."""
    env = os.environ if env is None else env
    if any(env.get(key) for key in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")):
        raise _CannotTell("Prefect credentials")
    if env.get("PREFECT_API_URL"):
        return env["PREFECT_API_URL"].rstrip("/")
    for folder in folders or (Path.cwd(),):
        dotenv = folder / ".env"
        if (
            (folder / "prefect.toml").is_file()
            or (dotenv.is_file() and "PREFECT_" in dotenv.read_text(errors="replace"))
            or "prefect" in _toml(folder / "pyproject.toml").get("tool", {})
        ):
            raise _CannotTell(f"Prefect settings in a file of {folder}")
    home = Path(env.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = _toml(Path(env.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser())
    active = env.get("PREFECT_PROFILE") or profiles.get("active") or ""
    # Only the user's file: Prefect 3.8 does not apply its packaged profiles' settings (an
    # active "local" with no section of its own has no API URL).
    settings = profiles.get("profiles", {}).get(active, {})
    if any(settings.get(key) for key in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")):
        raise _CannotTell("Prefect credentials in the active profile")
    return str(settings.get("PREFECT_API_URL") or "").rstrip("/") or None


def _toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise _CannotTell(f"{path}: {exc}") from None


def record_flow_run(
    api: str, parameters: dict, message: str, summary: str, markdown
) -> tuple[str, str]:
    """Record a run answered here as a completed run of the ``pipeline`` flow on the Prefect
    server at ``api``, its state message ``message``, ``summary`` in its logs and
    ``markdown(run_name)`` as its Markdown artifact. Returns the run's name (the server's) and
    its page in the UI. Raises ``httpx.HTTPError`` when the server is unreachable or refuses."""
    import httpx  # a project dependency

    # Certificates are loaded for an https server only: loading them costs a tenth of a second.
    with httpx.Client(base_url=api, timeout=10, verify=api.startswith("https:")) as client:

        def post(path: str, body) -> dict:
            response = client.post(path, json=body)
            response.raise_for_status()
            return response.json()

        flow = post("/flows/", {"name": FLOW_NAME})  # the flow's id (created on first use)
        run = post(
            "/flow_runs/",
            {
                "flow_id": flow["id"],
                "parameters": parameters,
                "tags": [NO_OP_TAG],
                "state": {"type": "COMPLETED", "message": message},
            },
        )
        stamp = datetime.now(UTC).isoformat()
        logs = [message, summary]
        post(
            "/logs/",
            [
                {"name": "prefect.flow_runs", "level": 20, "message": line, "timestamp": stamp,
                 "flow_run_id": run["id"]}
                for line in logs
            ],
        )  # fmt: skip
        post(
            "/artifacts/",
            {
                "key": SUMMARY_ARTIFACT,
                "type": "markdown",
                "description": f"run {run['name']}",
                "data": markdown(run["name"]),
                "flow_run_id": run["id"],
            },
        )
    return run["name"], f"{api.removesuffix('/api')}/runs/flow-run/{run['id']}"


def _seconds_since_start() -> float:
    """Wall time since this process started, its interpreter's start-up included (Linux: the
    kernel's start time, in clock ticks since boot; elsewhere psutil's, to the second)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, IndexError, ValueError, AttributeError):
        import psutil  # DVC's own dependency

        return time.time() - psutil.Process().create_time()


def answered(argv: list[str]) -> bool:
    """Answer ``python -m flows.pipeline <argv>`` here when there is nothing to do: print the
    closing summary, record the run on a Prefect server when one is configured, and return
    True. False: the flow runs as usual (something to do, or this check could not tell)."""
    set_quiet_env()
    root = plain_run_root(argv)
    if root is None:
        return False
    try:
        # Prefect reads its files in the folder it starts in; the run goes on in the root.
        api = prefect_api_url(folders=(Path.cwd(), root))
        os.chdir(root)  # DVC's Python API expects to run from inside the repository
        found = check(root)
    except Exception as exc:  # DVC, git, params, a Prefect setting: the flow says it better
        if os.environ.get("PIPELINE_DEBUG"):
            print(f"no-op check: left to the flow: {exc!r}", file=sys.stderr)
        return False
    if found is None:
        return False

    from flows.summary import format_summary, read_summary, summary_markdown

    message = f"nothing changed: matched {found.matched}"
    notes = [
        f"dvc status: every stage up to date; answered in {_seconds_since_start():.1f} s, "
        "before Prefect started",
        f"nothing changed: this run matched {found.matched}   "
        f"(reproduce: {found.matched.reproduce})",
    ]
    if found.pushed:
        notes.append(f"remote: {found.pushed}")
    if found.unpushed:
        notes.append(found.unpushed)
    outcomes = {stage: "skipped" for stage in found.stages}
    summary = format_summary(read_summary(root), outcomes, notes)
    if not api:
        said = (
            "prefect: no flow run recorded (no Prefect server configured; with one, e.g. "
            "`make prefect-server` and PREFECT_API_URL, a run with nothing to do is recorded "
            "there too)"
        )
    else:
        import httpx

        parameters = {"overrides": [], "only_if_data_changed": False, "root": str(root),
                      "keep_params": "--keep-params" in argv}  # fmt: skip
        try:
            name, page = record_flow_run(
                api, parameters, message, summary, lambda run: summary_markdown(root, run, summary)
            )
            said = f"prefect: recorded as flow run {name} (tag {NO_OP_TAG}): {redact(page)}"
        except httpx.HTTPError as exc:
            said = (  # the URL and httpx's message may hold credentials
                f"prefect: no flow run recorded: the server at {redact(api)} did not answer "
                f"({redact(exc)})"
            )
    print(f"{summary}\n  {said}")
    return True
