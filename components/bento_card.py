"""What a bento says about its model: the model card the services read, the checks before a
build, the few metrics it carries, and its description and labels.

The data kind (components/kinds/) says what goes in and which routes take it; the task
(components/tasks/) what comes out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components import kinds, tasks
from components.dataset import DatasetMeta
from components.onnx_files import INPUT_NAME, input_problem
from components.stage import StageError, file_digest


def model_card(onnx_file: Path, meta: DatasetMeta, model_name: str, variant: str) -> dict:
    """What the service reads from model.json: the model, the data kind and task, what goes in
    (the kind's card fields: shape, preprocessing spec) and what comes out."""
    digest = file_digest(onnx_file)
    card = {
        "model": f"{model_name}:{variant}-{digest[:12]}",
        "model_sha256": digest,
        "served_variant": variant,
        "kind": meta.kind,
        "task": meta.task,
        "class_names": list(meta.class_names),
        "input_shape": list(meta.input_shape),
    }
    card.update(kinds.get(meta.kind).card_fields(meta))
    return card


def check_meta(meta: DatasetMeta, meta_file: Path) -> None:
    """What the services need of the data set's metadata, checked before any build."""
    if not tasks.get(meta.task).has_classes:
        if meta.class_names:
            raise StageError(f"{meta_file}: a regression data set has no class_names")
    elif len(set(meta.class_names)) != len(meta.class_names):
        raise StageError(f"{meta_file}: class names must be unique, got {meta.class_names}")
    elif not meta.class_names:
        raise StageError(f"{meta_file}: a classification data set needs its class_names")
    kinds.get(meta.kind).check_servable(meta, meta_file)


def check_model(
    onnx_file: Path, input_shape: tuple[int, ...], n_classes: int, task: str = "classification"
) -> None:
    """Fail before building when the model cannot serve inputs of the data set's shape: a
    float32 batch of zeros shaped ``(2, *input_shape)`` (an image, a row of encoded features
    or a sequence) must give ``(2, n_classes)`` logits, or ``(2, 1)`` values for regression."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise StageError(f"{onnx_file} is not a loadable ONNX model: {exc}") from None
    problem = input_problem(onnx_file, [i.name for i in session.get_inputs()])
    if problem:
        raise StageError(problem)
    probe = np.zeros((2, *input_shape), dtype=np.float32)
    try:
        logits = session.run(None, {INPUT_NAME: probe})[0]
    except Exception as exc:
        raise StageError(
            f"{onnx_file} cannot run a batch of 2 inputs shaped {tuple(input_shape)}: {exc}"
        ) from None
    if not tasks.get(task).has_classes:
        if logits.shape != (2, 1):
            raise StageError(
                f"{onnx_file} answers outputs shaped {logits.shape} for 2 inputs; a regression "
                "model answers one value each, (2, 1)"
            )
        return
    if logits.shape != (2, n_classes):
        raise StageError(
            f"{onnx_file} answers logits shaped {logits.shape} for 2 images; the data set has "
            f"{n_classes} classes"
        )


def summarise_metrics(evaluate: dict | None, compress: dict | None, variant: str) -> dict:
    """The few numbers worth carrying in the bento: the served variant's test metrics first.

    ``accuracy``/``macro_f1`` (classification) or ``r2``/``rmse``/``mae`` (regression) are
    the served ONNX variant's (from compress.json), falling back to the PyTorch model's
    (evaluate.json) when compress.json lacks them. Whatever is missing or not a number is left
    out.
    """

    def numbers(source: dict | None, keys: tuple[str, ...], prefix: str = "") -> dict:
        source = source or {}
        return {
            prefix + k: float(source[k])
            for k in keys
            if isinstance(source.get(k), int | float) and not isinstance(source.get(k), bool)
        }

    keys = ("accuracy", "macro_f1", "r2", "rmse", "mae")
    variants = (compress or {}).get("variants")
    served = variants.get(variant) if isinstance(variants, dict) else None
    out = numbers(evaluate if isinstance(evaluate, dict) else None, keys, prefix="pytorch_")
    out.update(numbers(served if isinstance(served, dict) else None, keys))
    for key in keys:
        if key not in out and f"pytorch_{key}" in out:
            out[key] = out[f"pytorch_{key}"]
    return dict(sorted(out.items()))


def describe(card: dict, role: str) -> str:
    """The bento's description: what it predicts from what, how to call it."""
    kind, task = kinds.get(card["kind"]), tasks.get(card["task"])
    if task.has_classes:
        what = f"Classifies into {len(card['class_names'])} classes"
    else:
        what = f"Predicts {card.get('target') or 'a value'} (in its own units)"
    lines = [
        f"# {card['model']} ({role})",
        "",
        f"{what} {kind.inputs_phrase(card)}, with the {card['served_variant']} ONNX model.",
    ]
    for key, name in (("accuracy", "accuracy"), ("r2", "R^2"), ("rmse", "RMSE"), ("mae", "MAE")):
        if card["metrics"].get(key) is not None:
            lines.append(f"Test {name}: {card['metrics'][key]:.4g}.")
    answer = "`{label, probabilities}`" if task.has_classes else "`{value}` in the target's units"
    usage = f"{kind.routes_phrase(card, role)}; each answers {answer}."
    if role != "edge":
        usage += " `/readyz`, `/livez`, `/metrics`; OpenAPI page at `/`."
    elif task.has_classes:
        usage += (
            f" Examples whose top probability is below {card['edge']['confidence_threshold']} "
            "go to the cloud bento at `CLOUD_URL` when one is set; every answer says who "
            "answered (`answered_by`)."
        )
    else:
        usage += " Regression is always answered here: there is no confidence to hand off on."
    return "\n".join([*lines, "", usage]) + "\n"


def shape_labels(card: dict) -> dict[str, str]:
    """The bento labels saying what the model takes and gives."""
    labels = kinds.get(card["kind"]).shape_labels(card)
    if tasks.get(card["task"]).has_classes:
        labels["num_classes"] = str(len(card["class_names"]))
    else:
        labels["target"] = card.get("target") or ""
    return labels
