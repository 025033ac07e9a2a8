"""Gate: the model about to be packaged must pass every gate and must not trail the champion.

Runs after compress and before package (package depends on ``gate.json``), so a failed gate
stops the flow before a bento is built: the champion and its bento stay exactly as they were.

Every ONNX variant that compress wrote (the ``variants`` of ``compress.json``, the files
``models/onnx/<variant>.onnx``) is measured here on the test split, with the metric code that
evaluate uses, and judged by

- the absolute gates of evaluate (``evaluate.min_accuracy``, ``min_macro_f1``,
  ``min_class_recall``);
- its own tolerance for the drop from the uncompressed network of ``evaluate.json``: at most
  ``compress.max_accuracy_drop`` of accuracy and of macro F1;
- for the variant that will be served (compress.json's ``served_variant``, picked by
  ``compress.select``): no regression against the
  champion on the same test split, by at most ``evaluate.max_regression``.

Only the served variant's verdicts decide; the others are recorded and shown in the report.

The champion's numbers come from the champion record when they were measured on this very test
split (same fingerprint of images, labels and class names). When the split changed, the
champion's own model is taken from its bento and measured again here. A champion trained for
other classes or another image shape is not comparable: the gate passes and says so. The
record is read but is not a DVC dependency (see components/champion.py); the stage declares its
outputs ``persist`` so DVC never restores an old verdict from its run-cache.

Writes ``gate.json`` (every verdict with its one-line reason, the measured metrics, which
champion and how it was measured) and ``compression.csv`` (size, latency and accuracy per
variant: the trade-off plot).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import champion as champ
from components.config import Params
from components.dataset import DatasetMeta, ImageSet, load_images, meta_path, split_path
from components.evaluate import (
    Gate,
    absolute_gates,
    check_labels,
    drop_gates,
    failed_reasons,
    read_evaluate_json,
    read_metrics_file,
    regression_gates,
    write_failure_report,
)
from components.metrics import classification_metrics
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.gate")

GATE_FORMAT = 1
# compress.json has no format number of its own: these are the keys we read from it.
COMPRESS_FORMAT = 1


@dataclass(frozen=True)
class Baseline:
    """What the served variant is compared with: the champion's metrics on this test split."""

    run: str | None
    metrics: dict | None  # None: no comparable champion, the no-regression gate passes
    source: str  # "none" | "not comparable" | "recorded" | "re-evaluated"
    note: str


@dataclass(frozen=True)
class VariantVerdict:
    name: str
    served: bool
    model_sha256: str
    size_bytes: int
    latency_ms: float | None
    metrics: dict
    gates: tuple[Gate, ...]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


@dataclass(frozen=True)
class GateResult:
    variants: dict[str, VariantVerdict]
    served: str
    baseline: Baseline
    fingerprint: str
    examples: int

    @property
    def passed(self) -> bool:
        return self.variants[self.served].passed

    @property
    def failed(self) -> list[str]:
        return failed_reasons(self.variants[self.served].gates)


def onnx_predict(path: Path, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class indices of an ONNX classifier (raw pixels in, logits out)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise StageError(f"{path} is not a loadable ONNX model: {exc}") from None
    name = session.get_inputs()[0].name
    out = [
        session.run(None, {name: x[i : i + batch_size].astype(np.float32)})[0].argmax(axis=1)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


def measure(path: Path, test: ImageSet, class_names) -> dict:
    """Test metrics of one ONNX model, with the same code as evaluate."""
    metrics = classification_metrics(test.y, onnx_predict(path, test.x), class_names)
    metrics["min_class_recall"] = min(c["recall"] for c in metrics["per_class"].values())
    return metrics


def champion_baseline(
    record: champ.ChampionRecord,
    fingerprint: str,
    class_names,
    image_shape,
    test: ImageSet,
    root: Path = Path("."),
) -> Baseline:
    """The champion's metrics on this test split, measured again when the split changed."""
    current = record.current()
    if current is None:
        return Baseline(
            None, None, "none", "no champion yet: the first challenger passes by definition"
        )
    if list(current.class_names) != list(class_names) or list(current.image_shape) != list(
        image_shape
    ):
        return Baseline(
            current.run,
            None,
            "not comparable",
            f"champion {current.run} classifies other data (classes {current.class_names}, "
            f"images {current.image_shape}): not comparable, so this gate passes",
        )
    if current.test_split.sha256 == fingerprint:
        return Baseline(
            current.run,
            dict(current.metrics),
            "recorded",
            f"champion {current.run}'s metrics as recorded on this same test split",
        )
    model_file = champ.served_model_file(champ.ensure_bento(current, root))
    if champ.sha256_file(model_file) != current.model_sha256:
        raise StageError(
            f"the model in bento {current.bento_tag} is not the one the champion record names "
            f"(sha256 differs): the store was tampered with; re-import the archive"
        )
    metrics = measure(model_file, test, class_names)
    return Baseline(
        current.run,
        metrics,
        "re-evaluated",
        f"champion {current.run} measured again on this test split (its record is for another "
        f"split: {current.test_split.sha256[:12]} vs {fingerprint[:12]})",
    )


def read_compress_json(path: Path) -> dict:
    data = read_metrics_file(path, COMPRESS_FORMAT, "compress", ("variants",))
    variants = data["variants"]
    if not isinstance(variants, dict) or not variants:
        raise StageError(f"{path}: 'variants' must name at least one model: re-run compress")
    for name, v in variants.items():
        if not isinstance(v, dict) or not isinstance(v.get("size_bytes"), int):
            raise StageError(
                f"{path}: variant {name!r} lacks size_bytes (an older format?): re-run compress"
            )
    return data


def gate(
    test: ImageSet,
    meta: DatasetMeta,
    evaluated: dict,
    compressed: dict,
    model_dir: Path,
    params: Params,
    record: champ.ChampionRecord,
    root: Path = Path("."),
) -> GateResult:
    """The core, on loaded inputs: measure every variant and judge it."""
    check_labels(test, meta.class_names)
    served = compressed.get("served_variant")
    if served not in compressed["variants"]:
        raise StageError(
            f"compress.json serves {served!r} but lists only {sorted(compressed['variants'])}: "
            "re-run compress"
        )
    fingerprint = champ.split_fingerprint(test, meta.class_names)
    baseline = champion_baseline(
        record, fingerprint, meta.class_names, meta.image_shape, test, root
    )
    cfg = params.evaluate
    verdicts = {}
    for name, info in compressed["variants"].items():
        path = Path(model_dir) / "onnx" / f"{name}.onnx"
        if not path.is_file():
            if name == served:
                raise StageError(
                    f"{path} not found although compress.json lists it: re-run compress"
                )
            log.warning("%s not found: variant %s is not judged (it is not served)", path, name)
            continue
        metrics = measure(path, test, meta.class_names)
        gates = [*absolute_gates(metrics, cfg)]
        gates += drop_gates(metrics, evaluated, params.compress.max_accuracy_drop, "the network")
        if name == served:
            gates += regression_gates(
                metrics, baseline.metrics, cfg.max_regression, str(baseline.run), baseline.note
            )
        latency = info.get("latency_ms_batch1")
        verdicts[name] = VariantVerdict(
            name=name,
            served=name == served,
            model_sha256=champ.sha256_file(path),
            size_bytes=int(info["size_bytes"]),
            latency_ms=float(latency) if isinstance(latency, int | float) else None,
            metrics=metrics,
            gates=tuple(gates),
        )
    return GateResult(verdicts, served, baseline, fingerprint, len(test))


def result_payload(result: GateResult, meta: DatasetMeta, evaluated: dict) -> dict:
    base = result.baseline
    return {
        "format": GATE_FORMAT,
        "passed": result.passed,
        "failed": result.failed,
        "served_variant": result.served,
        "class_names": list(meta.class_names),
        "image_shape": list(meta.image_shape),
        "test_split": {"sha256": result.fingerprint, "examples": result.examples},
        "network": {k: round(evaluated[k], 6) for k in ("accuracy", "macro_f1")},
        "champion": {
            "run": base.run,
            "source": base.source,
            "note": base.note,
            "metrics": None
            if base.metrics is None
            else {k: round(float(base.metrics[k]), 6) for k in ("accuracy", "macro_f1")},
        },
        "variants": {
            v.name: {
                "served": v.served,
                "passed": v.passed,
                "model_sha256": v.model_sha256,
                "size_bytes": v.size_bytes,
                "latency_ms_batch1": v.latency_ms,
                # Per-class figures stay in evaluate.json: here only what the gates read.
                **{k: round(float(x), 6) for k, x in v.metrics.items() if k != "per_class"},
                "gates": {g.name: g.to_json() for g in v.gates},
            }
            for v in result.variants.values()
        },
    }


def write_compression_csv(path: Path, result: GateResult) -> None:
    """One row per variant: the compression trade-off that `dvc plots diff` compares."""
    lines = ["variant,size_kib,latency_ms,accuracy,macro_f1,min_class_recall,served"]
    for v in result.variants.values():
        latency = "" if v.latency_ms is None else f"{v.latency_ms:.4f}"
        m = v.metrics
        lines.append(
            f"{v.name},{v.size_bytes / 1024:.2f},{latency},{m['accuracy']:.6f},"
            f"{m['macro_f1']:.6f},{m['min_class_recall']:.6f},{int(v.served)}"
        )
    Path(path).write_text("\n".join(lines) + "\n")


def read_gate_json(path: Path) -> dict:
    return read_metrics_file(
        path,
        GATE_FORMAT,
        "gate",
        ("passed", "served_variant", "test_split", "variants", "champion", "class_names"),
    )


def run(params: Params) -> GateResult:
    paths = params.paths
    metrics_dir = Path(paths.metrics_dir)
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    test = load_images(split_path(paths.prepared_dir, "test"))
    evaluated = read_evaluate_json(metrics_dir / "evaluate.json")
    if not evaluated["passed"]:
        raise StageError("evaluate.json says the network failed its gates: nothing to package")
    compressed = read_compress_json(metrics_dir / "compress.json")
    record = champ.load_record(paths.champion_file)

    result = gate(test, meta, evaluated, compressed, Path(paths.model_dir), params, record)
    write_json(metrics_dir / "gate.json", result_payload(result, meta, evaluated))
    write_compression_csv(metrics_dir / "compression.csv", result)

    for v in result.variants.values():
        if v.served:
            for g in v.gates:
                log.info("%s (served) %s: %s", v.name, "PASS" if g.passed else "FAIL", g.reason)
        else:
            failed = failed_reasons(v.gates)
            log.info(
                "%s (not served, does not decide): %s",
                v.name,
                "; ".join(failed) if failed else f"passes all {len(v.gates)} gates",
            )
    if not result.passed:
        reason = f"gate failed for the {result.served} model: " + "; ".join(result.failed)
        write_failure_report(params, "gate", reason)
        raise StageError(reason)
    return result


if __name__ == "__main__":
    main("gate", run)
