"""Classification: logits in, the most likely class out; accuracy, precision, recall, F1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from components.tasks.base import Task, TaskError


class Classification(Task):
    def num_outputs(self, class_names: Sequence[str]) -> int:
        return len(class_names)

    def loss(self, outputs, targets, target_var: float = 1.0):
        from torch.nn import functional as F

        return F.cross_entropy(outputs, targets)

    def check_test(self, y: np.ndarray, class_names: Sequence[str]) -> None:
        if len(y) == 0:
            raise TaskError("the test split is empty: nothing to evaluate")
        if y.min() < 0 or y.max() >= len(class_names):
            bad = int(y.max() if y.max() >= len(class_names) else y.min())
            raise TaskError(
                f"the test split has label {bad}, which the model does not know "
                f"(it has {len(class_names)} classes)"
            )

    def predictions(self, outputs, n: int, source: str = "the model") -> np.ndarray:
        return np.asarray(outputs).argmax(axis=1)

    def metrics(self, y, outputs, class_names, source: str = "the model") -> dict:
        from components.metrics import classification_metrics

        metrics = classification_metrics(y, self.predictions(outputs, len(y)), class_names)
        metrics["min_class_recall"] = min(c["recall"] for c in metrics["per_class"].values())
        return metrics

    def gates(self, metrics: dict, params) -> tuple:
        from components.gates import at_least

        return (
            at_least("accuracy", "accuracy", metrics["accuracy"], params.min_accuracy),
            at_least("macro_f1", "macro F1", metrics["macro_f1"], params.min_macro_f1),
            class_recall_gate(metrics["per_class"], params.min_class_recall),
        )


def class_recall_gate(per_class: dict, limit: float):
    """The lowest recall of any class must reach ``limit``: no class may be sacrificed."""
    from components.gates import Gate, at_least

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
    return at_least("min_class_recall", "lowest class recall", recall, limit, f" (class {worst!r})")


CLASSIFICATION = Classification(
    name="classification",
    headline_keys=("accuracy", "macro_f1"),
    summary_keys=("accuracy", "macro_precision", "macro_recall", "macro_f1"),
    record_keys=("accuracy", "macro_f1", "min_class_recall"),
    compared_keys=("accuracy", "macro_f1"),
    drop_keys=("accuracy", "macro_f1"),
    variant_keys=("accuracy", "macro_f1"),
    selection_key="accuracy",
    val_metric="val_accuracy",
    required_metrics=("accuracy", "macro_f1", "min_class_recall", "per_class"),
    has_classes=True,
    val_maximise=True,
)
