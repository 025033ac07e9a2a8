"""Evaluate: test-split metrics of the trained network, and the absolute gates.

Writes ``evaluate.json`` (metrics, per-class figures and one verdict per gate, each with a
one-line reason), ``confusion.csv`` (one row per test example, DVC's confusion template) and
``per_class.csv`` (one row per class, a DVC plot). A gate that does not pass fails the stage,
so the flow stops before compress and package; the HTML report is still written so a person
sees why.

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
from components.dataset import DatasetMeta, ImageSet, load_images, meta_path, split_path
from components.metrics import classification_metrics
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.evaluate")

# Bump when evaluate.json changes shape; readers refuse other formats with a clear message.
# 1 (unversioned): gates without reasons, no min_class_recall.
EVALUATE_FORMAT = 2
EPS = 1e-9  # float noise: 0.9 measured as 0.8999999999 still meets a 0.9 threshold


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


def absolute_gates(metrics: dict, params: EvaluateParams) -> tuple[Gate, ...]:
    """Minimum accuracy, minimum macro F1 and minimum per-class recall."""
    return (
        _at_least("accuracy", "accuracy", metrics["accuracy"], params.min_accuracy),
        _at_least("macro_f1", "macro F1", metrics["macro_f1"], params.min_macro_f1),
        class_recall_gate(metrics["per_class"], params.min_class_recall),
    )


def check_gates(metrics: dict, params: EvaluateParams) -> tuple[Gate, ...]:
    """The absolute gates (kept under this name for callers of the first version)."""
    return absolute_gates(metrics, params)


def drop_gates(metrics: dict, reference: dict, max_drop: float, what: str) -> tuple[Gate, ...]:
    """A compressed variant may lose at most ``max_drop`` accuracy and macro F1 vs ``reference``."""
    gates = []
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        drop = reference[key] - metrics[key]
        passed = drop <= max_drop + EPS
        verb = "<=" if passed else ">"
        reason = (
            f"{label} drop vs {what} {drop:+.4f} ({reference[key]:.4f} -> {metrics[key]:.4f}) "
            f"{verb} max {max_drop:.4f}"
        )
        gates.append(Gate(f"{key}_drop", drop, max_drop, passed, reason, "<="))
    return tuple(gates)


def regression_gates(
    metrics: dict, champion: dict | None, max_regression: float, champion_name: str, why_none: str
) -> tuple[Gate, ...]:
    """No regression vs the champion: each metric at least the champion's minus the tolerance.

    ``value`` is the difference challenger - champion; the gate passes when it is at least
    ``-max_regression``. Without a comparable champion the gate passes and says why.
    """
    if champion is None:
        return (Gate("no_regression", None, None, True, why_none),)
    gates = []
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
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


def evaluate(predicted: np.ndarray, test: ImageSet, class_names, params: EvaluateParams):
    """The core: metrics of predicted labels against the test split, and the gates."""
    check_labels(test, class_names)
    metrics = classification_metrics(test.y, predicted, class_names)
    metrics["min_class_recall"] = min(c["recall"] for c in metrics["per_class"].values())
    return EvaluateResult(metrics, absolute_gates(metrics, params))


def metrics_payload(metrics: dict) -> dict:
    """The numbers of a metrics dict as written to JSON (rounded; per-class figures kept)."""
    out = {k: round(v, 6) for k, v in metrics.items() if k != "per_class"}
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
    missing = [k for k in required if k not in data]
    if missing:
        raise StageError(
            f"{path} lacks {', '.join(missing)} (an older or hand-edited file?): re-run the "
            f"{stage} stage (dvc repro {stage})"
        )
    return data


def read_evaluate_json(path: Path) -> dict:
    return read_metrics_file(
        path,
        EVALUATE_FORMAT,
        "evaluate",
        ("accuracy", "macro_f1", "min_class_recall", "per_class", "gates", "passed"),
    )


def write_failure_report(params: Params, stopped_at: str, reason: str) -> None:
    """The HTML report of a run that stopped here; a problem with it never hides ``reason``."""
    try:
        from components.report import write_report

        write_report(params, stopped_at=stopped_at, stop_reason=reason)
    except Exception as exc:  # the gate's verdict matters more than the report
        log.warning("could not write the report of the failed run: %s", exc)


def run(params: Params) -> EvaluateResult:
    from components.model import load_model, predict_logits

    paths = params.paths
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    test = load_images(split_path(paths.prepared_dir, "test"))
    model, described = load_model(paths.model_dir)
    if tuple(described["class_names"]) != meta.class_names:
        raise StageError(
            "the model was trained on classes "
            f"{described['class_names']} but the data has {list(meta.class_names)}"
        )
    check_labels(test, meta.class_names)  # before running the model on it
    predicted = predict_logits(model, test.x).argmax(dim=1).numpy()
    result = evaluate(predicted, test, meta.class_names, params.evaluate)

    metrics_dir = Path(paths.metrics_dir)
    write_json(
        metrics_dir / "evaluate.json",
        {
            "format": EVALUATE_FORMAT,
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
        fh.writelines(f"{names[a]},{names[p]}\n" for a, p in zip(test.y, predicted, strict=True))
    write_per_class_csv(metrics_dir / "per_class.csv", result.metrics["per_class"])

    for gate in result.gates:
        log.info("gate %s: %s", "PASS" if gate.passed else "FAIL", gate.reason)
    if not result.passed:
        reason = "evaluation gate failed: " + "; ".join(failed_reasons(result.gates))
        write_failure_report(params, "evaluate", reason)
        raise StageError(reason)
    return result


if __name__ == "__main__":
    main("evaluate", run)
