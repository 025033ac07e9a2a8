"""Tuning as a Prefect flow: an Optuna study whose every trial is a DVC experiment.

    python -m flows.tune                              # the study in params.yaml's tune section
    python -m flows.tune --set tune.n_trials=20 --workers 2
    python -m flows.tune --budget 10m                 # 10 minutes of trials, as many as fit
    make tune WORKERS=2
    make tune BUDGET=10m                              # the same; N_TRIALS=20 caps the count too

The flow checks all it can before any trial (and cuts the space to what the data's kind can
use, components/tuning/fits.py), then keeps ``tune.workers`` trials running as Prefect tasks,
each one ``dvc exp run --temp`` of the pipeline up to evaluate (components/tuning/trials.py),
killed after ``tune.trial_timeout_seconds`` or at the budget's end (``--budget``,
components/tuning/budget.py). The first trial measures the defaults, params.yaml as it is.
Running it again
resumes the study (Optuna storage, components/tuning/study.py), first marking FAIL the trials a
killed run left RUNNING; ``dvc exp apply <study>-t3 && dvc repro`` reproduces a trial. At the
end the best trial's params go through the whole pipeline (``flows.pipeline``, kept in
params.yaml after it), starting from that trial's trained model (components/tuning/reuse.py),
the top-k
trials make an ensemble (components/tuning/top_k.py), the outcome is compared with the defaults
and the classical baselines (components/tuning/compare.py) and reports/tuning.html shows it all
(components/tuning/page.py). The storage URL is shown without its credentials.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

from components.stage import set_quiet_env

set_quiet_env()  # before Prefect is imported: it reads PREFECT_HOME at import

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from components.config import (  # noqa: E402
    Params,
    ParamsError,
    TuneParams,
    check_repository_paths,
    read_params_file,
)
from components.stage import StageError  # noqa: E402
from components.tuning.budget import (  # noqa: E402
    Budget,
    BudgetError,
    Clock,
    budget_for,
    format_duration,
    parse_duration,
)
from components.tuning.compare import compare  # noqa: E402
from components.tuning.fits import fit_space  # noqa: E402
from components.tuning.page import (  # noqa: E402
    format_summary,
    summarise,
    trials_table,
    write_report,
)
from components.tuning.study import (  # noqa: E402
    TuneError,
    best_of,
    best_overrides,
    check_space,
    enqueue_defaults,
    fail_stale_trials,
    grid_exhausted,
    measured_defaults,
    open_study,
    shared_sampler,
    shown,
    storage_url,
)
from components.tuning.top_k import ensemble_of_top_trials  # noqa: E402
from components.tuning.trials import check_trial_overrides, prepare_data  # noqa: E402
from components.tuning.trials import run_trial as run_one_trial  # noqa: E402
from flows.experiments import (  # noqa: E402
    BUSY,
    NOT_STARTED,
    PreflightError,
    exit_code,
    has_commit,
    start_temporary_server,
)
from flows.workspace_lock import WorkspaceBusy, workspace_lock  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Checks before any trial


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


class Checked(NamedTuple):
    params: Params  # with tune.space cut to what the data's kind can use
    url: str  # the study's storage
    notes: list[str]  # what the space left out, and why


def preflight(root: Path, overrides: list[str]) -> Checked:
    """The params, the study's storage URL and the space's notes, once every check that needs
    no trial passed; raises :class:`TuneError` (or ``ParamsError``) naming the key otherwise."""
    if not (root / "dvc.yaml").is_file():
        raise TuneError(f"{root} has no dvc.yaml: run from the repository root")
    params = tune_params(root, overrides)
    check_repository_paths(params.paths, root)  # trials run DVC, which deletes declared outputs
    check_space(params.tune, root / "params.yaml")  # every choice, even those the data drops
    fitted, notes = fit_space(params, root)
    params = params.model_copy(update={"tune": fitted})
    check_trial_overrides(params.tune, root / "params.yaml")
    if not has_commit(root):
        raise TuneError("trials are DVC experiments, which need a git commit: commit once first")
    return Checked(params, storage_url(root, params.tune), notes)


def count_given(overrides: list[str]) -> bool:
    """Whether this run names its own trial count (``N_TRIALS``, ``--set tune.n_trials``)."""
    return any(o.partition("=")[0].strip() == "tune.n_trials" for o in overrides)


# The study's user attr that keeps how long its last final run took: the next run says so first.
FINAL_RUN_SECONDS = "final_run_seconds"


def final_run_forecast(study, final: bool) -> str:
    if not final:
        return "no final run (--no-final-run or tune.final_run: false)"
    last = study.user_attrs.get(FINAL_RUN_SECONDS)
    cost = (
        f"the last one took {format_duration(last)}"
        if last is not None
        else "not measured yet for this study; it costs about a `make pipeline` run"
    )
    return f"then the final run with the best params through every gate, not counted: {cost}"


# ---------------------------------------------------------------------------------------------
# The flow


@task(retries=0)
def run_trial(
    root: str,
    url: str,
    tune_json: dict,
    sampler_key: str = "",
    timeout: float | None = None,
    timeout_reason: str = "tune.trial_timeout_seconds",
) -> dict:
    """Ask the study for params, run them as a DVC experiment up to evaluate, tell the result."""
    tune = TuneParams.model_validate(tune_json)
    return run_one_trial(
        Path(root), url, tune, sampler_key, get_run_logger(), timeout, timeout_reason
    )


# Threads: each trial waits on its own `dvc exp run`; _run_trials keeps tune.workers running.
@flow(name="tune", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def tune(
    overrides: list[str] | None = None,
    root: str = ".",
    final_run: bool | None = None,
    ensemble: bool = True,
    package_ensemble: bool = False,
    budget: str | None = None,
):
    """Run (or resume) the study: ``tune.n_trials`` trials or ``tune.timeout_seconds``, or
    ``budget`` (``"10m"``: that much wall time of trials, as many as fit unless the run sets
    ``tune.n_trials`` too), ``tune.workers`` at a time, the defaults first; then the best params
    through the whole pipeline, the ensemble of the top-k trials, the comparison with the
    defaults and the baselines, and reports/tuning.html. Returns the summary dict."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    os.chdir(root_path)
    overrides = list(overrides or [])
    try:
        params, url, notes = preflight(root_path, overrides)
        plan = budget_for(
            params.tune.timeout_seconds, params.tune.n_trials, budget, count_given(overrides)
        )
        study = open_study(url, params.tune, create=True)
    except (ParamsError, PreflightError, TuneError, BudgetError) as exc:
        return Failed(name=NOT_STARTED, message=str(exc))
    cfg = params.tune
    final = cfg.final_run if final_run is None else final_run
    before = len(study.trials)
    logger.info(
        "study %r in %s: %s",
        cfg.study_name,
        shown(url),  # a database URL may hold a password
        f"resumed with {before} trial(s)" if before else "new",
    )
    for note in notes:
        logger.info("%s", note)
    logger.info("budget: %s; %s", plan.describe(), final_run_forecast(study, final))
    stale = fail_stale_trials(study, cfg.trial_timeout_seconds)
    if stale:
        logger.warning(
            "trial(s) %s were left RUNNING by a flow that stopped: marked FAIL",
            ", ".join(map(str, stale)),
        )
    try:
        with workspace_lock(root_path, run=f"tune {cfg.study_name}"):
            try:
                account = prepare_data(
                    root_path, params.paths.metrics_dir, cfg.trial_timeout_seconds
                )
            except TuneError as exc:
                return Failed(name=NOT_STARTED, message=str(exc))
            logger.info("%s", account)
            raw = read_params_file(root_path / "params.yaml")
            fingerprint, _ = enqueue_defaults(study, cfg, raw)
            known = measured_defaults(study, fingerprint)
            if known is not None:
                logger.info(
                    "the defaults (params.yaml as it is) were measured in trial %d: %s %.4f",
                    known.number,
                    cfg.metric,
                    known.value,
                )
            else:
                logger.info("the first trial measures the defaults, params.yaml as it is")
            results, stopped, trial_seconds = _run_trials(root_path, url, cfg, study, plan)
    except WorkspaceBusy as exc:
        return Failed(name=BUSY, message=str(exc))

    study = open_study(url, cfg)
    rows = trials_table(study)
    summary = summarise(study, cfg, url, before, len(results), rows)
    summary["budget"] = plan.describe()
    summary["stopped"] = stopped
    summary["seconds_trials"] = round(trial_seconds, 1)
    reports_dir = root_path / params.paths.reports_dir
    out_dir = reports_dir / "tuning"
    final_state = None
    if summary["complete"]:
        logger.info(
            "best: trial %d (%s) %s %.4f: %s",
            summary["best_trial"],
            summary["best_experiment"],
            cfg.metric,
            summary["best_value"],
            summary["best_params"],
        )
        if final:
            final_state = _final_run(root_path, study, cfg, summary, logger)
        if ensemble and cfg.ensemble.top_k >= 2:
            started = time.monotonic()
            try:
                summary["ensemble"] = ensemble_of_top_trials(
                    root_path, params, study, out_dir, package_ensemble
                )
            except Exception as exc:  # DVC, ONNX, BentoML: the study's results stand regardless
                reason = " ".join(str(exc).split()) or type(exc).__name__
                logger.warning("ensemble failed: %s", reason)
                summary["ensemble"] = {"note": f"ensemble failed ({type(exc).__name__}): {reason}"}
            summary["seconds_ensemble"] = round(time.monotonic() - started, 1)
        passed = None if final_state is None else final_state.is_completed()
        try:
            summary["comparison"] = compare(
                root_path,
                params.paths.metrics_dir,
                study,
                cfg,
                measured_defaults(study, fingerprint),
                passed,
            )
        except (StageError, OSError, ValueError) as exc:  # the study's results stand regardless
            summary["comparison"] = {"note": f"no comparison: {' '.join(str(exc).split())}"}
    page = write_report(reports_dir / "tuning.html", out_dir, summary, rows, study, cfg)
    print(format_summary(summary, page))
    if final_state is not None and not final_state.is_completed():
        return Failed(
            message=f"the final run with the best params failed: {final_state.message}",
            data=summary,
        )
    if not summary["complete"]:
        return Failed(message="no trial finished: see the trials table", data=summary)
    return Completed(message=f"best trial {summary['best_trial']}", data=summary)


def _final_run(root: Path, study, cfg: TuneParams, summary: dict, logger):
    """The best params through the whole pipeline (kept in params.yaml); its state. The best
    trial's train stage is taken as it is (components/tuning/reuse.py): DVC trains again only
    if the params, data or code differ from that trial's. How long it took goes into the
    summary and the study, for the next run's forecast."""
    from components.overrides import ignored_by_the_model
    from components.tuning.reuse import STAGE, take_trained_stage
    from flows.pipeline import pipeline

    best = best_overrides(study, cfg)
    # The space draws every key for every model: the ones the best model ignores would be
    # refused by the run (train.channels for an MLP), and change nothing. Trials leave them out
    # too (components/tuning/trials.py), so the best trial's train params are the final run's.
    ignored = ignored_by_the_model(best, root / "params.yaml")
    if ignored:
        logger.info("left out of the final run, the best model ignores: %s", list(ignored))
    started = time.monotonic()
    taken = take_trained_stage(root, best_of(study, cfg).user_attrs["experiment"])
    logger.info("final run, %s: %s", STAGE, taken.note)
    # keep_params: the best params stay in params.yaml, this flow's explicit keep step.
    state = pipeline(
        overrides=[o for o in best if o.partition("=")[0] not in ignored],
        root=str(root),
        keep_params=True,
        return_state=True,
    )
    seconds = time.monotonic() - started
    os.chdir(root)
    summary["final_run_model"] = _final_model(root, taken)
    logger.info("final run's model: %s", summary["final_run_model"])
    summary["final_run"] = state.message or state.name
    summary["seconds_final_run"] = round(seconds, 1)
    study.set_user_attr(FINAL_RUN_SECONDS, round(seconds, 1))
    return state


def _final_model(root: Path, taken) -> str:
    """Whether the final run released the best trial's own model or trained another."""
    from components.restore import locked_outputs
    from components.tuning.reuse import STAGE

    if taken.entry is None:
        return f"trained again ({taken.note.split(': the final run')[0]})"
    recorded = {str(o.path): o.md5 for o in locked_outputs(root, STAGE)}
    trial = {o["path"]: o.get("md5") for o in taken.entry.get("outs") or []}
    if recorded == trial:
        return f"the best trial's, not trained again (experiment {taken.experiment})"
    return "trained again: the params, data or code differ from the best trial's"


def _run_trials(
    root: Path, url: str, cfg: TuneParams, study, plan: Budget
) -> tuple[list[dict], str, float]:
    """Keep ``cfg.workers`` trials running until the budget (its time, its count) is spent:
    the trials' rows, why they stopped, and the seconds they took. No trial's timeout runs past
    the budget's end."""
    clock = Clock(plan, cfg.trial_timeout_seconds)
    results, running, started, stopped = [], set(), 0, ""
    tune_json = cfg.model_dump(mode="json")
    sampler_key = shared_sampler(url, cfg, offset=len(study.trials))
    while True:
        while len(running) < cfg.workers:
            if grid_exhausted(sampler_key, study):
                stopped = "every point of the grid was tried"
                break
            finished_seconds = [r["seconds"] for r in results if r.get("state") == "COMPLETE"]
            why = clock.why_not_start(started, min(finished_seconds, default=None))
            if why is not None:
                stopped = why
                break
            timeout, reason = clock.timeout()
            started += 1
            running.add(
                run_trial.with_options(task_run_name=f"trial-{started}").submit(
                    root=str(root),
                    url=url,
                    tune_json=tune_json,
                    sampler_key=sampler_key,
                    timeout=timeout,
                    timeout_reason=reason,
                )
            )
        if not running:
            get_run_logger().info(
                "trials stopped after %s: %s", format_duration(clock.elapsed()), stopped
            )
            return results, stopped, clock.elapsed()
        done = next(as_completed(running))
        running.discard(done)
        # wait() keeps the task's final state; without it .state asks the API, which may not
        # have recorded it yet (Prefect 3 sends states as events) and says Running.
        done.wait()
        state = done.state
        if state.is_completed():
            results.append(done.result())
        else:  # a bug in one trial's bookkeeping must not lose the others: say so, go on
            get_run_logger().error("a trial's task failed: %s", state.message)
            results.append({"state": "ERROR", "reason": state.message})


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
        "--budget",
        metavar="DURATION",
        help="wall time of trials, e.g. 600, 90s, 10m, 1h: replaces tune.timeout_seconds and "
        "lifts tune.n_trials unless --n-trials is given too (the final run is not counted)",
    )
    parser.add_argument("--n-trials", type=int, help="at most this many trials (tune.n_trials)")
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
    if args.n_trials is not None:
        overrides.append(f"tune.n_trials={args.n_trials}")
    root = Path(args.root).resolve()
    try:
        if args.budget is not None:
            parse_duration(args.budget)
        os.chdir(root)
        preflight(root, overrides)  # bad input fails here, before Prefect starts
    except (ParamsError, PreflightError, TuneError, BudgetError, OSError) as exc:
        print(f"Tuning not started: {exc}", file=sys.stderr)
        return 2
    start_temporary_server()
    state = tune(
        overrides=overrides,
        root=str(root),
        final_run=False if args.no_final_run else None,
        ensemble=not args.no_ensemble,
        package_ensemble=args.package_ensemble,
        budget=args.budget,
        return_state=True,
    )
    return exit_code(state, "Tuning")


if __name__ == "__main__":
    sys.exit(main())
