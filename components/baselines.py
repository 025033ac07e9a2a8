"""Classical baselines: what a practitioner fits first, on the same splits as the network.

The evaluate stage fits each baseline its data kind names (components/kinds/: ``baselines``)
on the training split, scores it on the test split with the task's own metrics, and reports it
beside the network (``metrics/baselines.json``, the summary, the report). The gate
``evaluate.min_lift_over_baseline`` (off unless set) can then require the network to beat the
best of them by that much (a small negative number tolerates trailing it).

The baselines, by name:

- ``linear``: logistic regression (classification) or ridge regression (regression) on the
  flattened, scaled inputs; for a time series window that is an autoregressive model with the
  other inputs as exogenous terms, fitted by least squares as statsmodels' AutoReg would;
- ``boosted_trees``: histogram gradient boosting (scikit-learn), for tables;
- ``rbf_svc``: an RBF support vector classifier, for small image sets only (its cost grows with
  the square of the rows);
- ``persistence``: a forecast that the target stays at its last observed value (time series
  whose target is one of the inputs).

Cost is bounded: at most ``evaluate.baseline_max_train_rows`` training examples (a seeded
sample), and each baseline's fit and predict time is measured and recorded.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from components.dataset import DatasetMeta, Split
from components.tasks import Task

log = logging.getLogger("pipeline.baselines")

LINEAR, BOOSTED, RBF_SVC, PERSISTENCE = "linear", "boosted_trees", "rbf_svc", "persistence"
RBF_SVC_MAX_ROWS = 5000  # above this an RBF SVC takes minutes: it is left out


@dataclass(frozen=True)
class BaselineScore:
    name: str  # e.g. "logistic_regression", "ridge", "persistence"
    metrics: dict  # the task's test metrics (headline keys), as for the network
    fit_seconds: float
    train_rows: int  # examples it was fitted on (a sample when the split is larger)


SCORE_ROWS = 8192  # test rows scored at a time: 8,192 28x28 images are 51 MB as float64


def flat(x: np.ndarray, scale: float) -> np.ndarray:
    """One float64 row per example, scaled (in place: one copy of ``x``, not two)."""
    out = np.array(x, dtype=np.float64).reshape(len(x), -1)
    out *= scale
    return out


def _estimator(name: str, task: Task, seed: int):
    """The scikit-learn model behind a baseline name, for this task."""
    # Each import where its model is asked for: sklearn.ensemble alone takes ~1 s to import,
    # and images never fit it.
    classify = task.has_classes
    if name == LINEAR:
        from sklearn.linear_model import LogisticRegression, Ridge

        # Mildly regularised (C=0.1): on MNIST's 784 pixels it converges in under 100 lbfgs
        # iterations (C=1 had not after 300) and scores as well (0.899 vs 0.894).
        return LogisticRegression(C=0.1, max_iter=300) if classify else Ridge(alpha=1.0)
    if name == BOOSTED:
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        return (
            HistGradientBoostingClassifier(random_state=seed)
            if classify
            else HistGradientBoostingRegressor(random_state=seed)
        )
    if name == RBF_SVC:
        from sklearn.svm import SVC

        return SVC(kernel="rbf", gamma="scale", random_state=seed)
    raise ValueError(f"unknown baseline {name!r}")


def display_name(name: str, task: Task) -> str:
    if name == LINEAR:
        return "logistic_regression" if task.has_classes else "ridge"
    return name


def _outputs(model, x: np.ndarray, task: Task, n_classes: int) -> np.ndarray:
    """A fitted model's test outputs in the form the task scores: one score per class (the
    network's logits' shape), or one value per example."""
    if not task.has_classes:
        return np.asarray(model.predict(x), dtype=np.float64)
    predicted = np.asarray(model.predict(x), dtype=np.int64)
    scores = np.zeros((len(x), n_classes))
    scores[np.arange(len(x)), predicted] = 1.0
    return scores


def _scores(model, x: np.ndarray, scale: float, task: Task, n_classes: int) -> np.ndarray:
    """:func:`_outputs` of ``x``, SCORE_ROWS at a time: a shard (26,000 images) as float64 at
    once took 160 MB."""
    if len(x) <= SCORE_ROWS:
        return _outputs(model, flat(x, scale), task, n_classes)
    return np.concatenate([
        _outputs(model, flat(x[i : i + SCORE_ROWS], scale), task, n_classes)
        for i in range(0, len(x), SCORE_ROWS)
    ])  # fmt: skip


def persistence_outputs(test: Split, meta: DatasetMeta) -> np.ndarray | None:
    """The target's last observed value in each window (in target units), or None when the
    target is not among the window's inputs."""
    from components.model import last_target_input  # torch: imported when needed

    last = last_target_input(meta)
    if test.x.ndim != 3 or last is None:
        return None
    return test.map_x(last.decode)


def fit_baselines(
    names: Sequence[str],
    train: Split,
    test: Split,
    meta: DatasetMeta,
    task: Task,
    input_scale: float,
    max_train_rows: int,
    seed: int = 0,
) -> list[BaselineScore]:
    """Fit each named baseline on (a sample of) ``train`` and score it on ``test`` (read a chunk
    at a time when it is sharded)."""
    train = train.sample(max_train_rows, seed)
    x_train = flat(train.x, input_scale)
    n_classes = len(meta.class_names)
    scores = []
    for name in names:
        if name == RBF_SVC and len(train) > RBF_SVC_MAX_ROWS:
            log.info("baseline rbf_svc left out: %d training rows (at most %d)", len(train),
                     RBF_SVC_MAX_ROWS)  # fmt: skip
            continue
        if task.has_classes and len(np.unique(train.y)) < 2:
            continue  # one class in the sample: nothing to fit
        started = time.perf_counter()
        if name == PERSISTENCE:
            outputs = persistence_outputs(test, meta)
            if outputs is None:
                continue
        else:
            model = _estimator(name, task, seed)
            with warnings.catch_warnings():
                # lbfgs may stop at max_iter on raw-ish pixels: a baseline, not a tuned model;
                # its figure says how good it got.
                from sklearn.exceptions import ConvergenceWarning

                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x_train, train.y)
            outputs = test.map_x(
                lambda x, model=model: _scores(model, x, input_scale, task, n_classes)
            )
        seconds = time.perf_counter() - started
        metrics = task.metrics(test.y, outputs, meta.class_names, source=f"baseline {name}")
        headline = {k: float(metrics[k]) for k in task.headline_keys}
        score = BaselineScore(display_name(name, task), headline, round(seconds, 3), len(train))
        log.info("baseline %s: %s (fitted on %d examples in %.1f s)", score.name,
                 task.words(headline), len(train), seconds)  # fmt: skip
        scores.append(score)
    return scores


def best(scores: Sequence[BaselineScore], task: Task) -> BaselineScore | None:
    """The baseline with the best selection metric (accuracy, R^2)."""
    key = task.selection_key
    return max(scores, key=lambda s: s.metrics[key], default=None)


def lift_gate(network: dict, scores: Sequence[BaselineScore], task: Task, min_lift: float):
    """The network's selection metric minus the best baseline's must reach ``min_lift``."""
    from components.gates import LABELS, Gate, at_least

    top = best(scores, task)
    key = task.selection_key
    if top is None:
        return Gate("min_lift_over_baseline", 0.0, min_lift, True, "no baseline to compare with")
    lift = float(network[key]) - top.metrics[key]
    detail = (
        f" ({LABELS.get(key, key)} {float(network[key]):.4f} vs {top.name} "
        f"{top.metrics[key]:.4f}; evaluate.min_lift_over_baseline)"
    )
    return at_least("min_lift_over_baseline", "lift over the best baseline", lift, min_lift,
                    detail)  # fmt: skip
