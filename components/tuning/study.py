"""The Optuna study: its storage, search space, sampler, pruner and each trial's params.

The study lives in Optuna storage (SQLite under build/tune/ by default, or a database URL whose
password comes from the environment), so opening it again resumes it and workers on other
machines can share it. The flow keeps a heartbeat for each trial it runs; resuming marks FAIL the
trials a killed flow left RUNNING (no heartbeat for a while, or older than a trial may run).
Values go to DVC and Hydra as compact JSON (:func:`encode`); a choice that is not a plain value
(a list of layer sizes) is offered to Optuna as its JSON text. The defaults (params.yaml as it
is) are the study's first trial, measured as every other one (:func:`enqueue_defaults`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
import warnings
from datetime import datetime, timedelta
from pathlib import Path

from components.config import (
    STORAGE_PASSWORD_ENV,
    ParamsError,
    SearchDimension,
    TuneParams,
    read_params_file,
)
from components.overrides import check_overrides
from components.stage import redact
from components.trial import open_storage, pruner_from

DEFAULT_STORAGE = Path("build") / "tune" / "optuna.db"
# Not a model's params. The data's sections neither: trials must be compared on one validation
# split, and the best trial's test split must be unseen by every ensemble member.
UNTUNABLE_SECTIONS = ("paths", "orchestrate", "tune", "ingest", "validate")
# The flow records a heartbeat per running trial this often; a RUNNING trial whose last one is
# older than the grace period belongs to a flow that was killed.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
# A trial that measures params.yaml as it is carries the params' fingerprint in this user attr,
# and in the other the space's keys whose params.yaml value lies outside the space (the trial
# keeps them as they are: Optuna records no value outside a dimension).
DEFAULTS_ATTR = "defaults"
OUTSIDE_ATTR = "defaults_outside_space"
# A trial's drawn keys that its model does not read (train.channels for an MLP): left out of its
# experiment (components/tuning/trials.py), and so out of the best params.
IGNORED_ATTR = "ignored_by_the_model"
# What a trial's validation metric depends on; the other sections only act after evaluate.
MEASURED_SECTIONS = ("ingest", "validate", "train")


class TuneError(ValueError):
    """The study cannot start as configured; the message names the key."""


def storage_url(root: Path, tune: TuneParams) -> str:
    """The study's database URL; a relative SQLite path is taken from the repository root (the
    train stage of a trial runs in a temporary copy and must find the same file)."""
    url = tune.storage or f"sqlite:///{DEFAULT_STORAGE}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) != ":memory:":
            path = (Path(root) / path).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
    if url.endswith(":memory:"):
        raise TuneError("tune.storage: an in-memory database cannot be shared with the trials")
    password = os.environ.get(STORAGE_PASSWORD_ENV)
    if password and not url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        url = make_url(url).set(password=password).render_as_string(hide_password=False)
    return url


def shown(url: str) -> str:
    """The storage URL as logs and reports show it: no user, password or query."""
    return redact(url)


def encode(value) -> str:
    """A value as ``-S`` / ``--set`` take it (YAML and Hydra both read compact JSON)."""
    return json.dumps(value, separators=(",", ":"))


def _is_plain(value) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def dimension_values(dim: SearchDimension) -> list:
    """The values of one dimension that must each validate: every choice, or both ends."""
    if dim.choices is not None:
        return list(dim.choices)
    return [dim.low, dim.high]


def check_space(tune: TuneParams, params_file: Path) -> None:
    """Every key of ``tune.space`` must be a param of params.yaml and every choice (and both
    ends of every range) a value params.yaml accepts there. Raises :class:`TuneError` naming
    the key, before any trial starts."""
    raw = read_params_file(params_file)  # once: each value is checked on a copy of it
    for key, dim in tune.space.items():
        where = f"tune.space.{key}"
        if key.split(".")[0] in UNTUNABLE_SECTIONS:
            raise TuneError(
                f"{where}: {key.split('.')[0]}.* is not a model param (the data and its splits "
                "stay fixed across trials); tune another"
            )
        for value in dimension_values(dim):
            try:
                check_overrides([f"{key}={encode(value)}"], params_file, copy.deepcopy(raw))
            except ParamsError as exc:
                what = "choice" if dim.choices is not None else "range end"
                detail = str(exc).replace("invalid params: ", "")
                raise TuneError(f"{where}: {what} {value!r} is refused: {detail}") from None


def direction(tune: TuneParams) -> str:
    return "minimize" if tune.metric in ("val_loss", "val_rmse") else "maximize"


def grid_space(tune: TuneParams) -> dict[str, list]:
    grid = {}
    for key, dim in tune.space.items():
        if dim.choices is not None:
            choices = list(dim.choices)
            grid[key] = choices if all(map(_is_plain, choices)) else [encode(c) for c in choices]
        else:
            step = int(dim.step or 1)
            grid[key] = list(range(int(dim.low), int(dim.high) + 1, step))
    return grid


def make_sampler(tune: TuneParams, offset: int = 0):
    """The sampler; ``offset`` (the trials the study already had) moves the seed, so a resumed
    study does not draw its first trials' random params again."""
    import optuna

    seed = tune.seed + offset
    if tune.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(tune), seed=tune.seed)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


# One sampler per study and process, shared by the worker threads: samplers keep their own
# random state, and a fresh one per trial (same seed) would draw the same params every time.
# Asking is serialised (samplers are not thread-safe); running the trials is not.
_SAMPLERS: dict[str, object] = {}
_ASK_LOCK = threading.Lock()


def shared_sampler(url: str, tune: TuneParams, offset: int) -> str:
    """Make (once) this process's sampler for the study; returns its key for the trials."""
    key = json.dumps([url, tune.study_name, tune.sampler, tune.seed, grid_space(tune)])
    if key not in _SAMPLERS:
        _SAMPLERS[key] = make_sampler(tune, offset)
    return key


def grid_exhausted(sampler_key: str, study) -> bool:
    """Whether the shared sampler is a grid whose every point the study has tried (other
    samplers never run out)."""
    import optuna

    sampler = _SAMPLERS[sampler_key]
    return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)


def open_study(url: str, tune: TuneParams, create: bool = False, sampler=None):
    """The study, created on first use and resumed afterwards (``load_if_exists``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = sampler or make_sampler(tune)
    storage = open_storage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
    pruner = pruner_from(tune.pruning.model_dump())
    if create:
        study = optuna.create_study(
            storage=storage,
            study_name=tune.study_name,
            direction=direction(tune),
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
        wanted = optuna.study.StudyDirection[direction(tune).upper()]
        if study.direction != wanted:
            raise TuneError(
                f"tune.study_name: study {tune.study_name!r} in {shown(url)} was made to "
                f"{study.direction.name.lower()} and tune.metric {tune.metric} needs "
                f"{direction(tune)}: use another study name"
            )
        return study
    return optuna.load_study(
        study_name=tune.study_name, storage=storage, sampler=sampler, pruner=pruner
    )


def suggest(trial, key: str, dim: SearchDimension):
    """The trial's value for one key of the space."""
    if dim.choices is not None:
        choices = list(dim.choices)
        if all(map(_is_plain, choices)):
            return trial.suggest_categorical(key, choices)
        return json.loads(trial.suggest_categorical(key, [encode(c) for c in choices]))
    if dim.is_int:
        return trial.suggest_int(
            key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log
        )
    return trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)


def ask(url: str, tune: TuneParams, sampler_key: str = ""):
    """A new trial of the study and its params (``{key: value}`` for every key of the space;
    the defaults trial leaves out the keys whose value lies outside it), drawn by this
    process's shared sampler when ``sampler_key`` names one."""
    with _ASK_LOCK, warnings.catch_warnings():
        # "Heartbeat of storage is supposed to be used with Study.optimize": the trials' heartbeat
        # is the flow's own (components/tuning/trials.py), around each `dvc exp run`.
        warnings.simplefilter("ignore", UserWarning)
        study = open_study(url, tune, sampler=_SAMPLERS.get(sampler_key))
        trial = study.ask()  # an enqueued trial (the defaults) first
        outside = set(trial.user_attrs.get(OUTSIDE_ATTR, ()))
        values = {
            key: suggest(trial, key, dim) for key, dim in tune.space.items() if key not in outside
        }
    return study, trial, values


# ---------------------------------------------------------------------------------------------
# The defaults: params.yaml as it is, the study's first trial


def param_value(raw: dict, key: str):
    """The value of a dotted key in params.yaml's mapping (``train.augment.crop_padding``)."""
    node = raw
    for part in key.split("."):
        node = node[part]
    return node


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return encode(a) == encode(b)


def contains(dim: SearchDimension, value) -> bool:
    """Whether ``value`` is a point of the dimension: one of its choices, or in its range (on
    its step, an integer for an integer range)."""
    if dim.choices is not None:
        return any(_same(value, choice) for choice in dim.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not dim.low <= value <= dim.high:
        return False
    if dim.is_int:
        return float(value).is_integer() and (int(value) - dim.low) % (dim.step or 1) == 0
    if dim.step:
        k = (value - dim.low) / dim.step
        return abs(k - round(k)) < 1e-9
    return True


def defaults_fingerprint(raw: dict) -> str:
    """What identifies the defaults a trial measured: params.yaml's sections that decide the
    validation metric. Another run with the same ones reuses that trial instead of another."""
    measured = {section: raw.get(section) for section in MEASURED_SECTIONS}
    return hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:16]


def defaults_trials(study, fingerprint: str, states=None) -> list:
    """The study's trials that measured these defaults, in trial order (``states``: only
    those)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=states)
        if t.user_attrs.get(DEFAULTS_ATTR) == fingerprint
    ]


def measured_defaults(study, fingerprint: str):
    """The newest COMPLETE trial of these defaults, or None."""
    import optuna

    done = defaults_trials(study, fingerprint, (optuna.trial.TrialState.COMPLETE,))
    return done[-1] if done else None


def enqueue_defaults(study, tune: TuneParams, raw: dict) -> tuple[str, list[str]]:
    """Make params.yaml's values the study's next trial (Optuna's queue: the next ``ask``),
    unless a trial of the same defaults finished or waits already. Returns the fingerprint and
    the space's keys whose value lies outside the space (that trial keeps them as params.yaml
    has them: it measures the defaults, not a point of the space)."""
    import optuna

    fingerprint = defaults_fingerprint(raw)
    state = optuna.trial.TrialState
    found = state.WAITING, state.RUNNING, state.COMPLETE  # a failed one is measured again
    fixed, outside = {}, []
    for key, dim in tune.space.items():
        value = param_value(raw, key)
        if not contains(dim, value):
            outside.append(key)
        elif dim.choices is not None and not all(map(_is_plain, dim.choices)):
            fixed[key] = encode(value)  # offered to Optuna as its JSON text
        else:
            fixed[key] = value
    if not defaults_trials(study, fingerprint, found):
        study.enqueue_trial(fixed, user_attrs={DEFAULTS_ATTR: fingerprint, OUTSIDE_ATTR: outside})
    return fingerprint, outside


@contextlib.contextmanager
def heartbeat(study, trial, every: float = HEARTBEAT_SECONDS):
    """Record the trial's heartbeat in the study's storage now and every ``every`` seconds while
    the block runs: a flow killed meanwhile leaves a RUNNING trial whose heartbeat goes stale."""
    storage, stop = study._storage, threading.Event()  # Optuna's own heartbeat thread does so
    storage.record_heartbeat(trial._trial_id)

    def beat() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # a busy database: the next beat will do
                storage.record_heartbeat(trial._trial_id)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study, trial_timeout_seconds: float) -> list[int]:
    """Mark FAIL the trials a killed flow left RUNNING; return their numbers.

    Stale: no heartbeat for the storage's grace period (what Optuna's ``fail_stale_trials`` looks
    for), or started longer ago than a trial may run (``tune.trial_timeout_seconds``, plus the
    grace): a trial of a flow that recorded no heartbeat (an older version). A trial that
    another live flow runs keeps its heartbeat fresh and is left alone.
    """
    import optuna

    storage = study._storage
    stale = set(storage._get_stale_trial_ids(study._study_id))  # Optuna's own test
    rdb = getattr(storage, "_backend", storage)  # under Optuna's cache: our RDBStorage
    grace = rdb.grace_period or 2 * (rdb.heartbeat_interval or 0)
    too_old = datetime.now() - timedelta(seconds=trial_timeout_seconds + grace)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = trial.datetime_start
        if trial._trial_id not in stale and not (started and started < too_old):
            continue
        try:  # the reason first: a finished trial is read-only
            storage.set_trial_user_attr(
                trial._trial_id, "reason", "left RUNNING by a flow that stopped: marked FAIL"
            )
            storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished (or another flow failed it) meanwhile
        failed.append(trial.number)
    return failed


def finished(study) -> list:
    """The study's COMPLETE trials (a value each), in trial order."""
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


# The trial attribute that breaks ties on tune.metric: a small validation split saturates
# (every good trial at val_accuracy 1.000), and Optuna's best_trial is then simply the first.
TIE_BREAK = "val_loss"


def ranked(study, tune: TuneParams) -> list:
    """The finished trials, best first: by tune.metric; among equals the defaults trial (a
    split that cannot tell them apart is no reason to leave the defaults), then the lower
    validation loss, then the earlier trial."""
    sign = -1.0 if direction(tune) == "maximize" else 1.0
    return sorted(
        finished(study),
        key=lambda t: (
            sign * t.value,
            DEFAULTS_ATTR not in t.user_attrs,
            t.user_attrs.get(TIE_BREAK, float("inf")),
            t.number,
        ),
    )


def best_of(study, tune: TuneParams):
    """The best finished trial (:func:`ranked`); a ValueError when none finished."""
    trials = ranked(study, tune)
    if not trials:
        raise ValueError("no trial of the study has finished")
    return trials[0]


def best_overrides(study, tune: TuneParams) -> list[str]:
    """The best trial's params as ``key=value`` overrides of params.yaml, without the ones its
    model ignores (they were not set in its experiment either)."""
    best = best_of(study, tune)
    ignored = set(best.user_attrs.get(IGNORED_ATTR) or ())
    out = []
    for key, dim in tune.space.items():
        if key not in best.params or key in ignored:  # the defaults trial kept params.yaml's
            continue
        value = best.params[key]
        if dim.choices is not None and not all(map(_is_plain, dim.choices)):
            value = json.loads(value)
        out.append(f"{key}={encode(value)}")
    return out


def experiment_of(study_name: str, number: int) -> str:
    """The DVC experiment name of a trial."""
    return f"{study_name}-t{number}"
