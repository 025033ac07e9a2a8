"""Metrics computed with numpy: one definition for train, evaluate, compress and gate.

Classification: accuracy, precision, recall, F1. Regression: MAE, RMSE, R^2.
"""

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


def regression_metrics(y_true, y_pred) -> dict:
    """MAE, RMSE and R^2 (1 - residual / total sum of squares) in the target's own units.

    R^2 is 0 for predicting the mean and negative for worse; a constant target (total sum of
    squares 0) gets R^2 1.0 when predicted exactly and 0.0 otherwise, never NaN.
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on an empty set")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} targets but {len(y_pred)} predictions")
    residual = y_true - y_pred
    ss_res = float((residual**2).sum())
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0)
    return {
        "mae": float(np.abs(residual).mean()),
        "rmse": float(np.sqrt((residual**2).mean())),
        "r2": float(r2),
        "n": int(len(y_true)),
    }


def task_metrics(task: str, y_true, outputs, class_names=()) -> dict:
    """Metrics for a model's raw outputs: logits (N, K) for classification, (N, 1) values for
    regression."""
    outputs = np.asarray(outputs)
    if task == "regression":
        return regression_metrics(y_true, outputs.reshape(len(outputs), -1)[:, 0])
    return classification_metrics(y_true, outputs.argmax(axis=1), class_names)
