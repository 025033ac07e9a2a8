"""A tiny project on disk for the gate, promote and report stages, with nothing trained.

A test split labelled by one tiny ONNX classifier (``GOOD_SEED``: right on every image), and the
files a run leaves up to compress (ONNX variants, compress.json, evaluate.json) for any other
seed; the same for a table regression whose target is a known linear map of its features, so
every accuracy and R^2 is known in advance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from components import evaluate, gate
from components.config import Params, parse_params
from components.dataset import ArraySet, DatasetMeta, load_arrays, save_arrays
from components.records import Verdicts
from components.stage import write_json
from components.tasks import CLASSIFICATION
from tests.conftest import tiny_params_dict
from tests.tiny_models import CLASS_NAMES, IMAGE_SHAPE, make_tiny_onnx

GOOD_SEED, BAD_SEED = 0, 1

# Loose enough for the random "bad" model (about chance, 1/3) to pass as a first champion.
GATE_PARAMS = {
    "evaluate": {
        "min_accuracy": 0.2,
        "min_macro_f1": 0.1,
        "min_class_recall": 0.0,
        "max_drop_vs_champion": 0.05,
        # A gate project holds a test split only (no train split to fit baselines on): the
        # baselines are tests/test_baselines.py's subject.
        "baselines": False,
    },
    "compress": {"max_accuracy_drop": 0.2},
}


# -- building a tiny project on disk ---------------------------------------------------------


def project_params(root: Path, **overrides) -> Params:
    raw = tiny_params_dict(root, "unused")
    for section, values in GATE_PARAMS.items():
        raw[section].update(values)
    for key, value in overrides.items():
        section, leaf = key.split(".")
        raw[section][leaf] = value
    raw["paths"]["champion_file"] = str(root / "deploy" / "champion.json")
    return parse_params(raw)


def labelled_split(model_file: Path, per_class: int = 12, seed: int = 0) -> ArraySet:
    """Random images, labelled by what ``model_file`` predicts; ``per_class`` of each class."""
    rng = np.random.default_rng(seed)
    # Sparse bright pixels: the linear model's classes then all occur (dense noise is one class).
    x = ((rng.random((4000, *IMAGE_SHAPE)) < 0.1) * 255).astype(np.uint8)
    y = gate.onnx_predict(model_file, x)
    keep = np.concatenate([np.flatnonzero(y == k)[:per_class] for k in range(len(CLASS_NAMES))])
    assert len(keep) == per_class * len(CLASS_NAMES), "the model never predicts some class"
    return ArraySet(x[keep], y[keep].astype(np.int64))


def write_test_split(params: Params, split: ArraySet) -> None:
    prepared = Path(params.paths.prepared_dir)
    save_arrays(split, prepared / "test.npz")
    DatasetMeta(CLASS_NAMES, IMAGE_SHAPE, "test", {"test": len(split)}).save(prepared / "meta.json")


def write_challenger(params: Params, int8_seed: int, fp32_seed: int | None = None) -> dict:
    """ONNX variants + the compress.json and evaluate.json a real run would leave; metrics."""
    onnx_dir = Path(params.paths.model_dir) / "onnx"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    make_tiny_onnx(onnx_dir / "int8.onnx", int8_seed)
    make_tiny_onnx(onnx_dir / "fp32.onnx", int8_seed if fp32_seed is None else fp32_seed)
    test = load_arrays(Path(params.paths.prepared_dir) / "test.npz")
    measured = {
        v: gate.measure(onnx_dir / f"{v}.onnx", test, CLASS_NAMES) for v in ("fp32", "int8")
    }
    metrics_dir = Path(params.paths.metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    variants = {
        v: {
            "size_bytes": (onnx_dir / f"{v}.onnx").stat().st_size,
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "latency_ms_batch1": 0.05,
        }
        for v, m in measured.items()
    }
    (metrics_dir / "compress.json").write_text(
        json.dumps({"variants": variants, "served_variant": "int8"})
    )
    network = measured["fp32"]  # the network answers like its fp32 export
    meta = DatasetMeta.load(Path(params.paths.prepared_dir) / "meta.json")
    write_json(metrics_dir / "evaluate.json", evaluate.metrics_record(network, meta, len(test)))
    verdicts = Verdicts.of(CLASSIFICATION.gates(network, params.evaluate))
    write_json(metrics_dir / "evaluate_gates.json", verdicts)
    return measured["int8"]


# -- regression: a table with a numeric target -----------------------------------------------
#
# A tiny table whose target is a known linear function of three standardised features, a real
# regression MLP (components.model) with those weights, and ONNX variants of the same linear map,
# so every R^2 is known without training.

FEATURES = ("rooms", "area", "age")
TARGET = "price"
WEIGHT = np.array([2.0, -1.0, 0.5])
BIAS = 10.0
PREPROCESS = {
    "version": 1,
    "columns": [{"name": f, "type": "numeric", "mean": 0.0, "std": 1.0} for f in FEATURES],
    "features": list(FEATURES),
}
REGRESSION_PARAMS = {
    "evaluate.min_r2": 0.5,
    "evaluate.max_drop_vs_champion": 0.05,
    "compress.max_accuracy_drop": 0.05,
}


def regression_split(n: int = 40, seed: int = 0, noise: float = 0.1) -> ArraySet:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, len(FEATURES))).astype(np.float32)
    y = (x @ WEIGHT + BIAS + rng.normal(0, noise, n)).astype(np.float32)
    return ArraySet(x, y)


def regression_meta(n: int, **changes) -> DatasetMeta:
    fields = {
        "class_names": (),
        "input_shape": (len(FEATURES),),
        "source": "data/external/houses.csv",
        "split_sizes": {"test": n},
        "kind": "table",
        "task": "regression",
        "target": TARGET,
        "feature_names": FEATURES,
        "preprocess": PREPROCESS,
    } | changes
    return DatasetMeta(**fields)


def write_regression_split(params: Params, split: ArraySet, **meta_changes) -> None:
    prepared = Path(params.paths.prepared_dir)
    save_arrays(split, prepared / "test.npz")
    regression_meta(len(split), **meta_changes).save(prepared / "meta.json")


def write_regression_model(params: Params, weight=WEIGHT, bias: float = BIAS) -> None:
    """A real regression MLP (no hidden layer) predicting ``x @ weight + bias`` in target units
    through its de-standardising buffers (mean 10, std 2), saved as train saves it."""
    import torch

    from components.model import NetConfig, build_model, save_model

    mean, std = 10.0, 2.0
    config = NetConfig(
        family="mlp",
        input_shape=(len(FEATURES),),
        num_classes=1,
        channels=(),
        hidden_units=(),
        dropout=0.0,
        batch_norm=False,
        activation="relu",
        task="regression",
        input_scale=1.0,
        target_mean=mean,
        target_std=std,
    )
    net = build_model(config)
    linear = net.classifier[-1]
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(np.asarray(weight) / std, dtype=torch.float32)[None])
        linear.bias.fill_((bias - mean) / std)
    save_model(
        net,
        config,
        params.paths.model_dir,
        extra={
            "class_names": [],
            "trained_epochs": 1,
            "kind": "table",
            "task": "regression",
            "target": TARGET,
            "feature_names": list(FEATURES),
            "preprocess": PREPROCESS,
        },
    )


def make_regression_onnx(path: Path, weight=WEIGHT, bias: float = BIAS) -> Path:
    """A regressor shaped like the pipeline's exports: ``len(weight)`` features in, (N, 1) target
    values out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(weight)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "weight", "bias"], ["values"])],
        "tiny_regressor",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(np.asarray(weight, np.float32).reshape(n, 1), "weight"),
            numpy_helper.from_array(np.array([bias], np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_regression_challenger(params: Params, int8_weight=WEIGHT) -> dict:
    """evaluate.json by the real evaluate stage on the exact model, then ONNX variants (fp32
    exact, int8 with ``int8_weight``) and the compress.json a regression run leaves."""
    write_regression_model(params)
    evaluate.run(params)
    onnx_dir = Path(params.paths.model_dir) / "onnx"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    make_regression_onnx(onnx_dir / "fp32.onnx")
    make_regression_onnx(onnx_dir / "int8.onnx", int8_weight)
    test = load_arrays(Path(params.paths.prepared_dir) / "test.npz")
    measured = {
        v: gate.measure(onnx_dir / f"{v}.onnx", test, (), "regression") for v in ("fp32", "int8")
    }
    variants = {
        v: {
            "size_bytes": (onnx_dir / f"{v}.onnx").stat().st_size,
            "r2": m["r2"],
            "rmse": m["rmse"],
            "mae": m["mae"],
            "r2_drop": measured["fp32"]["r2"] - m["r2"],
            "latency_ms_batch1": 0.02,
        }
        for v, m in measured.items()
    }
    (Path(params.paths.metrics_dir) / "compress.json").write_text(
        json.dumps(
            {
                "variants": variants,
                "served_variant": "int8",
                "int8_r2_drop": variants["int8"]["r2_drop"],
                "gate": {"max_accuracy_drop": params.compress.max_accuracy_drop, "passed": True},
            }
        )
    )
    return measured["int8"]


def finished_run(params: Params) -> Params:
    """Every file the report reads, as a passing, promoted run leaves them."""
    write_challenger(params, GOOD_SEED)
    gate.run(params)
    metrics = Path(params.paths.metrics_dir)
    (metrics / "train.json").write_text(
        json.dumps({"best_epoch": 3, "best_val_accuracy": 0.9, "epochs_run": 3})
    )
    (metrics / "train_history.csv").write_text(
        "epoch,train_loss,val_loss,val_accuracy\n1,null,0.9,0.6\n2,0.8,0.5,0.8\n3,0.4,0.3,0.9\n"
    )
    (metrics / "confusion.csv").write_text("actual,predicted\na,a\nb,b\nc,a\nc,c\n")
    return other_stage_files(params)


def other_stage_files(params: Params) -> Params:
    """validation.json, promote.json, bento.json and the validation pages of a promoted run."""
    metrics = Path(params.paths.metrics_dir)
    (metrics / "validation.json").write_text(
        json.dumps({"success": True, "evaluated_expectations": 33, "failed": []})
    )
    (metrics / "promote.json").write_text(
        json.dumps(
            {
                "format": 1,
                "run": "r0123456789ab",
                "bento_tag": "tiny:r0123456789ab",
                "promoted": True,
                "outcome": "promoted",
                "reason": "passed every gate; no champion yet",
                "champion_before": None,
                "champion_after": "r0123456789ab",
                "lineage": ["r0123456789ab"],
            }
        )
    )
    artefacts = Path(params.paths.artefacts_dir)
    artefacts.mkdir(parents=True, exist_ok=True)
    (artefacts / "bento.json").write_text(
        json.dumps({"tag": "tiny:r0123456789ab", "model_version": "r0123456789ab"})
    )
    docs = Path(params.paths.reports_dir) / "validation"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "summary.html").write_text("<html><body>33 checks passed</body></html>")
    (docs / "index.html").write_text("<html><body>Data Docs</body></html>")
    return params
