"""Int8 post-training quantization with ONNX Runtime: static (calibrated) and dynamic.

- **Static**: weights and activations in int8; activation ranges come from running the fp32
  model on calibration examples (training examples of any kind: images, encoded table rows,
  sequences; never the test split). QDQ format keeps the graph readable and lets ONNX Runtime
  fuse Q/DQ pairs into integer kernels; QOperator writes the integer operators directly.
  ONNX Runtime has no static int8 LSTM or GRU: those ops stay float, the dense layers around
  them are quantized. Raw pixels are bounded (0-255), but standardised table and sequence
  values are not: an example beyond the calibration rows' range would saturate the int8
  activations (and a regression prediction then clips far off). So float calibration rows
  are used twice, as they are and scaled by ``CALIBRATION_HEADROOM`` about the training mean
  (0 after standardisation), which widens every calibrated range by about that factor for a
  slightly coarser int8 step.
- **Dynamic**: int8 weights; activation ranges are measured on every call. Only the op types
  in ``compress.quantization.dynamic_op_types`` are quantized: dynamic Conv (ConvInteger)
  runs several times slower than fp32 on CPU. ONNX Runtime quantizes an LSTM dynamically
  (DynamicQuantizeLSTM) when ``LSTM`` is among them; it has no int8 GRU. Dense layers reach
  the quantizer as ``MatMul`` (the pre-processing turns ``Gemm`` into ``MatMul`` + ``Add``).

Both run ``quant_pre_process`` first (shape inference and graph clean-up), as ONNX Runtime
recommends.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from components.config import QuantizationParams

CALIBRATION_BATCH = 32
CALIBRATION_HEADROOM = 1.5  # float (standardised) inputs: calibrated ranges widened this much


def calibration_rows(calibration: np.ndarray) -> np.ndarray:
    """What static quantization calibrates on: raw pixels (uint8) as given; float rows as given
    and scaled by ``CALIBRATION_HEADROOM``."""
    if calibration.dtype == np.uint8:
        return calibration
    rows = calibration.astype(np.float32)
    return np.concatenate([rows, rows * CALIBRATION_HEADROOM])


def _pre_process(fp32_path: Path, out: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True)


def quantize_static(
    fp32_path: Path,
    int8_path: Path,
    calibration: np.ndarray,
    params: QuantizationParams,
    exclude_nodes: tuple[str, ...] = (),
) -> None:
    """Static int8: uint8 activations, int8 weights, calibrated on ``calibration`` examples.

    ``exclude_nodes`` (names in the pre-processed graph, see :func:`first_block_nodes`) stay
    fp32: the benchmark uses it to study where int8 pays.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
    )
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    calibration = calibration_rows(calibration)

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self._batches = iter(
                {name: calibration[i : i + CALIBRATION_BATCH].astype(np.float32)}
                for i in range(0, len(calibration), CALIBRATION_BATCH)
            )

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _pre_process(fp32_path, prepared)
        # Calibrated through the model's one input, whatever its name (the pipeline's: inputs).
        graph = onnx.load(str(prepared), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        name = next(i.name for i in graph.input if i.name not in weights)
        ort_quantize_static(
            str(prepared),
            str(int8_path),
            Reader(name),
            quant_format=QuantFormat.QDQ if params.format == "qdq" else QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=params.per_channel,
            reduce_range=params.reduce_range,
            nodes_to_exclude=list(exclude_nodes),
        )


def first_block_nodes(fp32_path: Path) -> tuple[str, ...]:
    """Names of the nodes up to the first pooling: the first conv block, which reads a single
    input channel and gains nothing from int8 kernels (see bench/compression.py)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _pre_process(fp32_path, prepared)
        nodes = onnx.load(str(prepared)).graph.node
    names = []
    for node in nodes:
        names.append(node.name)
        if node.op_type in ("MaxPool", "AveragePool"):
            return tuple(names)
    return ()


DYNAMIC_KERNELS = ("Conv", "MatMul", "LSTM")  # op types with a dynamic int8 kernel in ONNX Runtime


def dynamic_targets(op_types: set[str], params: QuantizationParams) -> list[str]:
    """Which of a graph's op types ``quantize_dynamic`` turns int8 (empty: nothing)."""
    wanted = set(params.dynamic_op_types)
    return sorted(t for t in op_types & wanted if t in DYNAMIC_KERNELS)


def quantize_dynamic(fp32_path: Path, int8_path: Path, params: QuantizationParams) -> None:
    """Dynamic int8: int8 weights of ``dynamic_op_types``, activations quantized per call."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _pre_process(fp32_path, prepared)
        ort_quantize_dynamic(
            str(prepared),
            str(int8_path),
            weight_type=QuantType.QInt8,
            per_channel=params.per_channel,
            reduce_range=params.reduce_range,
            op_types_to_quantize=list(params.dynamic_op_types),
        )
