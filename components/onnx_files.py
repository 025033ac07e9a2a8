"""ONNX files of our networks: export with a check against PyTorch, run, time, size.

Every ONNX file of the pipeline takes one input, ``inputs`` (raw pixels, encoded table rows or
sequences), and gives one output, ``logits`` (class scores, or the predicted value for
regression). The compress stage, the gate stage and the tuning flow's ensembles share these
functions.
"""

from __future__ import annotations

import gzip
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.stage import StageError

INPUT_NAME, OUTPUT_NAME = "inputs", "logits"  # the names the bentos feed and read, any data
# The input's name in files exported before it was renamed (it is a table row or a sequence
# too): such a file is refused with a message saying so, not an ONNX Runtime error.
OLD_INPUT_NAME = "images"
LATENCY_BATCHES = (1, 64)
LATENCY_ROUNDS = 30  # rounds over all variants, interleaved so load changes hit all alike
CALLS_PER_ROUND = {1: 20, 64: 3}
CHECK_SAMPLES = 512  # examples for the ONNX-vs-PyTorch check of quantized models
PROBE_SAMPLES = 7  # training examples for the fp32 export check (not the exported batch size)
# Regression: a quantized model agrees with its source on an example when their predictions
# differ by at most this many standard deviations of the training target. (If every example
# missed by exactly that much, R^2 would fall by about its square, 0.01.)
REGRESSION_AGREEMENT_STD = 0.1


@dataclass(frozen=True)
class OnnxCheck:
    """How an ONNX file was checked against the PyTorch network it came from."""

    # "max_abs_logit_diff" (fp32 exports) | "top1_agreement" (quantized classifiers) |
    # "max_abs_diff_in_target_std" (fp32 regression exports: the worst difference / target std)
    # | "within_tolerance_agreement" (quantized regression: share within ``tolerance``)
    kind: str
    value: float
    threshold: float
    samples: int
    max_abs_logit_diff: float  # the worst raw output difference (target units for regression)
    tolerance: float | None = None  # within_tolerance_agreement: the allowed |difference|


def rows(samples: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """``n`` rows of ``samples`` from ``start`` on, cycling when there are fewer."""
    return samples[(start + np.arange(n)) % len(samples)]


class _NotTorchvision(logging.Filter):
    """Drops the exporter's "torchvision is not installed. Skipping torchvision::nms" notices:
    torch's ONNX registry looks for torchvision's detection ops on every export, and logs a
    warning per op when torchvision is absent. Our networks use none of them and torchvision
    is not in our stack, so the notices say nothing about the file we write."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


def _quiet_export() -> None:
    """Silence what torch's dynamo exporter says on every export that is no news to us; its
    other warnings still show. Process-wide and idempotent (no state to restore, so exports
    in threads, as the tuning flow's ensembles, cannot undo each other's)."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    if not any(isinstance(f, _NotTorchvision) for f in registry.filters):
        registry.addFilter(_NotTorchvision())
    # torch.export deep-copies pytree specs, whose LeafSpec class torch 2.13 deprecated
    # (FutureWarning, raised from copyreg): torch's own use, nothing of ours to change.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module="copyreg",
    )
    # Exporting an LSTM/GRU: torch's own decompositions call torch._check_is_size, deprecated
    # in 2.13, and torch.export notes that nn.RNN refreshes its ``_flat_weights`` list in
    # forward. Both are torch's internals; the exported file is checked against PyTorch.
    warnings.filterwarnings(
        "ignore", message=r"_check_is_size will be removed", category=FutureWarning
    )
    warnings.filterwarnings(
        "ignore",
        message=r"The tensor attributes .*_flat_weights\[0\].* were assigned during export",
        category=UserWarning,
    )


# The registries built so far, by from_torchlib's arguments (one, in practice).
_BUILT_REGISTRIES: dict = {}


def _registry_built_once() -> None:
    """Build torch's ONNX function registry once per process, not once per export.

    ``torch.onnx.export`` (dynamo) builds a registry of every torchlib function on each call
    (``ONNXRegistry.from_torchlib``: 0.75 s of an LSTM's 2.9 s export here), and a compress run
    exports up to ten graphs. Nothing changes the registry after it is built unless a custom
    translation table is passed, which we never do, so the one built first serves every later
    export, in any thread. Process-wide and idempotent; where torch's internals moved (another
    torch version), exports simply build their own, as before."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:
        return
    build = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(build, classmethod) or getattr(build.__func__, "_built_once", False):
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _BUILT_REGISTRIES:
            _BUILT_REGISTRIES[key] = build.__func__(cls, *args, **kwargs)
        return _BUILT_REGISTRIES[key]

    from_torchlib._built_once = True
    ONNXRegistry.from_torchlib = classmethod(from_torchlib)


def export_graph(model, input_shape: tuple[int, ...], path: Path, samples=None) -> None:
    """Write ``model`` as one self-contained ONNX file with a dynamic batch dimension (no check:
    :func:`export_onnx` checks against PyTorch). ``samples`` are real inputs to trace with;
    without them random pixels, which suit images only."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if samples is None:  # random pixels: only right for images (the benchmark's use)
        example = torch.randint(0, 256, (4, *input_shape)).float()
    else:
        example = torch.from_numpy(rows(samples, 4).astype(np.float32))
    _quiet_export()
    _registry_built_once()
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
    drop_source_paths(program.model)
    program.save(str(path), external_data=False)


# Node metadata the dynamo exporter records: the Python stack of each op, with the absolute paths
# of our checkout and of site-packages. It made the same model's file (and so the bento's tag)
# differ between two clones of the repository; nothing reads it.
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def drop_source_paths(model) -> None:
    """Remove the per-node Python stack traces from an exported ``onnx_ir`` model, in place."""
    for graph in (model.graph, *model.functions.values()):
        for node in graph.all_nodes():
            node.metadata_props.pop(STACK_TRACE, None)


def export_onnx(
    model,
    input_shape: tuple[int, ...],
    path: Path,
    tolerance: float,
    samples: np.ndarray | None = None,
    target_std: float | None = None,
) -> OnnxCheck:
    """Export with a dynamic batch dimension and check it against PyTorch on sample inputs.

    ``samples`` are real examples of the data (training split, the dtype the model gets);
    without them the probe is random pixels, which suits images only. With ``target_std`` (a
    regression network) the difference is measured in standard deviations of the target, so
    the tolerance means the same whatever the target's units.
    """
    import torch

    export_graph(model, input_shape, path, samples)
    if samples is None:
        probe = torch.randint(0, 256, (PROBE_SAMPLES, *input_shape)).float().numpy()
    else:  # another batch size than exported, and other rows
        probe = rows(samples, PROBE_SAMPLES, start=4).astype(np.float32)
    from components.model import predict_logits  # torch: the package stage reads only names here

    expected = predict_logits(model, probe).numpy()
    worst = float(np.abs(expected - run_onnx(path, probe)).max())
    if target_std is None:
        if not worst <= tolerance:
            raise StageError(
                f"ONNX export of {path.name} differs from PyTorch by {worst:.2e} "
                f"(compress.onnx_tolerance is {tolerance:.0e})"
            )
        return OnnxCheck("max_abs_logit_diff", worst, tolerance, len(probe), worst)
    scaled = worst / (target_std or 1.0)
    if not scaled <= tolerance:
        raise StageError(
            f"ONNX export of {path.name} differs from PyTorch by {scaled:.2e} target standard "
            f"deviations ({worst:.3g} in target units; compress.onnx_tolerance is "
            f"{tolerance:.0e})"
        )
    return OnnxCheck("max_abs_diff_in_target_std", scaled, tolerance, len(probe), worst)


def check_quantized(
    source,
    path: Path,
    samples: np.ndarray,
    min_agreement: float,
    target_std: float | None = None,
) -> OnnxCheck:
    """A quantized model must agree with its PyTorch source on ``min_agreement`` of
    ``samples`` (real examples: int8 ranges are calibrated on them, noise would saturate).

    A classifier agrees on an example when it picks the same top class; a regression network
    (``target_std`` given) when its prediction is within ``REGRESSION_AGREEMENT_STD`` target
    standard deviations of its source's.
    """
    from components.model import predict_logits

    expected = predict_logits(source, samples).numpy()
    got = run_onnx(path, samples)
    difference = np.abs(expected - got)
    worst = float(difference.max())
    if target_std is None:
        agreement = float((expected.argmax(1) == got.argmax(1)).mean())
        if agreement < min_agreement:
            raise StageError(
                f"{path.name} agrees with its PyTorch source on the top class for only "
                f"{agreement:.1%} of {len(samples)} sample images (compress.quantization."
                f"min_agreement is {min_agreement:.1%}; max logit difference {worst:.3g})"
            )
        return OnnxCheck("top1_agreement", agreement, min_agreement, len(samples), worst)
    allowed = REGRESSION_AGREEMENT_STD * (target_std or 1.0)
    agreement = float((difference.reshape(len(samples), -1).max(axis=1) <= allowed).mean())
    if agreement < min_agreement:
        raise StageError(
            f"{path.name} agrees with its PyTorch source (within {allowed:.3g}, "
            f"{REGRESSION_AGREEMENT_STD} target standard deviations) for only {agreement:.1%} "
            f"of {len(samples)} sample examples (compress.quantization.min_agreement is "
            f"{min_agreement:.1%}; max difference {worst:.3g})"
        )
    return OnnxCheck(
        "within_tolerance_agreement", agreement, min_agreement, len(samples), worst, allowed
    )


def input_problem(path: Path, names: list[str]) -> str | None:
    """Why a model whose inputs are named ``names`` is not one of the pipeline's (None when it
    takes the one input :data:`INPUT_NAME`)."""
    if names == [INPUT_NAME]:
        return None
    if names == [OLD_INPUT_NAME]:
        return (
            f"{path} names its input {OLD_INPUT_NAME!r}, as models exported before it was "
            f"renamed {INPUT_NAME!r} do: export it again with this code (`make pipeline` "
            "re-runs the stages that write it)"
        )
    return f"{path} takes inputs {names}; the pipeline's models take one, {INPUT_NAME!r}"


def open_session(path: Path, threads: int = 1):
    """An ONNX Runtime session of one of the pipeline's models (refused when its input is not
    :data:`INPUT_NAME`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # fixed threads: comparable latencies across variants
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    problem = input_problem(path, [i.name for i in session.get_inputs()])
    if problem:
        raise StageError(problem)
    return session


def run_onnx(path: Path, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    session = open_session(path)
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size].astype(np.float32)})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs)


def measure_latencies(
    paths: dict[str, Path], samples, threads: int, rounds: int = LATENCY_ROUNDS
) -> dict[str, dict[int, float]]:
    """Milliseconds per call, per variant and batch size (1 and 64): the fastest round.

    The inputs are ``samples`` (training examples, cycled to fill a batch), so int8 models run
    on activations in their calibrated ranges; an input shape tuple instead gives random
    pixels (images only). The variants take turns within each round, so a burst of load from
    another process slows them all alike instead of one of them; and of all rounds the
    fastest one counts (the mean per call within it), as ``timeit`` advises: slower rounds
    measure the other processes on a shared machine, not the model.
    """
    if isinstance(samples, tuple | list):  # an input shape: random pixels
        rng = np.random.default_rng(0)
        samples = rng.integers(0, 256, (max(LATENCY_BATCHES), *samples)).astype(np.float32)
    inputs = {b: {INPUT_NAME: rows(samples, b).astype(np.float32)} for b in LATENCY_BATCHES}
    sessions = {name: open_session(path, threads) for name, path in paths.items()}
    for session in sessions.values():
        for feed in inputs.values():
            for _ in range(3):
                session.run([OUTPUT_NAME], feed)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in inputs} for n in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for b, feed in inputs.items():
                calls = CALLS_PER_ROUND[b]
                start = time.perf_counter()
                for _ in range(calls):
                    session.run([OUTPUT_NAME], feed)
                times[name][b].append((time.perf_counter() - start) / calls)
    return {n: {b: float(np.min(t) * 1000) for b, t in per.items()} for n, per in times.items()}


def gzip_size(path: Path) -> int:
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9, mtime=0))


def int8_initializers(path: Path) -> int:
    """How many weight tensors of an ONNX file are stored as int8."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
