"""The tasks a model can learn: one module each, asked by the stages instead of branching.

A task owns what differs between classification and regression: the loss, how outputs become
predictions, the metrics and which of them head a report, are kept in the champion record or
compared with the champion, the validation metric and its direction, and the gates that apply.
"""

from __future__ import annotations

from components.tasks.base import Task
from components.tasks.classification import CLASSIFICATION
from components.tasks.regression import REGRESSION

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, REGRESSION)}
NAMES = tuple(TASKS)


def get(name: str) -> Task:
    """The task called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {list(TASKS)}") from None


def of_metrics(metrics: dict) -> Task:
    """The task whose metrics these are: the ``task`` the file names, or else the task whose
    headline metric is there (measured metrics carry no name)."""
    if metrics.get("task") in TASKS:
        return TASKS[metrics["task"]]
    return REGRESSION if "r2" in metrics and "accuracy" not in metrics else CLASSIFICATION


__all__ = ["CLASSIFICATION", "NAMES", "REGRESSION", "TASKS", "Task", "get", "of_metrics"]
