"""Tiny image classifiers made in the test, and the bentos the package stage builds from them.

The model is x/255 -> flatten -> linear on 1x8x8 images, 3 classes: no training, any seed gives
another model whose answers :func:`reference_probabilities` computes in this process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.config import PackageParams
from components.dataset import DatasetMeta

CLASS_NAMES = ("a", "b", "c")
IMAGE_SHAPE = (1, 8, 8)
MAX_BATCH = 4  # what tiny_settings writes into model.json
MAX_IMAGE_BYTES = 4096  # likewise


def make_tiny_onnx(path: Path, seed: int = 0, n_classes: int = len(CLASS_NAMES)) -> Path:
    """A classifier shaped like the pipeline's: raw pixels in ("inputs", any batch), logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    features = int(np.prod(IMAGE_SHAPE))
    weight = rng.normal(0, 1, (features, n_classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, n_classes).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["inputs", "scale"], ["scaled"]),
            helper.make_node("Flatten", ["scaled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[
            numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what every onnxruntime of the last years reads
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_meta(path: Path, class_names=CLASS_NAMES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    DatasetMeta(tuple(class_names), IMAGE_SHAPE, "test", {"train": 3}).save(path)
    return path


def tiny_settings(name: str = "tiny-classifier", **changes) -> PackageParams:
    """The package section for tiny models: 4 images per batch, small limits, no cloud."""
    edge = {
        "bento_name": f"{name}-edge",
        "confidence_threshold": 0.9,
        "cloud_url": None,
        "cloud_timeout_s": 2.0,
        "cloud_retry_s": 10.0,
    } | changes.pop("edge", {})
    values = {
        "bento_name": name,
        "model_name": "tiny",
        "max_batch_size": MAX_BATCH,
        "max_latency_ms": 10000,
        "max_request_bytes": None,
        "max_image_bytes": MAX_IMAGE_BYTES,
        "edge": edge,
    } | changes
    return PackageParams.model_validate(values)


def package_tiny(
    root: Path, seed: int = 0, name: str = "tiny-classifier", with_edge: bool = False, **changes
):
    """Package a tiny model under ``root`` (model, meta, staging, artefacts all inside); the
    PackageResult. ``with_edge=True`` builds the edge bento too, from the same tiny model."""
    from components.package import package

    onnx_file = root / "models" / "onnx" / "int8.onnx"
    if not onnx_file.exists():
        make_tiny_onnx(onnx_file, seed)
    meta_file = root / "data" / "meta.json"
    if not meta_file.exists():
        write_meta(meta_file)
    return package(
        onnx_file,
        meta_file,
        tiny_settings(name, **changes),
        served_variant="int8",
        staging_dir=root / "build" / "bento",
        artefacts_dir=root / "artefacts",
        metrics={"accuracy": 0.75},
        edge_onnx_file=onnx_file if with_edge else None,
        edge_metrics={"accuracy": 0.75},
    )


def image(seed: int = 0) -> np.ndarray:
    """One random (H, W) image of raw pixel values."""
    h, w = IMAGE_SHAPE[1:]
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.float64)


def reference_probabilities(onnx_file: Path, images: np.ndarray) -> np.ndarray:
    """What onnxruntime in this process says for (N, 1, H, W) raw-pixel images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"inputs": images.astype(np.float32)})[0].astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
