"""Gate: the model about to be packaged must pass every gate and must not trail the champion.

Runs after compress and before package (package depends on ``gate.json``), so a failed gate
stops the flow before a bento is built: the champion and its bento stay exactly as they were.

Every ONNX variant that compress wrote (the ``variants`` of ``compress.json``, the files
``models/onnx/<variant>.onnx``) is measured here on the test split, with the metric code that
evaluate uses, and judged by

- the absolute gates of evaluate: ``evaluate.min_accuracy``, ``min_macro_f1`` and
  ``min_class_recall`` for classification, ``evaluate.min_r2`` for regression;
- its own tolerance for the drop from the uncompressed network of ``evaluate.json``: at most
  ``compress.max_accuracy_drop`` of accuracy and of macro F1 (classification), of R^2
  (regression: the same tolerance, R^2 being on accuracy's 0-1 scale);
- for the variant that will be served (compress.json's ``served_variant``, picked by
  ``compress.select``): no regression against the champion on the same test split, by at
  most ``evaluate.max_drop_vs_champion`` of accuracy and macro F1, or of R^2 for regression.

Only the served variant's verdicts decide; the others are recorded and shown in the report.
Regression models output values in the target's units (an (N, 1) output), classifiers logits.

Of compress.json this stage reads only ``served_variant`` and, per variant, ``size_bytes`` and
``latency_ms_batch1``: the metrics it judges are measured here, so the file's metric keys
(``accuracy``/``macro_f1``/``accuracy_drop`` or ``r2``/``rmse``/``mae``/``r2_drop``) may be
either.

The champion's numbers come from the champion record when they were measured on this very test
split (same fingerprint of inputs, targets and class names). When the split changed, the
champion's own model is taken from its bento and measured again here. A champion that is not
comparable passes the gate, which says why: one whose clients send or get other things (its
input schema, components/champion.py ``InputSchema``: another task, data kind, target, class
set, input shape, or input columns with their types and categories), or, when the split
changed, one whose inputs were encoded by another preprocessing fit (tables, sequences: its
model cannot read this split's encoded features). A run whose inputs differ is packaged and
recorded, but promote does not make it the champion on its own (``champion.inputs_differ`` in
gate.json says what changed; ``make promote RUN=...`` takes it on purpose). The record is read
but is not a DVC dependency (see components/champion.py); the stage declares its outputs
``persist`` so DVC never restores an old verdict from its run-cache.

Writes ``gate.json`` (every verdict with its one-line reason, the measured metrics, the task and
data kind, which champion and how it was measured) and ``compression.csv`` (size, latency and
the task's metrics per variant: the trade-off plot).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import champion as champ
from components import kinds, records, tasks
from components.config import Params
from components.dataset import DatasetError, DatasetMeta, Split, load_split, meta_path
from components.gates import Gate, champion_gates, drop_gates, failed_reasons
from components.records import CompressSummary, GateReport, read, write_json
from components.stage import StageError, main, write_text

log = logging.getLogger("pipeline.gate")


@dataclass(frozen=True)
class Baseline:
    """What the served variant is compared with: the champion's metrics on this test split."""

    run: str | None
    metrics: dict | None  # None: no comparable champion, the champion gate passes
    source: str  # "none" | "not comparable" | "recorded" | "re-evaluated"
    note: str
    # What the champion's clients find changed in this run's inputs, in one line (None: none)
    inputs_differ: str | None = None


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


def onnx_outputs(path: Path, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Raw outputs of an ONNX model: logits (N, K) of a classifier, values (N, 1) of a
    regressor (raw pixels or encoded features in)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise StageError(f"{path} is not a loadable ONNX model: {exc}") from None
    name = session.get_inputs()[0].name
    try:
        out = [
            session.run(None, {name: x[i : i + batch_size].astype(np.float32)})[0]
            for i in range(0, len(x), batch_size)
        ]
    except Exception as exc:  # e.g. the model takes another input shape
        raise StageError(
            f"{path} cannot run on the test split's examples shaped {tuple(x.shape[1:])}: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from None
    return np.concatenate(out)


def onnx_predict(path: Path, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class indices of an ONNX classifier (raw pixels in, logits out)."""
    return onnx_outputs(path, x, batch_size).argmax(axis=1)


def measure(path: Path, test: Split, class_names, task: str = "classification") -> dict:
    """Test metrics of one ONNX model, with the same code as evaluate (a sharded split is run
    a shard at a time)."""
    outputs = test.map_x(lambda x: onnx_outputs(path, x))
    return tasks.get(task).metrics(test.y, outputs, class_names, str(path))


@dataclass(frozen=True)
class Described:
    """What a model predicts from what: its input schema (components/champion.py), and the
    fingerprint of the preprocessing fit that encodes its inputs."""

    schema: champ.InputSchema
    preprocess_sha256: str | None

    @classmethod
    def of_meta(cls, meta: DatasetMeta) -> Described:
        columns = kinds.get(meta.kind).input_columns(meta)  # the kind knows what a client sends
        schema = champ.InputSchema.of(
            meta.task, meta.kind, meta.target, meta.class_names, meta.input_shape, columns
        )
        return cls(schema, champ.preprocess_fingerprint(meta.preprocess, meta.feature_names))

    @classmethod
    def of_run(cls, run: champ.RunRecord) -> Described:
        return cls(champ.InputSchema.of_run(run), run.preprocess_sha256)

    def words(self) -> str:
        return self.schema.words()


def _not_comparable(current: champ.RunRecord, ours: Described) -> tuple[str, str] | None:
    """Why the champion takes other inputs than this run, and those changes in one line
    (:func:`components.champion.schema_phrase`); None when its clients would find none."""
    theirs = Described.of_run(current)
    changed = champ.schema_phrase(theirs.schema, ours.schema)
    if changed is None:
        return None  # the preprocessing matters only when the split changed (see below)
    consequence = (
        f"not comparable, so this gate passes; its inputs differ from the champion's ({changed}), "
        "so it is packaged and recorded but not promoted automatically"
    )
    if all(d.schema.task == "classification" and d.schema.kind == "image" for d in (theirs, ours)):
        why = (
            f"champion {current.run} classifies other data (classes {current.class_names}, "
            f"images {current.input_shape}): {consequence}"
        )
    elif theirs.words() == ours.words():  # the same shape, task and target: other columns
        why = f"champion {current.run} reads other input columns than this run: {consequence}"
    else:
        why = f"champion {current.run} is {theirs.words()}, this run {ours.words()}: {consequence}"
    return why, changed


def champion_baseline(
    record: champ.ChampionRecord,
    fingerprint: str,
    class_names,
    input_shape,
    test: Split,
    root: Path = Path("."),
    described: Described | None = None,
    raw_test=None,
) -> Baseline:
    """The champion's metrics on this test split, measured again when the split changed.

    ``described`` is what this run predicts (default: an image classifier of ``class_names``
    and ``input_shape``, the only kind there was before tables and sequences). ``raw_test``
    is a table's or time series' test split as read (``prepared/test.parquet``): a champion
    whose preprocessing was fitted on other training data is measured on it, encoded its way.
    """
    ours = described or Described(
        champ.InputSchema.of("classification", "image", "", class_names, input_shape), None
    )
    current = record.current()
    if current is None:
        return Baseline(
            None, None, "none", "no champion yet: the first challenger passes by definition"
        )
    differs = _not_comparable(current, ours)
    if differs is not None:
        return Baseline(current.run, None, "not comparable", differs[0], differs[1])
    compared = tasks.get(ours.schema.task).compared_keys
    recorded = all(isinstance(current.metrics.get(k), int | float) for k in compared)
    if current.test_split.sha256 == fingerprint and recorded:
        return Baseline(
            current.run,
            dict(current.metrics),
            "recorded",
            f"champion {current.run}'s metrics as recorded on this same test split",
        )
    refit = current.preprocess_sha256 != ours.preprocess_sha256
    if refit and callable(raw_test):  # read only when needed: most runs never need it
        raw_test = raw_test()
    if refit and raw_test is None:
        return Baseline(
            current.run,
            None,
            "not comparable",
            f"champion {current.run} was measured on another test split and encodes its inputs "
            "with another preprocessing fit (features.py spec), and these sequences are not kept "
            "as read: it cannot be measured on this split, so it is not comparable and this gate "
            "passes",
        )
    model_file = champ.served_model_file(champ.ensure_bento(current, root))
    if champ.sha256_file(model_file) != current.model_sha256:
        raise StageError(
            f"the model in bento {current.bento_tag} is not the one the champion record names "
            f"(sha256 differs): the store was tampered with; re-import the archive"
        )
    how = ""
    if refit:
        # The champion reads features of its own fit: encode this split's raw rows with it.
        card = json.loads((model_file.parent / "model.json").read_text())
        try:
            test = kinds.get(ours.schema.kind).reencode(
                raw_test, card.get("preprocess"), test, ours.schema.target, class_names
            )
        except StageError as exc:
            raise StageError(f"the champion cannot read this test split: {exc}") from None
        how = ", its inputs encoded with its own fitted preprocessing"
    metrics = measure(model_file, test, class_names, ours.schema.task)
    return Baseline(
        current.run,
        metrics,
        "re-evaluated",
        f"champion {current.run} measured again on this test split{how} (its record is for "
        f"another split: {current.test_split.sha256[:12]} vs {fingerprint[:12]})",
    )


def read_compress_json(path: Path) -> dict:
    """compress.json, checked (:class:`components.records.CompressSummary`), as a dict."""
    return read(CompressSummary, path, "compress").model_dump()


def gate(
    test: Split,
    meta: DatasetMeta,
    evaluated: dict,
    compressed: dict,
    model_dir: Path,
    params: Params,
    record: champ.ChampionRecord,
    root: Path = Path("."),
    raw_test=None,
) -> GateResult:
    """The core, on loaded inputs: measure every variant and judge it."""
    task = tasks.get(meta.task)
    task.check_test(test.y, meta.class_names)
    if tasks.of_metrics(evaluated) is not task:
        raise StageError(
            f"evaluate.json holds {tasks.of_metrics(evaluated).name} metrics but the data is "
            f"{task.name} (prepared meta.json): re-run the evaluate stage"
        )
    served = compressed.get("served_variant")
    if served not in compressed["variants"]:
        raise StageError(
            f"compress.json serves {served!r} but lists only {sorted(compressed['variants'])}: "
            "re-run compress"
        )
    fingerprint = champ.split_fingerprint(test, meta.class_names)
    described = Described.of_meta(meta)
    baseline = champion_baseline(
        record, fingerprint, meta.class_names, meta.input_shape, test, root, described, raw_test
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
        metrics = measure(path, test, meta.class_names, task.name)
        gates = [*task.gates(metrics, cfg)]
        gates += drop_gates(
            metrics, evaluated, params.compress.max_accuracy_drop, "the network",
            task.drop_keys, task.drop_param,
        )  # fmt: skip
        if name == served:
            gates += champion_gates(
                metrics, baseline.metrics, cfg.max_drop_vs_champion, str(baseline.run),
                baseline.note, task.compared_keys,
            )  # fmt: skip
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
    task = tasks.get(meta.task)
    champion_metrics = None
    if base.metrics is not None:
        champion_metrics = {
            k: round(float(base.metrics[k]), 6) for k in task.headline_keys if k in base.metrics
        }
    return {
        "format": GateReport.model_fields["format"].default,
        "passed": result.passed,
        "failed": result.failed,
        "served_variant": result.served,
        "task": task.name,
        "kind": meta.kind,
        "target": meta.target,
        "class_names": list(meta.class_names),
        "input_shape": list(meta.input_shape),
        "preprocess_sha256": champ.preprocess_fingerprint(meta.preprocess, meta.feature_names),
        "input_columns": kinds.get(meta.kind).input_columns(meta),
        "test_split": {"sha256": result.fingerprint, "examples": result.examples},
        "network": {k: round(float(evaluated[k]), 6) for k in task.headline_keys},
        "champion": {
            "run": base.run,
            "source": base.source,
            "note": base.note,
            "metrics": champion_metrics,
            "inputs_differ": base.inputs_differ,
        },
        "variants": {
            v.name: {
                "served": v.served,
                "passed": v.passed,
                "model_sha256": v.model_sha256,
                "size_bytes": v.size_bytes,
                "latency_ms_batch1": v.latency_ms,
                # Per-class figures stay in evaluate.json: here only what the gates read.
                **{
                    k: round(float(x), 6)
                    for k, x in v.metrics.items()
                    if k not in ("per_class", "n")
                },
                "gates": {g.name: g.to_json() for g in v.gates},
            }
            for v in result.variants.values()
        },
    }


def write_compression_csv(path: Path, result: GateResult) -> None:
    """One row per variant: the compression trade-off that `dvc plots diff` compares.

    Columns: variant, size_kib, latency_ms, accuracy, macro_f1, min_class_recall, r2, rmse,
    mae (the task's metrics; the others empty), served.
    """
    # Every task's columns, the other task's left empty: the plots declared once in dvc.yaml
    # must find their fields whatever the data.
    columns = [c for task in tasks.TASKS.values() for c in task.record_keys]
    lines = [",".join(("variant", "size_kib", "latency_ms", *columns, "served"))]
    for v in result.variants.values():
        latency = "" if v.latency_ms is None else f"{v.latency_ms:.4f}"
        numbers = ",".join(
            f"{v.metrics[c]:.6f}" if v.metrics.get(c) is not None else "" for c in columns
        )
        lines.append(f"{v.name},{v.size_bytes / 1024:.2f},{latency},{numbers},{int(v.served)}")
    write_text(path, "\n".join(lines) + "\n")


def read_gate_json(path: Path) -> dict:
    """gate.json, checked (:class:`components.records.GateReport`), as a dict."""
    return read(GateReport, path, "gate").model_dump()


def run(params: Params) -> GateResult:
    paths = params.paths
    metrics_dir = Path(paths.metrics_dir)
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    test = load_split(paths.prepared_dir, "test")
    evaluated = records.read_evaluate(metrics_dir).numbers()
    if not records.read_evaluate_gates(metrics_dir).passed:
        raise StageError(
            f"{records.EVALUATE_GATES_FILE} says the network failed its gates: nothing to package"
        )
    compressed = read_compress_json(metrics_dir / "compress.json")
    record = champ.load_record(paths.champion_file)

    def raw_test():
        """The test split as read (tables, series), to encode with a champion's own fit;
        None when it was not kept (the champion is then not comparable, and the gate says so)."""
        try:
            raws = kinds.get(meta.kind).raw_splits(paths.prepared_dir, meta, ("test",))
        except DatasetError:
            return None
        return raws["test"] if raws else None

    result = gate(
        test, meta, evaluated, compressed, Path(paths.model_dir), params, record, raw_test=raw_test
    )
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
        raise StageError(reason)
    return result


if __name__ == "__main__":
    main("gate", run)
