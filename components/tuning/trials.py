"""One trial of the study as a DVC experiment, and what the experiment recorded.

A trial asks the study for params and runs the real pipeline up to evaluate as ``dvc exp run
--temp -n <study>-t<number> -S key=value ... evaluate``: a temporary copy of the workspace, so
trials run side by side while DVC's lock is held only for the moments DVC needs it
(``--wait-for-lock`` queues them instead of failing). The objective is the validation metric
``tune.metric`` the train stage wrote (``metrics/train.json`` of the experiment), never the
test split; the train stage reports each epoch to the trial (components/trial.py) and stops a
trial the pruner judges unpromising. A trial's ``dvc exp run`` and every process it started are
killed after ``tune.trial_timeout_seconds`` (the trial then FAILs); while it runs, the flow keeps
the trial's heartbeat in the study, so a killed flow's trials are found and failed on resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from components.config import ParamsError, TuneParams, read_params_file
from components.overrides import check_overrides, ignored_by_the_model
from components.records import TRAIN_FILE, VALIDATION_FILE, TrainSummary, parse_train
from components.restore import LOCK_FILE
from components.stage import StageError, failure_reason, venv_env
from components.trial import (
    ENV_METRIC,
    ENV_PRUNER,
    ENV_STORAGE,
    ENV_STUDY,
    ENV_TRIAL_ID,
    PRUNED_MARK,
)
from components.tuning.study import (
    DEFAULTS_ATTR,
    IGNORED_ATTR,
    OUTSIDE_ATTR,
    TIE_BREAK,
    TuneError,
    ask,
    encode,
    experiment_of,
    heartbeat,
)

# One `dvc exp run` at a time through its launch (stash) phase is DVC's own business
# (--wait-for-lock); this only keeps our log lines of two trials from interleaving.
_LOG_LOCK = threading.Lock()
# After the timeout: SIGTERM to the trial's process group (the stage puts its outputs back and
# DVC lets go of its lock), then SIGKILL to whatever is left this many seconds later.
KILL_GRACE_SECONDS = 10.0


def check_trial_overrides(tune: TuneParams, params_file: Path) -> None:
    """``tune.trial_overrides`` (set in every trial) must be valid overrides of params.yaml."""
    try:
        check_overrides(list(tune.trial_overrides), params_file)
    except ParamsError as exc:
        raise TuneError(f"tune.trial_overrides: {exc}") from None


def trial_threads(workers: int, env: dict) -> dict:
    """Share the cores between trials that run at once: torch (OpenMP) takes every core in each
    process otherwise, and two trials of 2 threads on 2 cores ran ~5x slower each than alone.
    A thread count set by the user (OMP_NUM_THREADS) is kept."""
    if workers <= 1 or env.get("OMP_NUM_THREADS"):
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // workers))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=False
    ).stdout.strip()


def experiment_ref(root: Path, name: str) -> str | None:
    """The git ref of the newest experiment called ``name`` (refs/exps/<baseline>/<name>)."""
    refs = _git(root, "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps")
    for ref in refs.split():
        if ref.rsplit("/", 1)[-1] == name and ref.count("/") == 4:
            return ref
    return None


def experiment_rev(root: Path, ref: str) -> str:
    """The commit an experiment's ref points at."""
    return _git(root, "rev-parse", ref)


def experiment_metrics(root: Path, ref: str, metrics_dir: str) -> TrainSummary:
    """The train stage's metrics (train.json) as the experiment recorded them."""
    path = (Path(metrics_dir) / TRAIN_FILE).as_posix()
    text = _git(root, "show", f"{ref}:{path}")
    if not text:
        raise TuneError(f"experiment {ref} has no {path}")
    try:
        return parse_train(text, f"experiment {ref}: {path}")
    except StageError as exc:
        raise TuneError(str(exc)) from None


def _tell(study, trial, value=None, state=None) -> None:
    """``study.tell``; the grid sampler's "grid exhausted" RuntimeError (raised after the
    result is stored, since it tries to stop an ``optimize`` loop we do not use) is no error."""
    with contextlib.suppress(RuntimeError):
        study.tell(trial, value, state=state)


def _command(name: str, sets: list[str]) -> list[str]:
    """``dvc exp run`` of the pipeline up to evaluate, in a temporary copy, as experiment
    ``name`` with the ``-S`` overrides ``sets``."""
    sets_args = (a for s in sets for a in ("-S", s))
    return [
        sys.executable, "-m", "dvc", "--wait-for-lock",
        "exp", "run", "--temp", "-n", name, *sets_args, "evaluate",
    ]  # fmt: skip


# The stages every trial shares: params the study does not search (tune.space is train.*).
SHARED_STAGES = "validate"  # with ingest before it


def prepare_data(root: Path, metrics_dir: str, timeout: float) -> str:
    """Bring ingest and validate up to date in the workspace once, before any trial: a trial is
    a copy of the workspace, so each then finds them unchanged instead of re-running validate
    (its outputs are not in DVC's run-cache), and data that fails validation stops the study
    before it spends its budget. Returns what DVC did, in a line; raises :class:`TuneError`
    with the stage's own reason when a stage fails."""
    command = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", SHARED_STAGES]
    code, output = run_bounded(command, root, venv_env(), timeout)
    if code is None:
        raise TuneError(
            f"ingest and validate ran past {timeout:.0f} s (tune.trial_timeout_seconds)"
        )
    if code != 0:
        why = stage_reason(output)
        raise TuneError(f"the data is not ready for trials, no trial started: {why}")
    # A trial's temporary copy holds what git tracks or has staged, not untracked files. So
    # dvc.lock is staged (DVC's core.autostage does it only where a repository turns it on),
    # and the verdict, a `cache: false` output kept in git like every metrics file: each trial
    # then finds ingest and validate unchanged instead of running them again.
    verdict = Path(metrics_dir) / VALIDATION_FILE
    staged = [name for name in (LOCK_FILE, str(verdict)) if (root / name).is_file()]
    if staged:
        _git(root, "add", "--", *staged)
    ran = [ln.split("'")[1] for ln in output.splitlines() if ln.startswith("Running stage '")]
    done = f"{', '.join(ran)} ran once here" if ran else "ingest and validate up to date"
    return f"data: {done}; every trial reuses them"


def stage_reason(output: str) -> str:
    """The last stage's own failure line in a DVC command's output, else its last line."""
    reasons = [r for r in map(failure_reason, output.splitlines()) if r is not None]
    return reasons[-1] if reasons else (output.strip().splitlines() or ["?"])[-1]


def run_bounded(command: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str]:
    """Run ``command`` as its own process group; return its exit code (None when it ran past
    ``timeout`` seconds and was killed, with every process it started) and its output."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a group of its own: DVC, the stage, its workers
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        pass
    except BaseException:  # the flow itself stops: take the trial's processes with it
        _kill_group(process, signal.SIGKILL)
        raise
    _kill_group(process, signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        _kill_group(process, signal.SIGKILL)
        output, _ = process.communicate()
    _kill_group(process, signal.SIGKILL)  # children that outlived their parent
    return None, output


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _env(url: str, tune: TuneParams, trial) -> dict:
    """The environment of a trial's ``dvc exp run``: where its train stage finds the trial.
    The defaults trial is never pruned: it is what the others are compared with."""
    pruning = tune.pruning.model_dump()
    if DEFAULTS_ATTR in trial.user_attrs:
        pruning["enabled"] = False
    env = {
        **venv_env(),
        ENV_STORAGE: url,
        ENV_STUDY: tune.study_name,
        ENV_TRIAL_ID: str(trial._trial_id),  # Optuna has no public id of a live trial
        ENV_METRIC: tune.metric,
        # Optuna does not store a study's pruner: the stage builds the same one from this.
        ENV_PRUNER: json.dumps(pruning),
    }
    env.update(trial_threads(tune.workers, env))
    return env


def run_trial(
    root: Path,
    url: str,
    tune: TuneParams,
    sampler_key: str,
    logger,
    timeout: float | None = None,
    timeout_reason: str = "tune.trial_timeout_seconds",
) -> dict:
    """Ask the study for params, run them as a DVC experiment up to evaluate, tell the result.
    It is killed after ``timeout`` seconds (``tune.trial_timeout_seconds`` unless given: less
    when a budget ends sooner, which ``timeout_reason`` then names).

    Returns the trial's row: number, experiment, params, seconds, state (COMPLETE, PRUNED or
    FAIL) and its value or the reason it has none; ``defaults`` when it measured params.yaml
    as it is. The trial is never left RUNNING."""
    import optuna

    timeout = tune.trial_timeout_seconds if timeout is None else timeout
    study, trial, values = ask(url, tune, sampler_key)
    name = experiment_of(tune.study_name, trial.number)
    trial.set_user_attr("experiment", name)
    defaults = DEFAULTS_ATTR in trial.user_attrs
    drawn = [f"{key}={encode(v)}" for key, v in values.items()]
    # The keys the drawn model does not read (train.channels for an MLP) change nothing but the
    # experiment's params: left out, the trial's train params are the ones the final run, which
    # refuses such keys, would set, so it can take this trial's model as it is (reuse.py).
    ignored = ignored_by_the_model(drawn, root / "params.yaml")
    sets = [*tune.trial_overrides, *(s for s in drawn if s.partition("=")[0] not in ignored)]
    if defaults:
        kept = trial.user_attrs.get(OUTSIDE_ATTR) or []
        logger.info(
            "trial %d (%s): the defaults, params.yaml as it is%s",
            trial.number,
            name,
            f" (outside the space, kept as they are: {', '.join(kept)})" if kept else "",
        )
    logger.info("trial %d (%s): %s", trial.number, name, " ".join(sets))
    if ignored:
        trial.set_user_attr(IGNORED_ATTR, sorted(ignored))
        logger.info("trial %d: left out, the model ignores them: %s", trial.number,
                    ", ".join(ignored))  # fmt: skip
    started = time.monotonic()
    with heartbeat(study, trial):
        returncode, output = run_bounded(
            _command(name, sets), root, _env(url, tune, trial), timeout
        )
    seconds = time.monotonic() - started
    trial.set_user_attr("seconds", round(seconds, 1))
    with _LOG_LOCK:
        for line in output.splitlines()[-12:]:
            logger.info("[%s] %s", name, line)
    row = {
        "number": trial.number,
        "experiment": name,
        "params": values,
        "seconds": round(seconds, 1),
        "defaults": defaults,
    }
    if returncode is None:
        reason = f"timed out: still running after {timeout:.0f} s ({timeout_reason}); killed"
        trial.set_user_attr("reason", reason)
        _tell(study, trial, state=optuna.trial.TrialState.FAIL)
        logger.info("trial %d: FAIL: %s", trial.number, reason)
        return {**row, "state": "FAIL", "reason": reason}
    if returncode == 0:
        ref = experiment_ref(root, name)
        if ref is None:
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            return {**row, "state": "FAIL", "reason": f"dvc exp run left no experiment {name}"}
        try:
            metrics_dir = str(read_params_file(root / "params.yaml")["paths"]["metrics_dir"])
            metrics = experiment_metrics(root, ref, metrics_dir)
            value = metrics.best(tune.metric)
        except (TuneError, StageError, KeyError, TypeError, ValueError, OSError) as exc:
            # Never leave the trial RUNNING in the study: a resumed study would wait on it.
            reason = f"experiment {name} has no usable best_{tune.metric} in train.json ({exc})"
            trial.set_user_attr("reason", reason[:300])
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            return {**row, "state": "FAIL", "reason": reason}
        trial.set_user_attr("epochs_run", metrics.epochs_run)
        trial.set_user_attr(TIE_BREAK, metrics.best_val_loss)  # between equal values
        _tell(study, trial, value)
        logger.info("trial %d: %s %.4f in %.0f s", trial.number, tune.metric, value, seconds)
        return {**row, "state": "COMPLETE", "value": value}
    reason = stage_reason(output)
    trial.set_user_attr("reason", reason[:300])  # before tell: a finished trial is read-only
    if PRUNED_MARK in output:
        _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
        trial_state = "PRUNED"
    else:
        _tell(study, trial, state=optuna.trial.TrialState.FAIL)
        trial_state = "FAIL"
    logger.info("trial %d: %s: %s", trial.number, trial_state, reason)
    return {**row, "state": trial_state, "reason": reason}
