"""Tuning as a Prefect flow: an Optuna study whose every trial is a DVC experiment.

    python -m flows.tune                              # the study in params.yaml's tune section
    python -m flows.tune --set tune.n_trials=20 --workers 2
    make tune WORKERS=2

The flow checks all it can before any trial, then keeps ``tune.workers`` trials running as
Prefect tasks, each one ``dvc exp run --temp`` of the pipeline up to evaluate
(components/tuning/trials.py), killed after ``tune.trial_timeout_seconds``. Running it again
resumes the study (Optuna storage, components/tuning/study.py), first marking FAIL the trials a
killed run left RUNNING; ``dvc exp apply <study>-t3 && dvc repro`` reproduces a trial. At the
end the best trial's params go through the whole pipeline (``flows.pipeline``, kept in
params.yaml after it), the top-k
trials make an ensemble (components/tuning/top_k.py) and reports/tuning.html shows the trials
(components/tuning/page.py). The storage URL is shown without its credentials.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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
)
from components.tuning.fits import check_fits_data  # noqa: E402
from components.tuning.page import (  # noqa: E402
    format_summary,
    summarise,
    trials_table,
    write_report,
)
from components.tuning.study import (  # noqa: E402
    TuneError,
    best_overrides,
    check_space,
    fail_stale_trials,
    grid_exhausted,
    open_study,
    shared_sampler,
    shown,
    storage_url,
)
from components.tuning.top_k import ensemble_of_top_trials  # noqa: E402
from components.tuning.trials import check_trial_overrides  # noqa: E402
from components.tuning.trials import run_trial as run_one_trial  # noqa: E402
from flows.experiments import BUSY, NOT_STARTED, PreflightError, exit_code, has_commit  # noqa: E402
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


def preflight(root: Path, overrides: list[str]) -> tuple[Params, str]:
    """The params and the study's storage URL, once every check that needs no trial passed;
    raises :class:`TuneError` (or ``ParamsError``) naming the key otherwise."""
    if not (root / "dvc.yaml").is_file():
        raise TuneError(f"{root} has no dvc.yaml: run from the repository root")
    params = tune_params(root, overrides)
    check_repository_paths(params.paths, root)  # trials run DVC, which deletes declared outputs
    check_space(params.tune, root / "params.yaml")
    check_fits_data(params, root)
    check_trial_overrides(params.tune, root / "params.yaml")
    if not has_commit(root):
        raise TuneError("trials are DVC experiments, which need a git commit: commit once first")
    return params, storage_url(root, params.tune)


# ---------------------------------------------------------------------------------------------
# The flow


@task(retries=0)
def run_trial(root: str, url: str, tune_json: dict, sampler_key: str = "") -> dict:
    """Ask the study for params, run them as a DVC experiment up to evaluate, tell the result."""
    tune = TuneParams.model_validate(tune_json)
    return run_one_trial(Path(root), url, tune, sampler_key, get_run_logger())


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
        shown(url),  # a database URL may hold a password
        f"resumed with {before} trial(s)" if before else "new",
    )
    stale = fail_stale_trials(study, cfg.trial_timeout_seconds)
    if stale:
        logger.warning(
            "trial(s) %s were left RUNNING by a flow that stopped: marked FAIL",
            ", ".join(map(str, stale)),
        )
    try:
        with workspace_lock(root_path, run=f"tune {cfg.study_name}"):
            results = _run_trials(root_path, url, cfg, study)
    except WorkspaceBusy as exc:
        return Failed(name=BUSY, message=str(exc))

    study = open_study(url, cfg)
    rows = trials_table(study)
    summary = summarise(study, cfg, url, before, len(results), rows)
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
        if cfg.final_run if final_run is None else final_run:
            from components.overrides import ignored_by_the_model
            from flows.pipeline import pipeline

            best = best_overrides(study, cfg)
            # The space draws every key for every model: the ones the best model ignores
            # would be refused by the run (train.channels for an MLP), and change nothing.
            ignored = ignored_by_the_model(best, root_path / "params.yaml")
            if ignored:
                logger.info("left out of the final run, the best model ignores: %s", list(ignored))
            # keep_params: the best params stay in params.yaml, this flow's explicit keep step.
            final_state = pipeline(
                overrides=[o for o in best if o.partition("=")[0] not in ignored],
                root=str(root_path),
                keep_params=True,
                return_state=True,
            )
            summary["final_run"] = final_state.message or final_state.name
            os.chdir(root_path)
        if ensemble and cfg.ensemble.top_k >= 2:
            try:
                summary["ensemble"] = ensemble_of_top_trials(
                    root_path, params, study, out_dir, package_ensemble
                )
            except Exception as exc:  # DVC, ONNX, BentoML: the study's results stand regardless
                reason = " ".join(str(exc).split()) or type(exc).__name__
                logger.warning("ensemble failed: %s", reason)
                summary["ensemble"] = {"note": f"ensemble failed ({type(exc).__name__}): {reason}"}
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


def _run_trials(root: Path, url: str, cfg: TuneParams, study) -> list[dict]:
    """Keep ``cfg.workers`` trials running until the count or the wall-time budget is spent."""
    deadline = time.monotonic() + cfg.timeout_seconds
    results, running, started = [], set(), 0
    tune_json = cfg.model_dump(mode="json")
    sampler_key = shared_sampler(url, cfg, offset=len(study.trials))
    while True:
        while (
            started < cfg.n_trials
            and len(running) < cfg.workers
            and time.monotonic() < deadline
            and not grid_exhausted(sampler_key, study)
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
