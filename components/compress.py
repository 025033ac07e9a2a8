"""Compress: export the trained network to ONNX (fp32), quantize it to int8, re-evaluate both.

Int8 uses ONNX Runtime's static QDQ quantization, calibrated on training images (never the
test split). Every export is checked against its PyTorch source before it is used, and the
int8 model must keep test accuracy within ``compress.max_accuracy_drop`` of fp32.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import CompressParams, Params
from components.dataset import DatasetMeta, ImageSet, load_images, meta_path, split_path
from components.metrics import classification_metrics
from components.model import load_model, predict_logits
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.compress")

INPUT_NAME, OUTPUT_NAME = "images", "logits"
VARIANTS = ("fp32", "int8")


@dataclass(frozen=True)
class VariantReport:
    name: str
    size_bytes: int
    accuracy: float
    macro_f1: float
    latency_ms_batch1: float


@dataclass(frozen=True)
class CompressResult:
    variants: dict[str, VariantReport]
    accuracy_drop: float
    passed: bool


def export_onnx(model, image_shape: tuple[int, int, int], path: Path, tolerance: float) -> None:
    """Export with a dynamic batch dimension and check it against PyTorch on sample inputs."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randint(0, 256, (4, *image_shape)).float()
    program = torch.onnx.export(
        model.eval(),
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
        external_data=False,
        dynamo=True,
        verbose=False,
    )
    program.save(str(path), external_data=False)

    probe = torch.randint(0, 256, (7, *image_shape)).float()  # another batch size than exported
    expected = predict_logits(model, probe).numpy()
    got = run_onnx(path, probe.numpy())
    worst = float(np.abs(expected - got).max())
    if worst > tolerance:
        raise StageError(
            f"ONNX export of {path.name} differs from PyTorch by {worst:.2e} "
            f"(compress.onnx_tolerance is {tolerance:.0e})"
        )


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # fixed threads: comparable latencies across variants
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    session = _session(path)
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size].astype(np.float32)})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Static int8 (QDQ, per-channel weights), calibrated on the given images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(
                {INPUT_NAME: calibration[i : i + 32].astype(np.float32)}
                for i in range(0, len(calibration), 32)
            )

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )


def latency_ms(path: Path, image_shape, repeats: int = 200) -> float:
    """Median wall time of one batch-1 inference (1 thread), in milliseconds."""
    session = _session(path)
    x = np.random.default_rng(0).integers(0, 256, (1, *image_shape)).astype(np.float32)
    for _ in range(20):
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def pick_calibration(train: ImageSet, n: int, seed: int = 0) -> np.ndarray:
    if n > len(train):
        raise StageError(
            f"compress.calibration_samples is {n} but the training split has only {len(train)} "
            "images"
        )
    idx = np.random.default_rng(seed).choice(len(train), size=n, replace=False)
    return train.x[np.sort(idx)]


def compress(
    model, meta: DatasetMeta, train: ImageSet, test: ImageSet, params: CompressParams, out_dir: Path
) -> CompressResult:
    """The core: export, quantize, re-evaluate each variant, apply the accuracy-drop gate."""
    calibration = pick_calibration(train, params.calibration_samples)  # fail before any work
    shape = tuple(meta.image_shape)
    paths = {v: Path(out_dir) / f"{v}.onnx" for v in VARIANTS}
    export_onnx(model, shape, paths["fp32"], params.onnx_tolerance)
    quantize_int8(paths["fp32"], paths["int8"], calibration)

    reports = {}
    for name, path in paths.items():
        predicted = run_onnx(path, test.x).argmax(axis=1)
        m = classification_metrics(test.y, predicted, meta.class_names)
        reports[name] = VariantReport(
            name, path.stat().st_size, m["accuracy"], m["macro_f1"], latency_ms(path, shape)
        )
    drop = reports["fp32"].accuracy - reports["int8"].accuracy
    passed = drop <= params.max_accuracy_drop
    return CompressResult(reports, drop, passed)


def run(params: Params) -> CompressResult:
    paths, cfg = params.paths, params.compress
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    train = load_images(split_path(paths.prepared_dir, "train"))
    test = load_images(split_path(paths.prepared_dir, "test"))
    model, _ = load_model(paths.model_dir)

    # Build into a scratch folder and swap it in only when everything passed, so a failed
    # run leaves the previous good exports in place.
    out_dir = Path(paths.model_dir) / "onnx"
    scratch = Path(tempfile.mkdtemp(prefix="onnx-", dir=paths.model_dir))
    scratch.chmod(0o755)
    try:
        result = compress(model, meta, train, test, cfg, scratch)
        fp32, int8 = result.variants["fp32"], result.variants["int8"]
        write_json(
            Path(paths.metrics_dir) / "compress.json",
            {
                "variants": {
                    v.name: {
                        "size_bytes": v.size_bytes,
                        "accuracy": round(v.accuracy, 6),
                        "macro_f1": round(v.macro_f1, 6),
                        "latency_ms_batch1": round(v.latency_ms_batch1, 4),
                    }
                    for v in result.variants.values()
                },
                "int8_size_ratio": round(fp32.size_bytes / int8.size_bytes, 3),
                "int8_accuracy_drop": round(result.accuracy_drop, 6),
                "gate": {
                    "max_accuracy_drop": cfg.max_accuracy_drop,
                    "passed": result.passed,
                },
                "served_variant": cfg.serve_variant,
            },
        )
        log.info(
            "fp32 %d B acc %.4f %.3f ms | int8 %d B acc %.4f %.3f ms | drop %.4f",
            fp32.size_bytes,
            fp32.accuracy,
            fp32.latency_ms_batch1,
            int8.size_bytes,
            int8.accuracy,
            int8.latency_ms_batch1,
            result.accuracy_drop,
        )
        if not result.passed and cfg.serve_variant == "int8":
            raise StageError(
                f"int8 loses {result.accuracy_drop:.4f} test accuracy vs fp32, more than "
                f"compress.max_accuracy_drop {cfg.max_accuracy_drop}"
            )
        shutil.rmtree(out_dir, ignore_errors=True)
        scratch.rename(out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


if __name__ == "__main__":
    main("compress", run)
