"""Regression: one value per example in the target's units; MAE, RMSE and R^2."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from components.tasks.base import Task, TaskError


class Regression(Task):
    def num_outputs(self, class_names: Sequence[str]) -> int:
        return 1

    def loss(self, outputs, targets, target_var: float = 1.0):
        # The net answers in target units; the loss is taken on the standardised scale (MSE /
        # variance of the training targets), so learning rates carry across data sets.
        from torch.nn import functional as F

        return F.mse_loss(outputs[:, 0], targets.float()) / target_var

    def check_test(self, y: np.ndarray, class_names: Sequence[str]) -> None:
        if len(y) == 0:
            raise TaskError("the test split is empty: nothing to evaluate")
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.number):
            raise TaskError(f"the test split's targets are {y.dtype}, not numbers: re-run ingest")
        bad = np.flatnonzero(~np.isfinite(y.astype(np.float64)))
        if len(bad):
            raise TaskError(
                f"the test split has {len(bad)} target(s) that are not finite numbers (first at "
                f"row {int(bad[0])}): re-run ingest"
            )

    def predictions(self, outputs, n: int, source: str = "the model") -> np.ndarray:
        """The one predicted value per example of outputs shaped (N,) or (N, 1)."""
        values = np.asarray(outputs, dtype=np.float64)
        values = values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
        if len(values) != n or values.shape[1] != 1:
            raise TaskError(
                f"{source} gives outputs shaped {tuple(np.shape(outputs))} for {n} examples; a "
                "regression model gives one value per example: re-run train"
            )
        bad = np.flatnonzero(~np.isfinite(values[:, 0]))
        if len(bad):
            raise TaskError(
                f"{source} predicts a value that is not a finite number for {len(bad)} of {n} "
                "test examples (a diverged training?): re-run train"
            )
        return values[:, 0]

    def metrics(self, y, outputs, class_names, source: str = "the model") -> dict:
        from components.metrics import regression_metrics

        return regression_metrics(y, self.predictions(outputs, len(y), source))

    def gates(self, metrics: dict, params) -> tuple:
        from components.gates import at_least

        gate = at_least("r2", "R^2", metrics["r2"], params.min_r2)
        # The reason names the param: R^2 thresholds are less obvious than accuracy's.
        return (dataclasses.replace(gate, reason=gate.reason + " (evaluate.min_r2)"),)


REGRESSION = Regression(
    name="regression",
    headline_keys=("r2", "rmse", "mae"),
    summary_keys=("r2", "rmse", "mae"),
    record_keys=("r2", "rmse", "mae"),
    compared_keys=("r2",),
    # R^2 is a share of the target's variance explained, on accuracy's 0-1 scale: the same
    # tolerance applies.
    drop_keys=("r2",),
    variant_keys=("r2", "rmse", "mae"),
    selection_key="r2",
    val_metric="val_rmse",
    required_metrics=("r2", "rmse", "mae"),
    has_classes=False,
    val_maximise=False,
    drop_param="compress.max_accuracy_drop",
)
