"""Classification metrics computed with numpy: one definition for evaluate and compress."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[i, j]`` counts examples of true class i predicted as class j."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def classification_metrics(y_true, y_pred, class_names) -> dict:
    """Accuracy, macro precision/recall/F1 and per-class figures.

    A class never predicted gets precision 0 (not NaN), so the macro average stays honest.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty set")
    k = len(class_names)
    m = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(m).astype(float)
    predicted, actual = m.sum(axis=0), m.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / m.sum()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, name in enumerate(class_names)
        },
    }
