"""Evaluate: test-split metrics of the trained network, and the absolute gates.

Classification (images, tables, sequences): accuracy, macro precision/recall/F1 and per-class
figures, gated by ``evaluate.min_accuracy``, ``min_macro_f1`` and ``min_class_recall``.
Regression (tables, time-series forecasts): MAE, RMSE and R^2 of the network's outputs, which
are already in the target's units, gated by ``evaluate.min_r2``.

Writes ``evaluate.json`` (metrics and one verdict per gate, each with a one-line reason; a
regression run also says ``"task": "regression"`` and names its target), ``confusion.csv``
(one row per test example, DVC's confusion template), ``per_class.csv`` (one row per class, a
DVC plot) and ``predictions.csv`` (actual, predicted, residual per test example: the
predicted-vs-actual scatter). Every file is written for both tasks so DVC finds its outputs:
the classification-only ones hold just their header for regression, and ``predictions.csv``
holds just its header for classification. A gate that does not pass fails the stage, so the
flow stops before compress and package; the HTML report is still written so a person sees why.

The gate primitives defined here are the one definition of a gate: the ``gate`` stage applies
the same ones to every ONNX variant (plus the drop from this model and the no-regression gate
against the champion), and compression code may reuse them for its own variants.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import EvaluateParams, Params
from components.dataset import TASKS, DatasetMeta, ImageSet, load_images, meta_path, split_path
from components.metrics import classification_metrics, regression_metrics
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.evaluate")

# Bump when evaluate.json changes shape; readers refuse other formats with a clear message.
# 1 (unversioned): gates without reasons, no min_class_recall.
EVALUATE_FORMAT = 2
EPS = 1e-9  # float noise: 0.9 measured as 0.8999999999 still meets a 0.9 threshold

CLASSIFICATION, REGRESSION = TASKS
# The metrics a run is known by, per task: what the champion record keeps of the served model.
RECORD_KEYS = {
    CLASSIFICATION: ("accuracy", "macro_f1", "min_class_recall"),
    REGRESSION: ("r2", "rmse", "mae"),
}
# What the no-regression gate compares with the champion (and gate.json's "network" holds).
COMPARED_KEYS = {CLASSIFICATION: ("accuracy", "macro_f1"), REGRESSION: ("r2",)}
HEADLINE_KEYS = {CLASSIFICATION: ("accuracy", "macro_f1"), REGRESSION: ("r2", "rmse", "mae")}
LABELS = {"accuracy": "accuracy", "macro_f1": "macro F1", "r2": "R^2", "rmse": "RMSE", "mae": "MAE"}


def metrics_task(metrics: dict) -> str:
    """The task of a metrics dict (measured, or read from evaluate.json / gate.json).

    An explicit ``task`` wins; otherwise regression metrics are the ones with R^2 and no
    accuracy (files written before regression existed are classification).
    """
    task = metrics.get("task")
    if task in TASKS:
        return task
    return REGRESSION if "r2" in metrics and "accuracy" not in metrics else CLASSIFICATION


@dataclass(frozen=True)
class Gate:
    """One verdict: ``value`` compared with ``threshold`` by ``op``, and a one-line reason."""

    name: str
    value: float | None  # None: nothing to compare with (e.g. no champion yet)
    threshold: float | None
    passed: bool
    reason: str
    op: str = ">="  # how value must compare with threshold to pass: ">=" or "<="

    def to_json(self) -> dict:
        def num(x):
            return None if x is None else round(float(x), 6)

        return {
            "value": num(self.value),
            "threshold": num(self.threshold),
            "op": self.op,
            "passed": self.passed,
            "reason": self.reason,
        }


def _at_least(name: str, label: str, value: float, limit: float, detail: str = "") -> Gate:
    passed = value >= limit - EPS
    verb = ">=" if passed else "<"
    reason = f"{label} {value:.4f}{detail} {verb} min {limit:.4f}"
    return Gate(name, value, limit, passed, reason, ">=")


def class_recall_gate(per_class: dict, limit: float) -> Gate:
    """The lowest recall of any class must reach ``limit``: no class may be sacrificed."""
    unmeasured = [name for name, c in per_class.items() if c["support"] == 0]
    if unmeasured:
        return Gate(
            "min_class_recall",
            0.0,
            limit,
            False,
            f"class {unmeasured[0]!r} has no test examples: its recall cannot be measured",
        )
    worst = min(per_class, key=lambda name: per_class[name]["recall"])
    recall = per_class[worst]["recall"]
    return _at_least(
        "min_class_recall", "lowest class recall", recall, limit, f" (class {worst!r})"
    )


def r2_gate(r2: float, limit: float) -> Gate:
    """Regression: R^2 on the test split at least ``evaluate.min_r2`` (0: as good as the mean)."""
    passed = r2 >= limit - EPS
    verb = ">=" if passed else "<"
    reason = f"R^2 {r2:.4f} {verb} min {limit:.4f} (evaluate.min_r2)"
    return Gate("r2", r2, limit, passed, reason, ">=")


def absolute_gates(metrics: dict, params: EvaluateParams) -> tuple[Gate, ...]:
    """Classification: minimum accuracy, macro F1 and per-class recall. Regression: minimum R^2."""
    if metrics_task(metrics) == REGRESSION:
        return (r2_gate(metrics["r2"], params.min_r2),)
    return (
        _at_least("accuracy", "accuracy", metrics["accuracy"], params.min_accuracy),
        _at_least("macro_f1", "macro F1", metrics["macro_f1"], params.min_macro_f1),
        class_recall_gate(metrics["per_class"], params.min_class_recall),
    )


def drop_gates(metrics: dict, reference: dict, max_drop: float, what: str) -> tuple[Gate, ...]:
    """A compressed variant may lose at most ``max_drop`` vs ``reference``.

    Classification: accuracy and macro F1 (gates ``accuracy_drop``, ``macro_f1_drop``).
    Regression: R^2 (gate ``r2_drop``), with the same tolerance, ``compress.max_accuracy_drop``:
    R^2 is a share of the target's variance explained, on the same 0-1 scale as accuracy.
    """
    regression = metrics_task(metrics) == REGRESSION
    gates = []
    for key in ("r2",) if regression else ("accuracy", "macro_f1"):
        drop = reference[key] - metrics[key]
        passed = drop <= max_drop + EPS
        verb = "<=" if passed else ">"
        reason = (
            f"{LABELS[key]} drop vs {what} {drop:+.4f} ({reference[key]:.4f} -> "
            f"{metrics[key]:.4f}) {verb} max {max_drop:.4f}"
        )
        if regression:
            reason += " (compress.max_accuracy_drop)"
        gates.append(Gate(f"{key}_drop", drop, max_drop, passed, reason, "<="))
    return tuple(gates)


def regression_gates(
    metrics: dict, champion: dict | None, max_regression: float, champion_name: str, why_none: str
) -> tuple[Gate, ...]:
    """No regression vs the champion: each metric at least the champion's minus the tolerance.

    Classification compares accuracy and macro F1, regression R^2 (``no_regression_r2``).
    ``value`` is the difference challenger - champion; the gate passes when it is at least
    ``-max_regression``. Without a comparable champion the gate passes and says why.
    """
    if champion is None:
        return (Gate("no_regression", None, None, True, why_none),)
    gates = []
    for key in COMPARED_KEYS[metrics_task(metrics)]:
        label = LABELS[key]
        delta = metrics[key] - champion[key]
        passed = delta >= -max_regression - EPS
        if passed:
            reason = (
                f"{label} {metrics[key]:.4f} vs champion {champion_name} {champion[key]:.4f} "
                f"({delta:+.4f}, tolerance {max_regression:.4f})"
            )
        else:
            reason = (
                f"{label} {metrics[key]:.4f} is {-delta:.4f} below champion {champion_name} "
                f"{champion[key]:.4f}, more than the {max_regression:.4f} allowed"
            )
        gates.append(Gate(f"no_regression_{key}", delta, -max_regression, passed, reason, ">="))
    return tuple(gates)


def failed_reasons(gates) -> list[str]:
    return [g.reason for g in gates if not g.passed]


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    gates: tuple[Gate, ...]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def check_labels(test: ImageSet, class_names) -> None:
    """A usable test split: not empty, and only labels the model knows."""
    if len(test) == 0:
        raise StageError("the test split is empty: nothing to evaluate")
    if test.y.min() < 0 or test.y.max() >= len(class_names):
        bad = int(test.y.max() if test.y.max() >= len(class_names) else test.y.min())
        raise StageError(
            f"the test split has label {bad}, which the model does not know "
            f"(it has {len(class_names)} classes)"
        )


def check_targets(test: ImageSet) -> None:
    """A usable regression test split: not empty, and every target a finite number."""
    if len(test) == 0:
        raise StageError("the test split is empty: nothing to evaluate")
    y = np.asarray(test.y)
    if not np.issubdtype(y.dtype, np.number):
        raise StageError(f"the test split's targets are {y.dtype}, not numbers: re-run ingest")
    bad = np.flatnonzero(~np.isfinite(y.astype(np.float64)))
    if len(bad):
        raise StageError(
            f"the test split has {len(bad)} target(s) that are not finite numbers (first at "
            f"row {int(bad[0])}): re-run ingest"
        )


def regression_values(outputs, n: int, source: str = "the model") -> np.ndarray:
    """The one predicted value per example of a regression model's outputs ((N,) or (N, 1))."""
    values = np.asarray(outputs, dtype=np.float64)
    values = values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
    if len(values) != n or values.shape[1] != 1:
        raise StageError(
            f"{source} gives outputs shaped {tuple(np.shape(outputs))} for {n} examples; a "
            "regression model gives one value per example: re-run train"
        )
    bad = np.flatnonzero(~np.isfinite(values[:, 0]))
    if len(bad):
        raise StageError(
            f"{source} predicts a value that is not a finite number for {len(bad)} of {n} test "
            "examples (a diverged training?): re-run train"
        )
    return values[:, 0]


def evaluate(predicted: np.ndarray, test: ImageSet, class_names, params: EvaluateParams):
    """The core: metrics of predicted labels against the test split, and the gates."""
    check_labels(test, class_names)
    metrics = classification_metrics(test.y, predicted, class_names)
    metrics["min_class_recall"] = min(c["recall"] for c in metrics["per_class"].values())
    return EvaluateResult(metrics, absolute_gates(metrics, params))


def evaluate_regression(outputs: np.ndarray, test: ImageSet, params: EvaluateParams):
    """The regression core: MAE, RMSE and R^2 of the model's outputs (target units), the gate."""
    check_targets(test)
    metrics = regression_metrics(test.y, regression_values(outputs, len(test)))
    return EvaluateResult(metrics, absolute_gates(metrics, params))


def metrics_payload(metrics: dict) -> dict:
    """The numbers of a metrics dict as written to JSON (rounded; per-class figures kept).

    Regression metrics carry ``mae``, ``rmse`` and ``r2``; their ``n`` is ``test_examples``.
    """
    out = {
        k: round(float(v), 6)
        for k, v in metrics.items()
        if k not in ("per_class", "n", "task") and isinstance(v, int | float)
    }
    if "per_class" in metrics:
        out["per_class"] = {
            name: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.items()}
            for name, c in metrics["per_class"].items()
        }
    return out


def write_per_class_csv(path: Path, per_class: dict) -> None:
    """One row per class: the per-class plot that `dvc plots diff` compares between runs."""
    lines = ["class,precision,recall,f1,support"]
    lines += [
        f"{name},{c['precision']:.6f},{c['recall']:.6f},{c['f1']:.6f},{c['support']}"
        for name, c in per_class.items()
    ]
    Path(path).write_text("\n".join(lines) + "\n")


def read_metrics_file(path: Path, expected_format: int, stage: str, required: tuple = ()) -> dict:
    """A metrics JSON file of this code's format, or a :class:`StageError` that says what to do.

    An older file (another ``format``, or keys missing) is refused rather than half-read: the
    gates and the promotion must never decide on numbers they misread.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the {stage} stage first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path} is not valid JSON ({exc}): re-run the {stage} stage") from None
    if not isinstance(data, dict):
        raise StageError(f"{path} must hold a JSON object: re-run the {stage} stage")
    found = data.get("format", 1)
    if found != expected_format:
        raise StageError(
            f"{path} is in format {found}, this code reads format {expected_format} (written by "
            f"an older or newer version): re-run the {stage} stage (dvc repro {stage})"
        )
    return require_keys(path, data, stage, required)


def require_keys(path: Path, data: dict, stage: str, required: tuple) -> dict:
    """``data`` (read from ``path``) when it has every key in ``required``."""
    missing = [k for k in required if k not in data]
    if missing:
        raise StageError(
            f"{path} lacks {', '.join(missing)} (an older or hand-edited file?): re-run the "
            f"{stage} stage (dvc repro {stage})"
        )
    return data


def write_predictions_csv(path: Path, actual=None, predicted=None) -> None:
    """Regression: actual, predicted and residual (predicted - actual) per test example, the
    predicted-vs-actual scatter. Without values (classification): the header only."""
    lines = ["actual,predicted,residual"]
    if actual is not None:
        lines += [
            f"{float(a):.9g},{float(p):.9g},{float(p) - float(a):.9g}"
            for a, p in zip(actual, predicted, strict=True)
        ]
    Path(path).write_text("\n".join(lines) + "\n")


def read_evaluate_json(path: Path) -> dict:
    """evaluate.json with the keys of its task (classification when it names none)."""
    data = read_metrics_file(path, EVALUATE_FORMAT, "evaluate")
    if data.get("task", CLASSIFICATION) not in TASKS:
        raise StageError(
            f"{path}: task {data['task']!r} is none of {list(TASKS)}: re-run the evaluate stage"
        )
    if metrics_task(data) == REGRESSION:
        required = ("r2", "rmse", "mae", "gates", "passed")
    else:
        required = ("accuracy", "macro_f1", "min_class_recall", "per_class", "gates", "passed")
    return require_keys(path, data, "evaluate", required)


def write_failure_report(params: Params, stopped_at: str, reason: str) -> None:
    """The HTML report of a run that stopped here; a problem with it never hides ``reason``."""
    try:
        from components.report import write_report

        write_report(params, stopped_at=stopped_at, stop_reason=reason)
    except Exception as exc:  # the gate's verdict matters more than the report
        log.warning("could not write the report of the failed run: %s", exc)


def check_model_fits(described: dict, meta: DatasetMeta, test: ImageSet, model_dir) -> None:
    """The trained model (model.json) is for this data (meta.json): task, classes, input shape."""
    config = described.get("config") or {}
    task = described.get("task") or config.get("task") or CLASSIFICATION
    where = Path(model_dir) / "model.json"
    if task != meta.task:
        raise StageError(
            f"{where}: the model was trained for {task} but the data is {meta.task} "
            f"(prepared meta.json task): re-run the train stage"
        )
    if tuple(described.get("class_names", ())) != meta.class_names:
        raise StageError(
            "the model was trained on classes "
            f"{described.get('class_names', [])} but the data has {list(meta.class_names)}"
        )
    if (described.get("target") or meta.target) != meta.target:
        raise StageError(
            f"{where}: the model predicts {described['target']!r} but the data's target is "
            f"{meta.target!r}: re-run the train stage"
        )
    shape = tuple(config.get("input_shape") or config.get("image_shape") or ())
    if shape and len(test) and tuple(test.x.shape[1:]) != shape:
        raise StageError(
            f"{where}: the model takes examples shaped {shape} but the test split's are "
            f"{tuple(test.x.shape[1:])}: re-run the train stage"
        )


def run(params: Params) -> EvaluateResult:
    from components.model import load_model, predict_logits

    paths = params.paths
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    test = load_images(split_path(paths.prepared_dir, "test"))
    model, described = load_model(paths.model_dir)
    check_model_fits(described, meta, test, paths.model_dir)
    if meta.is_regression:
        check_targets(test)  # before running the model on it
        outputs = predict_logits(model, test.x).numpy()
        result = evaluate_regression(outputs, test, params.evaluate)
        predicted = regression_values(outputs, len(test))
    else:
        check_labels(test, meta.class_names)  # before running the model on it
        predicted = predict_logits(model, test.x).argmax(dim=1).numpy()
        result = evaluate(predicted, test, meta.class_names, params.evaluate)

    metrics_dir = Path(paths.metrics_dir)
    described_task = {"task": REGRESSION, "target": meta.target} if meta.is_regression else {}
    write_json(
        metrics_dir / "evaluate.json",
        {
            "format": EVALUATE_FORMAT,
            **described_task,
            **metrics_payload(result.metrics),
            "test_examples": len(test),
            "gates": {g.name: g.to_json() for g in result.gates},
            "passed": result.passed,
            "failed": failed_reasons(result.gates),
        },
    )
    names = meta.class_names
    with (metrics_dir / "confusion.csv").open("w") as fh:
        fh.write("actual,predicted\n")
        if not meta.is_regression:
            fh.writelines(
                f"{names[a]},{names[p]}\n" for a, p in zip(test.y, predicted, strict=True)
            )
    write_per_class_csv(metrics_dir / "per_class.csv", result.metrics.get("per_class", {}))
    if meta.is_regression:
        write_predictions_csv(metrics_dir / "predictions.csv", test.y, predicted)
    else:
        write_predictions_csv(metrics_dir / "predictions.csv")

    for gate in result.gates:
        log.info("gate %s: %s", "PASS" if gate.passed else "FAIL", gate.reason)
    if not result.passed:
        reason = "evaluation gate failed: " + "; ".join(failed_reasons(result.gates))
        write_failure_report(params, "evaluate", reason)
        raise StageError(reason)
    return result


if __name__ == "__main__":
    main("evaluate", run)
