"""Evaluate: test-split metrics, a confusion matrix, and the gate that guards packaging.

Writes ``evaluate.json`` (metrics, per-class figures and each gate's verdict) and
``confusion.csv`` (one row per test example, DVC's confusion template). A gate that does not
pass fails the stage, so the flow stops before compress and package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import EvaluateParams, Params
from components.dataset import DatasetMeta, ImageSet, load_images, meta_path, split_path
from components.metrics import classification_metrics
from components.model import load_model, predict_logits
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.evaluate")


@dataclass(frozen=True)
class Gate:
    name: str
    value: float
    threshold: float
    passed: bool

    @property
    def reason(self) -> str:
        verb = ">=" if self.passed else "<"
        return f"{self.name} {self.value:.4f} {verb} {self.threshold:.4f}"


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    gates: tuple[Gate, ...]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def check_gates(metrics: dict, params: EvaluateParams) -> tuple[Gate, ...]:
    """Absolute gates: minimum accuracy and minimum macro F1."""
    thresholds = {"accuracy": params.min_accuracy, "macro_f1": params.min_macro_f1}
    return tuple(
        Gate(name, metrics[name], limit, metrics[name] >= limit)
        for name, limit in thresholds.items()
    )


def evaluate(predicted: np.ndarray, test: ImageSet, class_names, params: EvaluateParams):
    """The core: metrics of predicted labels against the test split, and the gates."""
    if len(test) == 0:
        raise StageError("the test split is empty: nothing to evaluate")
    if test.y.max() >= len(class_names):
        raise StageError(
            f"the test split has label {int(test.y.max())}, which the model does not know "
            f"(it has {len(class_names)} classes)"
        )
    metrics = classification_metrics(test.y, predicted, class_names)
    return EvaluateResult(metrics, check_gates(metrics, params))


def run(params: Params) -> EvaluateResult:
    paths = params.paths
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    test = load_images(split_path(paths.prepared_dir, "test"))
    model, described = load_model(paths.model_dir)
    if tuple(described["class_names"]) != meta.class_names:
        raise StageError(
            "the model was trained on classes "
            f"{described['class_names']} but the data has {list(meta.class_names)}"
        )
    predicted = predict_logits(model, test.x).argmax(dim=1).numpy()
    result = evaluate(predicted, test, meta.class_names, params.evaluate)

    metrics_dir = Path(paths.metrics_dir)
    write_json(
        metrics_dir / "evaluate.json",
        {
            **{k: round(v, 6) for k, v in result.metrics.items() if k != "per_class"},
            "test_examples": len(test),
            "per_class": result.metrics["per_class"],
            "gates": {
                g.name: {"value": round(g.value, 6), "threshold": g.threshold, "passed": g.passed}
                for g in result.gates
            },
            "passed": result.passed,
        },
    )
    names = meta.class_names
    with (metrics_dir / "confusion.csv").open("w") as fh:
        fh.write("actual,predicted\n")
        fh.writelines(f"{names[a]},{names[p]}\n" for a, p in zip(test.y, predicted, strict=True))

    for gate in result.gates:
        log.info("gate %s: %s", "PASS" if gate.passed else "FAIL", gate.reason)
    if not result.passed:
        failed = "; ".join(g.reason for g in result.gates if not g.passed)
        raise StageError(f"evaluation gate failed: {failed}")
    return result


if __name__ == "__main__":
    main("evaluate", run)
