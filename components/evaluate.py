"""Evaluate: test-split metrics of the trained network, and its task's absolute gates.

The task (components/tasks/) says which metrics and gates apply: accuracy, macro F1 and the
lowest class recall for classification (``evaluate.min_accuracy``, ``min_macro_f1``,
``min_class_recall``), R^2 for regression (``evaluate.min_r2``, outputs in target units).

Writes the metrics (``evaluate.json``, numbers only: a changed threshold leaves it as it was,
so compress, which depends on it, does not re-run) apart from the verdicts
(``evaluate_gates.json``, one reason per gate), the headline ``headline/evaluate.json`` (the
task's headline metrics: what ``dvc exp show`` compares), and the plot files ``confusion.csv``,
``per_class.csv`` and ``predictions.csv`` (each written for both tasks so DVC finds them, empty
but for the header where the task has none). A gate that does not pass fails the stage, so the
flow stops before compress and package and writes the page of the stopped run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from components import kinds, tasks
from components.baselines import BaselineScore, best, fit_baselines, lift_gate
from components.config import EvaluateParams, Params
from components.dataset import DatasetMeta, Split, load_split, meta_path
from components.gates import Gate, failed_reasons
from components.records import (
    BASELINES_FILE,
    EVALUATE_FILE,
    EVALUATE_GATES_FILE,
    BaselineFigures,
    Baselines,
    EvaluateMetrics,
    Verdicts,
    evaluate_headline,
    write_headline,
    write_json,
)
from components.stage import StageError, main, write_text
from components.tasks import Task

if TYPE_CHECKING:  # the model module imports torch: only the stage run needs it
    from components.model import ModelCard

log = logging.getLogger("pipeline.evaluate")


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    gates: tuple[Gate, ...]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def evaluate(
    outputs, test: Split, class_names, params: EvaluateParams, task: Task = tasks.CLASSIFICATION
) -> EvaluateResult:
    """The core: the task's metrics of a model's raw outputs on the test split, and its gates."""
    task.check_test(test.y, class_names)
    metrics = task.metrics(test.y, outputs, class_names)
    return EvaluateResult(metrics, task.gates(metrics, params))


def metrics_record(metrics: dict, meta: DatasetMeta, examples: int) -> EvaluateMetrics:
    """The metrics as evaluate.json holds them (rounded; per-class figures kept)."""
    numbers = {
        k: round(float(v), 6)
        for k, v in metrics.items()
        if k in EvaluateMetrics.model_fields and k != "per_class" and isinstance(v, int | float)
    }
    per_class = None
    if "per_class" in metrics:
        per_class = {
            name: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.items()}
            for name, c in metrics["per_class"].items()
        }
    return EvaluateMetrics(
        task=meta.task,
        target=meta.target,
        test_examples=examples,
        per_class=per_class,
        **{k: v for k, v in numbers.items() if k != "test_examples"},
    )


def write_per_class_csv(path: Path, per_class: dict) -> None:
    """One row per class: the per-class plot that `dvc plots diff` compares between runs."""
    lines = ["class,precision,recall,f1,support"]
    lines += [
        f"{name},{c['precision']:.6f},{c['recall']:.6f},{c['f1']:.6f},{c['support']}"
        for name, c in per_class.items()
    ]
    write_text(path, "\n".join(lines) + "\n")


def write_predictions_csv(path: Path, actual=None, predicted=None) -> None:
    """Regression: actual, predicted and residual (predicted - actual) per test example, the
    predicted-vs-actual scatter. Without values (classification): the header only."""
    lines = ["actual,predicted,residual"]
    if actual is not None:
        lines += [
            f"{float(a):.9g},{float(p):.9g},{float(p) - float(a):.9g}"
            for a, p in zip(actual, predicted, strict=True)
        ]
    write_text(path, "\n".join(lines) + "\n")


def write_confusion_csv(path: Path, actual, predicted, class_names) -> None:
    """One row per test example, class names (header only without classes): the confusion plot."""
    lines = ["actual,predicted\n"]
    if class_names:
        names = list(class_names)
        lines += [f"{names[a]},{names[p]}\n" for a, p in zip(actual, predicted, strict=True)]
    write_text(path, "".join(lines))


def check_model_fits(card: ModelCard, meta: DatasetMeta, test: Split, model_dir) -> None:
    """The trained model (model.json) is for this data (meta.json): task, classes, input shape."""
    where = Path(model_dir) / "model.json"
    if card.task != meta.task:
        raise StageError(
            f"{where}: the model was trained for {card.task} but the data is {meta.task} "
            f"(prepared meta.json task): re-run the train stage"
        )
    if tuple(card.class_names) != meta.class_names:
        raise StageError(
            f"the model was trained on classes {card.class_names} but the data has "
            f"{list(meta.class_names)}"
        )
    if card.target != meta.target:
        raise StageError(
            f"{where}: the model predicts {card.target!r} but the data's target is "
            f"{meta.target!r}: re-run the train stage"
        )
    shape = tuple(card.config["input_shape"])
    if len(test) and tuple(test.x.shape[1:]) != shape:  # (a sharded split knows its shape)
        raise StageError(
            f"{where}: the model takes examples shaped {shape} but the test split's are "
            f"{tuple(test.x.shape[1:])}: re-run the train stage"
        )


def compare_with_baselines(
    result: EvaluateResult, test: Split, meta: DatasetMeta, params: Params, task: Task
) -> Baselines:
    """The data kind's classical baselines, fitted on the train split and scored on ``test``
    (none when ``evaluate.baselines`` is off), beside the network's headline metrics."""
    network = {k: float(result.metrics[k]) for k in task.headline_keys}
    scores = []
    if params.evaluate.baselines:
        kind = kinds.get(meta.kind)
        train = load_split(params.paths.prepared_dir, "train")
        scores = fit_baselines(
            kind.baselines, train, test, meta, task, kind.input_scale,
            params.evaluate.baseline_max_train_rows, seed=params.train.seed,
        )  # fmt: skip
    top = best(scores, task)
    key = task.selection_key
    return Baselines(
        network=network,
        baselines={
            s.name: BaselineFigures(
                metrics=s.metrics, fit_seconds=s.fit_seconds, train_rows=s.train_rows
            )
            for s in scores
        },
        best=top.name if top else None,
        lift=round(network[key] - top.metrics[key], 6) if top else None,
    )


def run(params: Params) -> EvaluateResult:
    from components.model import load_model, predict_logits

    paths = params.paths
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    task = tasks.get(meta.task)
    test = load_split(paths.prepared_dir, "test")
    model, card = load_model(paths.model_dir)
    check_model_fits(card, meta, test, paths.model_dir)
    task.check_test(test.y, meta.class_names)  # before running the model on it
    outputs = test.map_x(lambda x: predict_logits(model, x).numpy())
    result = evaluate(outputs, test, meta.class_names, params.evaluate, task)

    metrics_dir = Path(paths.metrics_dir)
    baselines = compare_with_baselines(result, test, meta, params, task)
    write_json(metrics_dir / BASELINES_FILE, baselines)
    if params.evaluate.min_lift_over_baseline is not None:
        scores = [
            BaselineScore(name, dict(b.metrics), b.fit_seconds, b.train_rows)
            for name, b in baselines.baselines.items()
        ]
        gate = lift_gate(result.metrics, scores, task, params.evaluate.min_lift_over_baseline)
        result = EvaluateResult(result.metrics, (*result.gates, gate))
    record = metrics_record(result.metrics, meta, len(test))
    write_json(metrics_dir / EVALUATE_FILE, record)
    write_headline(metrics_dir, "evaluate", evaluate_headline(record))
    write_json(metrics_dir / EVALUATE_GATES_FILE, Verdicts.of(result.gates))
    predicted = task.predictions(outputs, len(test))
    names = meta.class_names if task.has_classes else ()
    write_confusion_csv(metrics_dir / "confusion.csv", test.y, predicted, names)
    write_per_class_csv(metrics_dir / "per_class.csv", result.metrics.get("per_class", {}))
    if task.has_classes:
        write_predictions_csv(metrics_dir / "predictions.csv")
    else:
        write_predictions_csv(metrics_dir / "predictions.csv", test.y, predicted)

    for gate in result.gates:
        log.info("gate %s: %s", "PASS" if gate.passed else "FAIL", gate.reason)
    if not result.passed:
        raise StageError("evaluation gate failed: " + "; ".join(failed_reasons(result.gates)))
    return result


if __name__ == "__main__":
    main("evaluate", run)
