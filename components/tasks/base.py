"""What every task declares; components/tasks/classification.py and regression.py fill it in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.stage import StageError


class TaskError(StageError):
    """Targets or model outputs that do not fit the task; the message says what to re-run."""


@dataclass(frozen=True)
class Task:
    name: str
    headline_keys: tuple[str, ...]  # the metrics a run is shown by
    summary_keys: tuple[str, ...]  # the test metrics the flow's summary prints
    record_keys: tuple[str, ...]  # what the champion record keeps of the served model
    compared_keys: tuple[str, ...]  # what the champion gate compares
    drop_keys: tuple[str, ...]  # what a compressed model may lose at most max_drop of
    variant_keys: tuple[str, ...]  # the metrics compress.json records per variant
    selection_key: str  # the one metric that ranks compressed variants
    val_metric: str  # the per-epoch validation metric train logs (besides val_loss)
    val_maximise: bool  # whether a larger val_metric is better
    required_metrics: tuple[str, ...]  # what evaluate.json must hold for this task
    has_classes: bool  # predictions are class labels (confusion matrix, per-class figures)
    # compress.max_accuracy_drop, as the reason of a drop gate names it ("" when obvious)
    drop_param: str = ""

    # -- what subclasses define -----------------------------------------------------------

    def num_outputs(self, class_names: Sequence[str]) -> int:
        """Outputs per example of a network for this task."""
        raise NotImplementedError

    def loss(self, outputs, targets, target_var: float = 1.0):
        """The training loss (torch) of a batch's outputs."""
        raise NotImplementedError

    def check_test(self, y: np.ndarray, class_names: Sequence[str]) -> None:
        """Refuse a test split whose targets this task cannot score."""
        raise NotImplementedError

    def predictions(self, outputs, n: int, source: str = "the model") -> np.ndarray:
        """Outputs (logits or values) as one prediction per example."""
        raise NotImplementedError

    def metrics(
        self, y: np.ndarray, outputs, class_names: Sequence[str], source: str = "the model"
    ) -> dict:
        """The test metrics of raw outputs."""
        raise NotImplementedError

    def gates(self, metrics: dict, params) -> tuple:
        """The absolute gates (components/gates.py) for ``evaluate`` params."""
        raise NotImplementedError

    def words(self, metrics: dict) -> str:
        """The headline metrics in words, e.g. ``accuracy 0.9740, macro F1 0.9738``."""
        from components.gates import LABELS

        return ", ".join(
            f"{LABELS.get(k, k)} {metrics[k]:.4f}" for k in self.headline_keys if k in metrics
        )
