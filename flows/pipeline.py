"""The pipeline as a Prefect flow: one task per DVC stage, in graph order.

DVC decides what re-runs (hashes of deps, params and outs); Prefect decides when and where
(by hand, on a schedule, on a work pool) and keeps the logs and the run history. A stage DVC
finds unchanged ends in a ``Skipped`` state without starting a process.

    python -m flows.pipeline                          # run everything that changed
    python -m flows.pipeline --set train.max_epochs=2 # this run only, as `dvc exp run -S`
    python -m flows.pipeline --set ... --keep-params  # and keep the overrides in params.yaml
    python -m flows.pipeline --only-if-data-changed   # what the nightly schedule runs

A run checks what it can first (overrides, the remotes), then holds the workspace (one run at
a time), applies the overrides, runs the stages, and ends by saving itself as a DVC
experiment named after the flow run and pushing data and models to the DVC remote, so any run
reproduces elsewhere with ``dvc exp apply <run>`` and ``dvc repro --pull``. Overrides belong
to that run: its experiment records them and params.yaml goes back as it was. A run that
changes nothing saves no new experiment: it names the one it matched (or the commit, when the
run's results were committed); when DVC finds every stage up to date and the workspace is
that experiment or commit, ``python -m flows.pipeline`` says so before Prefect starts
(flows/noop.py). The ``orchestrate`` section of params.yaml holds the
knobs (retries, lock wait, remotes, schedule).

No ML logic lives here: each stage is ``python -m components.<stage>``, run by ``dvc repro``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from components.stage import failure_reason, redact, set_quiet_env, venv_env, write_text

set_quiet_env()  # before Prefect is imported: it reads PREFECT_HOME at import

if __name__ == "__main__":
    # `python -m flows.pipeline` (make pipeline) with nothing to do is answered from DVC's own
    # status in a second or two, before Prefect is imported or a temporary server started.
    from flows.noop import answered

    if answered(sys.argv[1:]):
        sys.exit(0)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402

from components.config import (  # noqa: E402
    Params,
    ParamsError,
    check_repository_paths,
    load_params,
    parse_params,
)
from components.overrides import (  # noqa: E402
    overrides_for_one_run,
    params_as_written,
    put_back_after_a_killed_run,
    refuse_ignored,
)
from components.report import run_environment  # noqa: E402
from components.restore import RunStart, not_in_cache, run_start  # noqa: E402
from flows.experiments import (  # noqa: E402
    BUSY,
    FALLBACK_IDENTITY,
    NOT_STARTED,
    PreflightError,
    check_dvc_lock_file,
    check_dvc_remote,
    check_git_remote,
    commit_not_on_remote,
    existing_experiment_names,
    exit_code,
    experiment_name,
    has_commit,
    matching_run,
    push_data,
    push_experiment_ref,
    save_experiment,
    stages_in_order,
    start_temporary_server,
)
from flows.noop import FLOW_NAME  # noqa: E402
from flows.summary import (  # noqa: E402
    SUMMARY_ARTIFACT,
    format_summary,
    read_summary,
    summary_markdown,
)
from flows.workspace_lock import (  # noqa: E402
    WorkspaceBusy,
    lock_path,
    params_backup,
    workspace_lock,
)

# Final-state names the CLI and the tests read: the run did not start, or another run holds
# the workspace; a stage failed with its own one-line reason (so retrying cannot help).
STAGE_FAILED = "StageFailed"


def stage_graph(root: Path) -> tuple[list[str], list[str]]:
    """The stages of dvc.yaml in graph order (DVC's own topological sort of its stage graph),
    and the source stages among them: those that depend on no other stage (ingest)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return stages_in_order(repo, root)


def stage_order(root: Path) -> list[str]:
    """The stages of dvc.yaml in graph order."""
    return stage_graph(root)[0]


def stage_is_up_to_date(root: Path, stage: str) -> bool:
    """DVC's verdict: are this stage's deps, params and outs unchanged since dvc.lock?"""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return not repo.status(targets=[stage])


def changed_sources(root: Path) -> list[str]:
    """The source stages whose data, code or params changed since dvc.lock (``dvc status``)."""
    return [stage for stage in stage_graph(root)[1] if not stage_is_up_to_date(root, stage)]


def _retry_unless_the_stage_said_why(task, task_run, state) -> bool:
    """Retry crashes, I/O errors, a busy DVC lock; not a stage's own one-line failure."""
    return state.name != STAGE_FAILED


@task(retries=0, retry_condition_fn=_retry_unless_the_stage_said_why)
def run_stage(stage: str, root: str, skip_reason: str = ""):
    """Run one stage through ``dvc repro --single-item``; stream its output into the logs.

    Returns "ran", or a ``Skipped`` state when DVC finds the stage unchanged (or the run was
    told to skip), or a ``Failed`` state whose message is the stage's one-line reason.
    """
    logger = get_run_logger()
    root_path = Path(root)
    if skip_reason:
        logger.info("%s: skipped, %s", stage, skip_reason)
        return Completed(name="Skipped", message=f"{stage}: {skip_reason}", data="skipped")
    if stage_is_up_to_date(root_path, stage):
        logger.info("%s: unchanged since dvc.lock, skipped", stage)
        return Completed(name="Skipped", message=f"{stage} unchanged", data="skipped")

    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    env = venv_env()  # dvc.yaml's commands say `python`: this interpreter (the project's venv)
    mark = uuid.uuid4().hex  # every process this starts inherits it: how _stop finds them all
    process = subprocess.Popen(
        command,
        cwd=root_path,
        env={**env, STAGE_MARK: mark},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reason, busy, restored, last = None, None, False, ""
    try:
        for from_stderr, line in _output_lines(process):
            line = line.rstrip()
            if not line:
                continue
            # stdout is the stage's own account (INFO); stderr its warnings, DVC's and Python's
            # included, and its failure line: they show as warnings in the flow's log.
            logger.log(logging.WARNING if from_stderr else logging.INFO, line)
            last = line
            if (said := failure_reason(line)) is not None:
                reason = said
            elif "Unable to acquire lock" in line:
                busy = (
                    f"{stage}: another DVC command is running in {root_path} (DVC's lock is "
                    "held); wait for it to finish and run again"
                )
            elif "is cached - skipping run" in line:
                restored = True
    except BaseException:  # Ctrl-C, or SIGTERM (a cancelled flow run: Prefect raises it here)
        _stop(process, mark)
        raise
    if process.wait() != 0:
        # A failed state with the stage's own reason, not a traceback: the reason is the story.
        if reason:
            return Failed(name=STAGE_FAILED, message=reason)
        # Anything else (a crash, a signal, I/O, DVC's lock) may pass: retried per params.
        return Failed(message=busy or f"{stage}: {last or 'dvc repro exited non-zero'}")
    if restored:
        return Completed(
            name="Skipped", message=f"{stage} restored from DVC's run-cache", data="restored"
        )
    return "ran"


def _output_lines(process: subprocess.Popen):
    """``(from_stderr, line)`` for each line of a process's stdout and stderr as it comes,
    until both end: a thread per pipe, so that neither blocks the other when its buffer fills."""
    lines: queue.SimpleQueue = queue.SimpleQueue()

    def pump(stream, from_stderr: bool) -> None:
        with stream:
            for line in stream:
                lines.put((from_stderr, line))
        lines.put(None)

    for stream, from_stderr in ((process.stdout, False), (process.stderr, True)):
        threading.Thread(target=pump, args=(stream, from_stderr), daemon=True).start()
    open_pipes = 2
    while open_pipes:
        item = lines.get()
        if item is None:
            open_pipes -= 1
        else:
            yield item


class _UntrackedListing(logging.Filter):
    """Catches DVC's warning that lists every untracked file ``dvc exp save`` leaves out of
    the experiment (a user's data folder: thousands of paths in one line); keeps the paths."""

    def __init__(self):
        super().__init__()
        self.paths: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("The following untracked files") and record.args:
            self.paths += [p for p in str(record.args[0]).split(", ") if p]
            return False
        return True


@contextlib.contextmanager
def _untracked_files_counted(logger):
    """DVC's listing of untracked files, as one warning that counts them per folder."""
    listing = _UntrackedListing()
    dvc_logger = logging.getLogger("dvc.repo.experiments.executor.base")
    dvc_logger.addFilter(listing)
    try:
        yield
    finally:
        dvc_logger.removeFilter(listing)
    if listing.paths:
        folders: dict[str, int] = {}
        for path in listing.paths:  # data/external/cats/1.png counts for data/external/
            parts = path.split("/")
            folder = "/".join(parts[: min(2, len(parts) - 1)]) + "/" if len(parts) > 1 else path
            folders[folder] = folders.get(folder, 0) + 1
        where = ", ".join(f"{f} ({n})" for f, n in sorted(folders.items())[:5])
        more = f" and {len(folders) - 5} more" if len(folders) > 5 else ""
        logger.warning(
            "%d file(s) git does not track are not in the experiment: %s%s; a clone cannot "
            "reproduce the run without them: `git add` them, or `dvc add` a data folder",
            len(listing.paths), where, more,
        )  # fmt: skip


# In the environment of a stage's ``dvc repro`` and so of every process it starts.
STAGE_MARK = "PIPELINE_STAGE_MARK"


def _stop(process: subprocess.Popen, mark: str, seconds: float = 60) -> None:
    """Stop a stage the flow no longer waits for, before the flow puts params.yaml back: its
    command first (SIGTERM: the stage puts its outputs back), then ``dvc repro`` itself, so no
    dvc.lock is written after this run has ended. ``dvc repro`` is given time to end on its
    own once its command has: stopped while it releases its lock, it left ``.dvc/tmp/rwlock``
    empty, and DVC then refuses every command. Last, any process left with the run's ``mark``:
    the stage's python, when the ``sh -c`` DVC starts it with was stopped just after it forked
    (orphaned, no longer below ``dvc repro``, it ran to its end and wrote its outputs after the
    flow had put them back)."""
    _terminate(_descendants(process.pid) | _marked(mark, but=process.pid), seconds)
    for stop in (None, process.terminate, process.kill):
        if stop is not None:
            stop()
        try:
            process.wait(seconds if stop is not process.kill else None)
            break
        except subprocess.TimeoutExpired:
            continue
    _terminate(_marked(mark), seconds)


def _descendants(pid: int) -> set:
    """The processes below ``pid`` now (where a process's environment cannot be read)."""
    import psutil  # DVC's own dependency

    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


def _marked(mark: str, but: int | None = None) -> set:
    """The live processes (a zombie is not) whose environment has ``STAGE_MARK=mark``."""
    import psutil

    found = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # gone, a zombie, or another user's
            if proc.pid != but and proc.environ().get(STAGE_MARK) == mark and _live(proc):
                found.add(proc)
    return found


def _live(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _terminate(procs: set, seconds: float) -> None:
    """SIGTERM to each of ``procs``; SIGKILL to any still live after ``seconds``. Polls rather
    than waits: an orphan is not this process's child, and a container's init may never reap
    it (a zombie for good)."""
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        deadline = time.monotonic() + (seconds if sig == signal.SIGTERM else 5)
        while (procs := {p for p in procs if _live(p)}) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not procs:
            return


@task(retries=0)
def record_experiment(root: str, name: str, message: str) -> str:
    """``dvc exp save -n <name>``: the run, as an experiment any clone can apply."""
    logger = get_run_logger()
    with _untracked_files_counted(logger):
        stand_ins = save_experiment(Path(root), name, message)
    if stand_ins:
        logger.info("git has no user here: committed as %r", FALLBACK_IDENTITY["NAME"])
    logger.info("saved as DVC experiment %r (dvc exp apply %s)", name, name)
    return name


@task(retries=0)
def push_run(root: str, remote: str, git_remote: str, experiment: str | None) -> str:
    """``dvc push`` (data and models) and, when configured, ``dvc exp push`` (the git ref)."""
    logger = get_run_logger()
    sent = push_data(Path(root), remote)
    where = remote or "the default DVC remote"
    logger.info("dvc push: %d file(s) sent to %s", sent, where)
    said = f"{sent} file(s) pushed to {where}"
    if git_remote and experiment:
        push_experiment_ref(Path(root), git_remote, experiment)
        logger.info("dvc exp push: experiment %r sent to git remote %r", experiment, git_remote)
        said += f", experiment ref pushed to {git_remote}"
    return said


@contextlib.contextmanager
def signals_deferred(logger):
    """Hold SIGINT and SIGTERM until the block ends, then deliver them: a roll-back stopped
    halfway (dvc checkout killed while it writes DVC's lock file) leaves a workspace no run can
    use. Only the main thread can set handlers; elsewhere the block runs unshielded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, _frame) -> None:
        received.append(signum)
        logger.warning("%s received: stopping once the roll-back is done",
                       signal.Signals(signum).name)  # fmt: skip

    before = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


def roll_back(root: Path, start: RunStart, logger) -> str:
    """After a failed stage: dvc.lock and every output back as the last good run left them.

    The failed stage put its own outputs back (components/restore.py); the stages of this run
    that finished before it changed dvc.lock and their outputs: both go back too, so a run
    that fails changes nothing a later run or `make serve` relies on. The cached outputs come
    back by ``dvc checkout``, the ``cache: false`` ones (metrics git keeps, which no checkout
    restores) from the copies taken when the run started. ``dvc status`` then lists what is
    stale. Returns one line for the failure message.
    """
    lock = root / "dvc.lock"
    last_good_lock = start.lock
    if last_good_lock is None:
        return "no earlier good run to go back to"
    if lock.is_file() and lock.read_bytes() == last_good_lock:
        return "outputs as the last good run left them (dvc status lists what is stale)"
    missing = [path for path in not_in_cache(root, last_good_lock) if path not in start.kept]
    if missing:  # a checkout would delete these outputs, and put nothing in their place
        shown = ", ".join(missing[:4]) + (
            f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        )
        logger.warning("not rolled back: the last good run's %s are not in the DVC cache", shown)
        return (
            f"this run's outputs and dvc.lock are kept: the last good run's {shown} are not in "
            "this clone's DVC cache (`dvc pull` fetches them, then `git checkout dvc.lock && "
            "dvc checkout` goes back)"
        )
    write_text(lock, last_good_lock)  # whole or not at all: a half dvc.lock breaks every run
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "checkout", "--force"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        problem = " ".join((done.stderr or done.stdout).split())[:300]
        logger.warning("dvc checkout after the failure: %s", problem)
        return f"dvc.lock put back, but dvc checkout failed ({problem}): run `dvc checkout`"
    start.put_back_kept(root)
    logger.info("dvc.lock and the outputs of this run's earlier stages put back (dvc checkout)")
    return (
        "dvc.lock and every output back as the last good run left them (dvc status lists what "
        "is stale)"
    )


def write_stopped_report(root: Path, stage: str, reason: str, logger) -> Path | None:
    """The report page of a run that stopped at ``stage``, beside the last good run's report."""
    from components.report import STAGES, write_stopped

    if stage not in STAGES:
        return None
    try:
        return write_stopped(load_params(root / "params.yaml"), stage, reason)
    except Exception as exc:  # the stage's reason matters more than its page
        logger.warning("could not write the report of the stopped run: %s", exc)
        return None


def params_with_overrides(root: Path, overrides: list[str]) -> Params:
    """params.yaml as it will be once the overrides are applied, checked as the run will write
    it (a value the file would not keep is refused here, before the run); nothing is written."""
    return parse_params(params_as_written(overrides, root / "params.yaml"))


def preflight(root: Path, overrides: list[str]) -> Params:
    """Everything that can be checked before a run touches the workspace.

    DVC's lock file left unreadable by a killed DVC command, bad overrides (unknown key, wrong
    type, a key the chosen model ignores), ``paths.*`` that DVC would delete files git keeps
    with, a missing or unreachable DVC remote, a missing or unreachable git remote: each raises
    with a message that says what to fix (a remote's credentials shown as ``***``).
    """
    if not (root / "dvc.yaml").is_file():
        raise PreflightError(f"{root} has no dvc.yaml: run from the repository root")
    check_dvc_lock_file(root)
    params = params_with_overrides(root, overrides)
    refuse_ignored(overrides, root / "params.yaml")  # e.g. train.channels for an MLP
    check_repository_paths(params.paths, root)  # before DVC deletes a folder someone named
    orc = params.orchestrate
    try:
        if orc.push:
            check_dvc_remote(root, orc.remote)
        if orc.save_experiment and orc.git_remote and has_commit(root):
            check_git_remote(root, orc.git_remote)
    except PreflightError as exc:
        # A remote's URL (and a backend's reason) can hold credentials: never print them.
        raise PreflightError(redact(str(exc))) from None
    return params


def leave_artifact(root: Path, summary: str) -> str:
    """Leave the closing summary, with a link to the report, as this flow run's Prefect markdown
    artifact (key ``pipeline-summary``: the UI's Artifacts page keeps one per run); returns the
    summary. A server that refuses it costs a warning, never the run."""
    from prefect.artifacts import create_markdown_artifact

    name = flow_run.get_name() or "pipeline-run"
    try:
        markdown = summary_markdown(root, name, summary)
        create_markdown_artifact(markdown, key=SUMMARY_ARTIFACT, description=f"run {name}")
    except Exception as exc:  # the API's own error types, a params.yaml gone bad: not the run's
        get_run_logger().warning("no Prefect artifact for this run: %s", exc)
    return summary


@flow(name=FLOW_NAME, log_prints=True)
def pipeline(
    overrides: list[str] | None = None,
    only_if_data_changed: bool = False,
    root: str = ".",
    keep_params: bool = False,
):
    """Check, hold the workspace, apply overrides, run every stage through DVC in graph order,
    then save the run as a DVC experiment named after this flow run and push it.

    The overrides belong to this run: its experiment records them, and params.yaml goes back
    byte for byte as it was (also when the run fails or is stopped), unless ``keep_params``
    and the run completes. A run that ran no stage and matches one of the last experiments,
    or the commit itself, saves none: it names what it matched.
    ``only_if_data_changed`` (the nightly schedule): when DVC finds the source stages (ingest)
    unchanged, every stage is skipped, no override is applied and nothing is saved.
    A failing stage fails the flow with that stage's reason; later stages do not run.
    Returns each stage's outcome ("ran" or "skipped").
    """
    logger = get_run_logger()
    root_path = Path(root).resolve()
    os.chdir(root_path)  # DVC's Python API expects to run from inside the repository
    overrides = list(overrides or [])
    run_name = flow_run.get_name() or "pipeline-run"
    run_id = flow_run.get_id() or ""
    os.environ.update(run_environment(run_name, run_id))  # the report names this run
    try:
        params = preflight(root_path, overrides)  # nothing touched yet
    except (ParamsError, PreflightError) as exc:
        return Failed(name=NOT_STARTED, message=str(exc))
    orc = params.orchestrate
    try:
        with workspace_lock(
            root_path,
            run=run_name,
            wait_seconds=orc.lock_wait_seconds,
            on_wait=lambda holder: logger.info("waiting for the workspace: %s holds it", holder),
        ):
            logger.info("workspace held by this run (%s)", lock_path(root_path))
            return _run_holding_the_workspace(
                root_path, overrides, only_if_data_changed, run_name, run_id, keep_params
            )
    except WorkspaceBusy as exc:
        return Failed(name=BUSY, message=str(exc))


def _run_holding_the_workspace(
    root: Path,
    overrides: list[str],
    only_if_data_changed: bool,
    run_name: str,
    run_id: str,
    keep_params: bool = False,
):
    logger = get_run_logger()
    params_file = root / "params.yaml"
    # A run killed with its overrides applied (SIGKILL, OOM, a reboot) ran no `finally`.
    put_back = put_back_after_a_killed_run(params_backup(root), params_file)
    if put_back:
        logger.warning(put_back)
        try:  # checked before against the file that run left
            params_with_overrides(root, overrides)
            refuse_ignored(overrides, params_file)
        except ParamsError as exc:
            return Failed(name=NOT_STARTED, message=str(exc))
    order, sources = stage_graph(root)
    if only_if_data_changed:
        changed = [s for s in sources if not stage_is_up_to_date(root, s)]
        if not changed:
            said = (
                f"data source unchanged since dvc.lock (dvc status of {', '.join(sources)}): "
                "every stage skipped, nothing saved"
            )
            logger.info(said)
            if overrides:
                logger.info("overrides not applied (nothing runs): %s", overrides)
            outcomes = {}
            for stage in order:
                run_stage.with_options(name=stage, task_run_name=stage)(
                    stage, str(root), skip_reason="data source unchanged"
                )
                outcomes[stage] = "skipped"
            print(format_summary(read_summary(root), outcomes, [said]))
            return Completed(message=said, data=outcomes)
        logger.info("data source changed (dvc status): %s", ", ".join(changed))

    with overrides_for_one_run(
        overrides, params_file, keep=keep_params, backup=params_backup(root), run=run_name
    ) as one_run:
        if one_run.applied:
            logger.info("params.yaml overrides for this run: %s", one_run.applied)
        state = _run_stages(root, order, overrides, keep_params, run_name, run_id)
        if not state.is_completed():
            one_run.keep = False  # a failed run's params are never kept
    if one_run.edited:
        logger.warning(
            "params.yaml was edited during this run: left as it is, this run's overrides (%s) "
            "may still be in it",
            " ".join(overrides),
        )
    elif one_run.applied:
        logger.info(
            "params.yaml keeps this run's overrides (--keep-params)"
            if one_run.keep
            else "params.yaml put back as it was before this run"
        )
    return state


def _run_stages(
    root: Path, order: list[str], overrides: list[str], keep_params: bool, run_name: str, run_id
):
    """The stages, then the experiment and the push; params.yaml as this run has it."""
    logger = get_run_logger()
    orc = load_params(root / "params.yaml").orchestrate  # as the overrides left it
    retry = {"retries": orc.retries, "retry_delay_seconds": orc.retry_delay_seconds}

    outcomes: dict[str, str] = {}
    with run_start(root) as start:
        try:
            for stage in order:
                state = run_stage.with_options(name=stage, task_run_name=stage, **retry)(
                    stage, str(root), return_state=True
                )
                if not state.is_completed():
                    with signals_deferred(logger):  # a Ctrl-C now would leave half a roll-back
                        logger.info("not saved as an experiment: %s failed", stage)
                        reason = state.message or f"{stage} did not complete"
                        # The page first: it shows what this run's earlier stages wrote.
                        page = write_stopped_report(root, stage, reason, logger)
                        said = roll_back(root, start, logger)
                    if overrides:
                        said += "; params.yaml back as it was before this run"
                    return Failed(
                        message=f"{reason}; {said}" + (f"; report: {page}" if page else "")
                    )
                outcomes[stage] = "skipped" if state.name == "Skipped" else "ran"
        except BaseException as exc:  # Ctrl-C, SIGTERM (Prefect raises it here), a bug
            with signals_deferred(logger):
                said = roll_back(root, start, logger)
            logger.warning("stopped (%s): %s", type(exc).__name__, said)
            raise

    notes: list[str] = []
    experiment = matched = None
    recorded = orc.save_experiment and has_commit(root)
    if recorded and set(outcomes.values()) == {"skipped"}:
        matched = matching_run(root)
    if matched:
        logger.info("nothing changed: this run matched %s (not saved again)", matched)
        notes.append(
            f"nothing changed: this run matched {matched}   (reproduce: {matched.reproduce})"
        )
        experiment = matched.experiment
        if unpushed := commit_not_on_remote(root, matched, orc.git_remote):
            notes.append(unpushed)
    elif recorded:
        experiment = experiment_name(run_name, run_id, existing_experiment_names(root))
        message = f"Prefect flow run {run_name} ({run_id})"
        if overrides:
            message += "\n\noverrides: " + " ".join(overrides)
        state = record_experiment.with_options(task_run_name="dvc-exp-save")(
            str(root), experiment, message, return_state=True
        )
        if not state.is_completed():
            return Failed(message=f"dvc exp save failed: {state.message}")
        notes.append(f"experiment: {experiment}   (reproduce: dvc exp apply {experiment})")
    elif orc.save_experiment:
        logger.warning("no git commit yet: this run is not saved as a DVC experiment")
        notes.append("experiment: not saved (no git commit yet: commit once to record runs)")
    if overrides:
        notes += overrides_notes(overrides, keep_params, experiment)
    if orc.push:
        state = push_run.with_options(task_run_name="dvc-push", **retry)(
            str(root), orc.remote, orc.git_remote, experiment, return_state=True
        )
        if not state.is_completed():
            saved = f"; the run is saved as experiment {experiment}" if experiment else ""
            return Failed(message=f"push failed: {state.message}{saved}; retry with `dvc push`")
        notes.append(f"remote: {state.result()}")
    print(leave_artifact(root, format_summary(read_summary(root), outcomes, notes)))
    if matched:
        said = f"nothing changed: matched {matched}"
    else:
        said = f"saved as experiment {experiment}" if experiment else "not saved as an experiment"
    return Completed(message=said, data=outcomes)


def overrides_notes(overrides: list[str], kept: bool, experiment: str | None) -> list[str]:
    """The summary's lines on this run's overrides: where they went, how to keep them, and
    what DVC makes of them afterwards."""
    lines = [f"overrides ({'kept' if kept else 'this run only'}): {' '.join(overrides)}"]
    if kept:
        lines.append("params.yaml keeps them (--keep-params)")
        return lines
    keep = "run again with --keep-params"
    if experiment:
        keep = f"dvc exp apply {experiment} (or run with --keep-params)"
    lines += [
        f"params.yaml is back as it was before this run; to keep these params: {keep}",
        "dvc.lock records them, so the next run without them re-runs the stages they changed",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow.")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of params.yaml for this run (repeatable), e.g. --set "
        "train.max_epochs=2",
    )
    parser.add_argument(
        "--only-if-data-changed",
        action="store_true",
        help="skip every stage when DVC finds the data source unchanged (as the nightly run)",
    )
    parser.add_argument(
        "--keep-params",
        action="store_true",
        help="keep the overrides in params.yaml after a run that completes (by default they "
        "belong to this run only: its experiment records them, params.yaml goes back)",
    )
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    # SIGTERM (`kill`, `timeout`) unwinds like Ctrl-C: the flow puts the workspace back and the
    # temporary Prefect server is stopped. By default it would end the process where it stands.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        # Bad overrides or remotes fail here, in a second or two, before Prefect starts and
        # before anything in the workspace changes. The flow checks again (deployment runs).
        os.chdir(root)
        preflight(root, args.overrides)
    except (ParamsError, PreflightError, OSError) as exc:
        print(f"Pipeline not started: {exc}", file=sys.stderr)
        return 2
    try:
        start_temporary_server()
        state = pipeline(
            overrides=args.overrides,
            only_if_data_changed=args.only_if_data_changed,
            root=str(root),
            keep_params=args.keep_params,
            return_state=True,
        )
    except KeyboardInterrupt:  # one line, not a traceback: the flow has put the workspace back
        print("Pipeline stopped (Ctrl-C); the lines above say what was put back", file=sys.stderr)
        return 128 + signal.SIGINT
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            print("Pipeline stopped (SIGTERM); the lines above say what was put back",
                  file=sys.stderr)  # fmt: skip
        raise
    return exit_code(state, "Pipeline")


if __name__ == "__main__":
    sys.exit(main())
