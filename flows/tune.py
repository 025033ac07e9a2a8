"""Tuning as a Prefect flow: an Optuna study whose every trial is a DVC experiment.

    python -m flows.tune                              # the study in params.yaml's tune section
    python -m flows.tune --set tune.n_trials=20 --workers 2
    make tune WORKERS=2

Each trial asks the study for params from ``tune.space`` and runs the real pipeline up to
evaluate as ``dvc exp run --temp -n <study>-t<number> -S key=value ... evaluate``: a temporary
copy of the workspace, so trials run side by side (``tune.workers``) while DVC's lock is held
only for the moments DVC needs it (``--wait-for-lock`` queues them instead of failing). Every
trial is then a named experiment: ``dvc exp show`` lists them with params and metrics, and
``dvc exp apply <study>-t3 && dvc repro`` reproduces one. The objective is the validation metric
``tune.metric`` the train stage wrote (``metrics/train.json``), never the test split. The
train stage reports each epoch's metric to the trial (components/trial.py) and a trial the
pruner judges unpromising stops there.

The study lives in Optuna storage (SQLite under build/tune/ by default, or a database URL), so
running the flow again resumes it, and workers on other machines can share it. At the end the
best trial's params go through the whole pipeline (``flows.pipeline``: written to params.yaml,
every gate, packaged, saved as an experiment), an ensemble of the top-k trials is built,
checked, measured and gated (components/ensemble.py), and ``reports/tuning.html`` shows the
trials, the objective over trials and the params' importance.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from components.stage import FAILURE_PREFIX, set_quiet_env

set_quiet_env()  # before Prefect is imported: it reads PREFECT_HOME at import

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from components.config import (  # noqa: E402
    Params,
    ParamsError,
    SearchDimension,
    TuneParams,
    check_overrides,
)
from components.trial import (  # noqa: E402
    ENV_METRIC,
    ENV_PRUNER,
    ENV_STORAGE,
    ENV_STUDY,
    ENV_TRIAL_ID,
    PRUNED_MARK,
    open_storage,
    pruner_from,
)
from flows.experiments import BUSY, NOT_STARTED, PreflightError, exit_code  # noqa: E402
from flows.workspace_lock import WorkspaceBusy, workspace_lock  # noqa: E402

DEFAULT_STORAGE = Path("build") / "tune" / "optuna.db"
# Not a model's params. The data's sections neither: trials must be compared on one validation
# split, and the best trial's test split must be unseen by every ensemble member.
UNTUNABLE_SECTIONS = ("paths", "orchestrate", "tune", "ingest", "validate")


class TuneError(ValueError):
    """The study cannot start as configured; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Checks before any trial


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
    return url


def _encode(value) -> str:
    """A value as ``-S`` / ``--set`` take it (YAML and Hydra both read compact JSON)."""
    return json.dumps(value, separators=(",", ":"))


def dimension_values(dim: SearchDimension) -> list:
    """The values of one dimension that must each validate: every choice, or both ends."""
    if dim.choices is not None:
        return list(dim.choices)
    return [dim.low, dim.high]


def check_space(tune: TuneParams, params_file: Path) -> None:
    """Every key of ``tune.space`` must be a param of params.yaml and every choice (and both
    ends of every range) a value params.yaml accepts there. Raises :class:`TuneError` naming
    the key, before any trial starts."""
    for key, dim in tune.space.items():
        where = f"tune.space.{key}"
        if key.split(".")[0] in UNTUNABLE_SECTIONS:
            raise TuneError(
                f"{where}: {key.split('.')[0]}.* is not a model param (the data and its splits "
                "stay fixed across trials); tune another"
            )
        for value in dimension_values(dim):
            try:
                check_overrides([f"{key}={_encode(value)}"], params_file)
            except ParamsError as exc:
                what = "choice" if dim.choices is not None else "range end"
                detail = str(exc).replace("invalid params: ", "")
                raise TuneError(f"{where}: {what} {value!r} is refused: {detail}") from None


def tune_params(root: Path, overrides: list[str]) -> Params:
    """params.yaml with ``--set tune.*`` overrides applied in memory (nothing is written:
    tuning settings are not the model's params and must not dirty the workspace)."""
    from flows.pipeline import params_with_overrides

    for item in overrides:
        if not item.startswith("tune."):
            raise TuneError(
                f"override {item!r}: flows.tune takes tune.* keys; the params it searches "
                "are tune.space, the others are params.yaml's"
            )
    return params_with_overrides(root, overrides)


TASK_METRICS = {
    "classification": ("val_loss", "val_accuracy"),
    "regression": ("val_loss", "val_rmse"),
}


def check_metric_fits_task(params: Params, root: Path) -> None:
    """``tune.metric`` must be one the train stage logs for this data's task (the task of the
    prepared data when there is some, else ``ingest.task`` when it is not ``auto``), and every
    model the space offers must read this kind of data (a cnn needs images, ...)."""
    from components.dataset import DatasetMeta, meta_path

    task = params.ingest.task if params.ingest.task != "auto" else None
    meta_file = meta_path(root / params.paths.prepared_dir)
    if meta_file.is_file():
        task = DatasetMeta.load(meta_file).task
    if task is not None and params.tune.metric not in TASK_METRICS[task]:
        raise TuneError(
            f"tune.metric {params.tune.metric}: the data is a {task} task, whose train stage "
            f"logs {' and '.join(TASK_METRICS[task])}"
        )
    from components.ingest import resolve_kind

    kind = DatasetMeta.load(meta_file).kind if meta_file.is_file() else resolve_kind(params.ingest)
    unfit = {"image": (), "sequence": ("cnn",), "table": ("cnn", "lstm", "gru")}[kind]
    dim = params.tune.space.get("train.model")
    choices = list(dim.choices) if dim is not None and dim.choices is not None else []
    for model in choices or [params.train.model]:
        if model in unfit:
            where = "tune.space.train.model: choice" if choices else "train.model"
            fits = [m for m in ("cnn", "mlp", "lstm", "gru") if m not in unfit]
            raise TuneError(
                f"{where} {model!r} cannot read this data (a {kind}); use {', '.join(fits)}"
            )


def preflight(root: Path, overrides: list[str]) -> tuple[Params, str]:
    if not (root / "dvc.yaml").is_file():
        raise TuneError(f"{root} has no dvc.yaml: run from the repository root")
    params = tune_params(root, overrides)
    check_space(params.tune, root / "params.yaml")
    check_metric_fits_task(params, root)
    try:
        check_overrides(list(params.tune.trial_overrides), root / "params.yaml")
    except ParamsError as exc:
        raise TuneError(f"tune.trial_overrides: {exc}") from None
    from flows.experiments import has_commit

    if not has_commit(root):
        raise TuneError("trials are DVC experiments, which need a git commit: commit once first")
    return params, storage_url(root, params.tune)


# ---------------------------------------------------------------------------------------------
# The study


def direction(tune: TuneParams) -> str:
    return "minimize" if tune.metric in ("val_loss", "val_rmse") else "maximize"


def _is_plain(value) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def grid_space(tune: TuneParams) -> dict[str, list]:
    grid = {}
    for key, dim in tune.space.items():
        if dim.choices is not None:
            choices = list(dim.choices)
            grid[key] = choices if all(map(_is_plain, choices)) else [_encode(c) for c in choices]
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


def make_pruner(tune: TuneParams):
    return pruner_from(tune.pruning.model_dump())


def open_study(url: str, tune: TuneParams, create: bool = False, sampler=None):
    """The study, created on first use and resumed afterwards (``load_if_exists``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = sampler or make_sampler(tune)
    pruner, storage = make_pruner(tune), open_storage(url)
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
                f"tune.study_name: study {tune.study_name!r} in {url} was made to "
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
        return json.loads(trial.suggest_categorical(key, [_encode(c) for c in choices]))
    if dim.is_int:
        return trial.suggest_int(
            key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log
        )
    return trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)


def experiment_of(study_name: str, number: int) -> str:
    return f"{study_name}-t{number}"


# ---------------------------------------------------------------------------------------------
# One trial


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


def experiment_metrics(root: Path, ref: str, metrics_dir: str) -> dict:
    path = (Path(metrics_dir) / "train.json").as_posix()
    text = _git(root, "show", f"{ref}:{path}")
    if not text:
        raise TuneError(f"experiment {ref} has no {path}")
    return json.loads(text)


# One `dvc exp run` at a time through its launch (stash) phase is DVC's own business
# (--wait-for-lock); this only keeps our log lines of two trials from interleaving.
_LOG_LOCK = threading.Lock()


def _metrics_dir(root: Path) -> str:
    from components.config import read_params_file

    return str(read_params_file(root / "params.yaml")["paths"]["metrics_dir"])


def _tell(study, trial, value=None, state=None) -> None:
    """``study.tell``; the grid sampler's "grid exhausted" RuntimeError (raised after the
    result is stored, since it tries to stop an ``optimize`` loop we do not use) is no error."""
    with contextlib.suppress(RuntimeError):
        study.tell(trial, value, state=state)


def trial_threads(workers: int, env: dict) -> dict:
    """Share the cores between trials that run at once: torch (OpenMP) takes every core in each
    process otherwise, and two trials of 2 threads on 2 cores ran ~5x slower each than alone.
    A thread count set by the user (OMP_NUM_THREADS) is kept."""
    if workers <= 1 or env.get("OMP_NUM_THREADS"):
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // workers))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


@task(retries=0)
def run_trial(root: str, url: str, tune_json: dict, sampler_key: str = "") -> dict:
    """Ask the study for params, run them as a DVC experiment up to evaluate, tell the result."""
    import optuna

    logger = get_run_logger()
    root_path = Path(root)
    tune = TuneParams.model_validate(tune_json)
    with _ASK_LOCK:
        sampler = _SAMPLERS.get(sampler_key)
        study = open_study(url, tune, sampler=sampler)
        trial = study.ask()
        values = {key: suggest(trial, key, dim) for key, dim in tune.space.items()}
    name = experiment_of(tune.study_name, trial.number)
    trial.set_user_attr("experiment", name)
    sets = [*tune.trial_overrides, *(f"{key}={_encode(v)}" for key, v in values.items())]
    command = [
        sys.executable,
        "-m",
        "dvc",
        "--wait-for-lock",
        "exp",
        "run",
        "--temp",
        "-n",
        name,
        *(a for s in sets for a in ("-S", s)),
        "evaluate",
    ]
    env = {
        **os.environ,
        # dvc.yaml's commands say `python`: this interpreter (the project's venv).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        ENV_STORAGE: url,
        ENV_STUDY: tune.study_name,
        ENV_TRIAL_ID: str(trial._trial_id),
        ENV_METRIC: tune.metric,
        # Optuna does not store a study's pruner: the stage builds the same one from this.
        ENV_PRUNER: json.dumps(tune.pruning.model_dump()),
    }
    env.update(trial_threads(tune.workers, env))
    logger.info("trial %d (%s): %s", trial.number, name, " ".join(sets))
    started = time.monotonic()
    process = subprocess.run(
        command, cwd=root_path, env=env, capture_output=True, text=True, check=False
    )
    seconds = time.monotonic() - started
    output = process.stdout + process.stderr
    trial.set_user_attr("seconds", round(seconds, 1))
    with _LOG_LOCK:
        for line in output.splitlines()[-12:]:
            logger.info("[%s] %s", name, line)
    row = {
        "number": trial.number,
        "experiment": name,
        "params": values,
        "seconds": round(seconds, 1),
    }
    if process.returncode == 0:
        ref = experiment_ref(root_path, name)
        if ref is None:
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            return {**row, "state": "FAIL", "reason": f"dvc exp run left no experiment {name}"}
        try:
            metrics = experiment_metrics(root_path, ref, _metrics_dir(root_path))
            value = float(metrics[f"best_{tune.metric}"])
        except (KeyError, TypeError, ValueError, OSError) as exc:
            # Never leave the trial RUNNING in the study: a resumed study would wait on it.
            reason = f"experiment {name} has no usable best_{tune.metric} in train.json ({exc})"
            trial.set_user_attr("reason", reason[:300])
            _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            return {**row, "state": "FAIL", "reason": reason}
        trial.set_user_attr("epochs_run", metrics.get("epochs_run"))
        _tell(study, trial, value)
        logger.info("trial %d: %s %.4f in %.0f s", trial.number, tune.metric, value, seconds)
        return {**row, "state": "COMPLETE", "value": value}
    reasons = [
        line.split(FAILURE_PREFIX, 1)[1].strip()
        for line in output.splitlines()
        if FAILURE_PREFIX in line
    ]
    reason = reasons[-1] if reasons else (output.strip().splitlines() or ["?"])[-1]
    trial.set_user_attr("reason", reason[:300])  # before tell: a finished trial is read-only
    if PRUNED_MARK in output:
        _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
        trial_state = "PRUNED"
    else:
        _tell(study, trial, state=optuna.trial.TrialState.FAIL)
        trial_state = "FAIL"
    logger.info("trial %d: %s: %s", trial.number, trial_state, reason)
    return {**row, "state": trial_state, "reason": reason}


# ---------------------------------------------------------------------------------------------
# The table, the plots and the page


def trials_table(study) -> list[dict]:
    rows = []
    for t in study.trials:
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "experiment": t.user_attrs.get("experiment", ""),
                "seconds": t.user_attrs.get("seconds"),
                "epochs_run": t.user_attrs.get("epochs_run"),
                "last_epoch_reported": max(t.intermediate_values)
                if t.intermediate_values
                else None,
                "reason": t.user_attrs.get("reason", ""),
                **{
                    f"param:{k}": json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v
                    for k, v in t.params.items()
                },
            }
        )
    return rows


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path, json_path = out_dir / "trials.csv", out_dir / "trials.json"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()}
            )
    json_path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return csv_path, json_path


def importances(study) -> dict[str, float]:
    """Optuna's parameter importance (PED-ANOVA); {} with too few finished trials."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def _png(fig) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(rows: list[dict], ranked: dict[str, float], metric: str, maximise: bool) -> dict:
    """The objective over trials (with the best so far) and the params' importance, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = {}
    done = [r for r in rows if r["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if done:
        xs, ys = [r["number"] for r in done], [r["value"] for r in done]
        ax.scatter(xs, ys, label="trial", color="#4477aa")
        best, line = None, []
        for y in ys:
            best = y if best is None else (max(best, y) if maximise else min(best, y))
            line.append(best)
        ax.step(xs, line, where="post", color="#cc6677", label="best so far")
    for r in rows:
        if r["state"] == "PRUNED":
            ax.axvline(r["number"], color="#bbbbbb", lw=0.8, ls=":")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (validation)")
    ax.legend(loc="best", fontsize=8)
    out["objective"] = _png(fig)
    plt.close(fig)
    if ranked:
        fig, ax = plt.subplots(figsize=(6, 0.4 + 0.35 * len(ranked)))
        names = list(ranked)[::-1]
        ax.barh(names, [ranked[n] for n in names], color="#228833")
        ax.set_xlabel("importance (PED-ANOVA, normalised)")
        out["importance"] = _png(fig)
        plt.close(fig)
    return out


def write_page(path: Path, summary: dict, rows: list[dict], images: dict) -> Path:
    """reports/tuning.html: self-contained (plots inlined as PNG, no CDN, no JavaScript)."""
    from html import escape

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return escape("" if v is None else json.dumps(v) if isinstance(v, list) else str(v))

    columns = list(dict.fromkeys(k for row in rows for k in row if k != "reason"))
    head = "".join(f"<th>{escape(c.removeprefix('param:'))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    facts = "".join(
        f"<tr><th>{escape(k)}</th><td>{cell(v)}</td></tr>"
        for k, v in summary.items()
        if not isinstance(v, dict)
    )
    ensemble = summary.get("ensemble") or {}
    ens_rows = ""
    for label, m in (
        ("best single model", ensemble.get("best_single")),
        ("ensemble", ensemble.get("ensemble")),
    ):
        if m:
            ens_rows += (
                f"<tr><td>{label}</td><td>{m['accuracy']:.4f}</td><td>{m['macro_f1']:.4f}</td>"
                f"<td>{m['size_bytes'] / 1024:.1f}</td><td>{m['latency_ms_batch1']:.4f}</td></tr>"
            )
    ens_html = (
        "<h2>Ensemble vs the best single model (test split)</h2><table><tr><th>model</th>"
        "<th>accuracy</th><th>macro F1</th><th>KiB</th><th>ms at batch 1</th></tr>"
        f"{ens_rows}</table><p>{escape(ensemble.get('verdict', ''))}</p>"
        if ens_rows
        else f"<p>{escape(ensemble.get('note', ''))}</p>"
    )
    pics = "".join(
        f'<h2>{escape(title)}</h2><img alt="{escape(title)}" src="data:image/png;base64,{b64}">'
        for title, b64 in (
            ("Objective over trials", images.get("objective")),
            ("Parameter importance", images.get("importance")),
        )
        if b64
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Tuning: "
        f"{escape(summary['study'])}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "font-size:13px;text-align:left}</style></head><body>"
        f"<h1>Tuning study {escape(summary['study'])}</h1><table>{facts}</table>{pics}"
        f"<h2>Trials</h2><table><tr>{head}</tr>{body}</table>{ens_html}</body></html>\n"
    )
    return path


# ---------------------------------------------------------------------------------------------
# The flow


def _best_overrides(study, tune: TuneParams) -> list[str]:
    best = study.best_trial
    out = []
    for key, dim in tune.space.items():
        value = best.params[key]
        if dim.choices is not None and not all(map(_is_plain, dim.choices)):
            value = json.loads(value)
        out.append(f"{key}={_encode(value)}")
    return out


# Threads: each trial waits on its own `dvc exp run`; _run_trials keeps tune.workers running.
@flow(name="tune", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def tune(
    overrides: list[str] | None = None,
    root: str = ".",
    final_run: bool | None = None,
    ensemble: bool = True,
    package_ensemble: bool = False,
):
    """Run (or resume) the study: ``tune.n_trials`` trials or ``tune.timeout_seconds``,
    ``tune.workers`` at a time; then the best params through the whole pipeline, the ensemble
    of the top-k trials, and reports/tuning.html. Returns the summary dict."""
    import optuna

    logger = get_run_logger()
    root_path = Path(root).resolve()
    os.chdir(root_path)
    try:
        params, url = preflight(root_path, list(overrides or []))
        study = open_study(url, params.tune, create=True)
    except (ParamsError, PreflightError, TuneError) as exc:
        return Failed(name=NOT_STARTED, message=str(exc))
    cfg = params.tune
    before = len(study.trials)
    logger.info(
        "study %r in %s: %s",
        cfg.study_name,
        url,
        f"resumed with {before} trial(s)" if before else "new",
    )
    try:
        with workspace_lock(root_path, run=f"tune {cfg.study_name}"):
            results = _run_trials(root_path, url, cfg, study)
    except WorkspaceBusy as exc:
        return Failed(name=BUSY, message=str(exc))

    study = open_study(url, cfg)
    rows = trials_table(study)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    summary: dict = {
        "study": cfg.study_name,
        "storage": url,
        "sampler": cfg.sampler,
        "metric": f"{cfg.metric} ({direction(cfg)}, validation split)",
        "trials_before": before,
        "trials_this_run": len(results),
        "trials_total": len(rows),
        "complete": len(complete),
        "pruned": sum(r["state"] == "PRUNED" for r in rows),
        "failed": sum(r["state"] == "FAIL" for r in rows),
    }
    reports_dir = root_path / params.paths.reports_dir
    out_dir = reports_dir / "tuning"
    final_state = None
    if complete:
        best = study.best_trial
        summary.update(
            best_trial=best.number,
            best_value=best.value,
            best_experiment=best.user_attrs.get("experiment"),
            best_params=" ".join(_best_overrides(study, cfg)),
        )
        logger.info(
            "best: trial %d (%s) %s %.4f: %s",
            best.number,
            summary["best_experiment"],
            cfg.metric,
            best.value,
            summary["best_params"],
        )
        if cfg.final_run if final_run is None else final_run:
            from flows.pipeline import pipeline

            final_state = pipeline(
                overrides=_best_overrides(study, cfg), root=str(root_path), return_state=True
            )
            summary["final_run"] = final_state.message or final_state.name
            os.chdir(root_path)
        if ensemble and cfg.ensemble.top_k >= 2:
            try:
                summary["ensemble"] = _ensemble(root_path, params, study, out_dir, package_ensemble)
            except Exception as exc:  # DVC, ONNX, BentoML: the study's results stand regardless
                reason = " ".join(str(exc).split()) or type(exc).__name__
                logger.warning("ensemble failed: %s", reason)
                summary["ensemble"] = {"note": f"ensemble failed ({type(exc).__name__}): {reason}"}
    write_table(rows, out_dir)
    ranked = importances(study)
    summary["importance"] = {k: round(v, 4) for k, v in ranked.items()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    images = plots(rows, ranked, cfg.metric, direction(cfg) == "maximize")
    page = write_page(reports_dir / "tuning.html", summary, rows, images)
    print(format_summary(summary, page))
    if final_state is not None and not final_state.is_completed():
        return Failed(
            message=f"the final run with the best params failed: {final_state.message}",
            data=summary,
        )
    if not complete:
        return Failed(message="no trial finished: see the trials table", data=summary)
    return Completed(message=f"best trial {summary['best_trial']}", data=summary)


def _run_trials(root: Path, url: str, cfg: TuneParams, study) -> list[dict]:
    """Keep ``cfg.workers`` trials running until the count or the wall-time budget is spent."""
    deadline = time.monotonic() + cfg.timeout_seconds
    results, running, started = [], set(), 0
    tune_json = cfg.model_dump(mode="json")
    sampler_key = shared_sampler(url, cfg, offset=len(study.trials))
    sampler = _SAMPLERS[sampler_key]
    while True:
        while (
            started < cfg.n_trials
            and len(running) < cfg.workers
            and time.monotonic() < deadline
            and not (cfg.sampler == "grid" and sampler.is_exhausted(study))
        ):
            started += 1
            running.add(
                run_trial.with_options(task_run_name=f"trial-{started}").submit(
                    root=str(root), url=url, tune_json=tune_json, sampler_key=sampler_key
                )
            )
        if not running:
            return results
        done = next(as_completed(running))
        running.discard(done)
        state = done.state
        if state.is_completed():
            results.append(done.result())
        else:  # a bug in one trial's bookkeeping must not lose the others: say so, go on
            get_run_logger().error("a trial's task failed: %s", state.message)
            results.append({"state": "ERROR", "reason": state.message})


def _ensemble(root: Path, params: Params, study, out_dir: Path, package: bool) -> dict:
    """The top-k trials' models averaged into one ONNX model, checked, measured and gated."""
    import optuna

    from components import ensemble as ens

    cfg = params.tune
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    ranked = sorted(complete, key=lambda t: t.value, reverse=direction(cfg) == "maximize")
    top = ranked[: cfg.ensemble.top_k]
    if len(top) < 2:
        return {"note": f"ensemble skipped: {len(top)} finished trial(s), it needs 2"}
    work = Path(root) / "build" / "tune" / cfg.study_name
    members, model_dir = [], Path(params.paths.model_dir)
    prepared = Path(params.paths.prepared_dir)
    for t in top:
        name = t.user_attrs["experiment"]
        ref = experiment_ref(root, name)
        if ref is None:
            return {"note": f"ensemble skipped: experiment {name} of trial {t.number} is gone"}
        rev = _git(root, "rev-parse", ref)
        files = [model_dir / "model.pt", model_dir / "model.json"]
        members.append(ens.restore_files(root, rev, files, work / "members" / name))
        if len(members) == 1:  # the test split the trials were made with: the best trial's
            ens.restore_files(
                root, rev, [prepared / "meta.json", prepared / "test.npz"], work / "data"
            )
    weights = ens.weights_from_scores([t.value for t in top], cfg.metric, cfg.ensemble.weighting)
    try:
        return ens.build_and_measure(
            members,
            weights,
            params,
            out_dir,
            names=[t.user_attrs["experiment"] for t in top],
            package=package,
            data_dir=work / "data",
        )
    except (FileNotFoundError, ValueError) as exc:
        return {"note": f"ensemble skipped: {' '.join(str(exc).split())}"}


def format_summary(summary: dict, page: Path) -> str:
    lines = ["", "Tuning summary"]
    for key in (
        "study",
        "storage",
        "sampler",
        "metric",
        "trials_before",
        "trials_this_run",
        "complete",
        "pruned",
        "failed",
        "best_trial",
        "best_value",
        "best_experiment",
        "best_params",
        "final_run",
    ):
        if key in summary:
            lines.append(f"  {key.replace('_', ' ')}: {summary[key]}")
    if summary.get("importance"):
        lines.append(
            "  importance: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importance"].items())
        )
    ens = summary.get("ensemble") or {}
    for label in ("best_single", "ensemble"):
        m = ens.get(label)
        if m:
            lines.append(
                f"  {label.replace('_', ' ')}: accuracy {m['accuracy']:.4f}, macro F1 "
                f"{m['macro_f1']:.4f}, {m['size_bytes'] / 1024:.0f} KiB, "
                f"{m['latency_ms_batch1']:.3f} ms at batch 1"
            )
    if ens.get("verdict") or ens.get("note"):
        lines.append(f"  ensemble: {ens.get('verdict') or ens.get('note')}")
    if ens.get("bento"):
        lines.append(f"  ensemble bento: {ens['bento']}")
    if summary.get("best_experiment"):
        name = summary["best_experiment"]
        lines.append(f"  reproduce the best trial: dvc exp apply {name} && dvc repro")
    lines.append(f"  report: {page}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run (or resume) the tuning study.")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="tune.KEY=VALUE",
        help="override the tune section for this run, e.g. --set tune.n_trials=3",
    )
    parser.add_argument("--workers", type=int, help="trials at once (tune.workers)")
    parser.add_argument(
        "--no-final-run",
        action="store_true",
        help="do not run the full pipeline with the best params",
    )
    parser.add_argument("--no-ensemble", action="store_true", help="build no ensemble")
    parser.add_argument(
        "--package-ensemble",
        action="store_true",
        help="also package the ensemble into its own bento when it passes",
    )
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"tune.workers={args.workers}")
    root = Path(args.root).resolve()
    try:
        os.chdir(root)
        preflight(root, overrides)  # bad input fails here, before Prefect starts
    except (ParamsError, PreflightError, TuneError, OSError) as exc:
        print(f"Tuning not started: {exc}", file=sys.stderr)
        return 2
    state = tune(
        overrides=overrides,
        root=str(root),
        final_run=False if args.no_final_run else None,
        ensemble=not args.no_ensemble,
        package_ensemble=args.package_ensemble,
        return_state=True,
    )
    return exit_code(state, "Tuning")


if __name__ == "__main__":
    sys.exit(main())
