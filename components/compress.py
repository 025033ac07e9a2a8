"""Compress: make smaller and faster variants of the trained network, measure each, pick one.

Every variant is a pipeline of steps declared in ``compress.variants`` and applied in order to
the trained network (the teacher):

- ``distil``: as a first step, a new smaller student learns the teacher's soft targets; as a
  later step, the network so far does; ``student_alone``: the same new student on the labels
  alone, the baseline (:mod:`components.distill`);
- ``prune_structured`` / ``prune_unstructured``: channels removed / weights zeroed, then a
  short fine-tune (:mod:`components.prune`);
- ``quantize_static`` / ``quantize_dynamic``: int8 with ONNX Runtime (:mod:`components.quantize`).

Prefixes that variants share (``distil`` in ``student`` and ``student_pruned_int8``) are
computed once. ``fp32`` is the trained network exported unchanged: the reference every drop is
measured from. Each ONNX file is checked against its PyTorch source on examples of the training
data (images, encoded table rows or sequences, as the model will get them) before it is
measured: fp32 exports within ``compress.onnx_tolerance`` on the logits (for regression, on the
predicted values in units of the training target's standard deviation), quantized ones by
agreeing with their source on at least ``compress.quantization.min_agreement`` of sample
examples: on the top class, or for regression within ``REGRESSION_AGREEMENT_STD`` (0.1)
target standard deviations.

Each variant is then measured: parameters, file size (and gzip size), ONNX Runtime latency at
batch 1 and 64 with fixed threads on training examples, and its test metrics with their drop
from fp32. Classification: accuracy and macro F1; a variant passes when both drops are within
``compress.max_accuracy_drop``. Regression: R^2, RMSE and MAE; a variant passes when its R^2
drop is within ``compress.max_accuracy_drop``. ``compress.select.policy`` picks the variant to
package among those; the choice and its reason go to ``compress.json`` (``selected``,
``selected_reason``), the served variant's accuracy (R^2), size and latency to the headline
``headline/compress.json``. Bad params, and variants this network cannot have, fail before any work.

Families: every step applies to cnn, mlp, lstm and gru networks. Structured pruning of an
LSTM/GRU removes recurrent units (see :mod:`components.prune`); static int8 leaves LSTM/GRU ops
in float (ONNX Runtime has no static int8 kernel for them) and quantizes the dense layers;
dynamic int8 quantizes the dense layers, and an LSTM too where ``dynamic_op_types`` may name
``LSTM`` (ONNX Runtime has no dynamic int8 GRU).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components import tasks
from components.config import (
    EDGE_INT8_VARIANT,
    LAST_ONLY,
    NEW_STUDENT,
    REFERENCE_VARIANT,
    CompressParams,
    Params,
    TrainParams,
)
from components.dataset import DatasetMeta, Split, load_split, meta_path
from components.families import FAMILIES
from components.metrics import task_metrics
from components.model import NetConfig, config_from_dict, load_model
from components.onnx_files import (
    CALLS_PER_ROUND,
    CHECK_SAMPLES,
    LATENCY_BATCHES,
    LATENCY_ROUNDS,
    OnnxCheck,
    check_quantized,
    export_onnx,
    gzip_size,
    int8_initializers,
    measure_latencies,
    run_onnx,
)
from components.recipe import recorded, resolve_for, unresolved
from components.records import CompressSummary, compress_headline, write_headline
from components.stage import StageError, main, write_json

log = logging.getLogger("pipeline.compress")

VARIANTS = (REFERENCE_VARIANT, EDGE_INT8_VARIANT)  # always written: other stages read them
EPS = 1e-9


@dataclass(frozen=True)
class VariantReport:
    name: str
    size_bytes: int
    accuracy: float | None  # classification (None for regression)
    macro_f1: float | None
    latency_ms_batch1: float
    steps: tuple[str, ...] = ()
    params: int = 0  # of the PyTorch network it came from (quantization keeps the count)
    nonzero_params: int = 0
    size_gzip_bytes: int = 0
    latency_ms_batch64: float = 0.0
    accuracy_drop: float | None = 0.0  # vs fp32
    macro_f1_drop: float | None = 0.0
    passed: bool = True  # the drops within compress.max_accuracy_drop
    check: OnnxCheck | None = None
    task: str = "classification"
    r2: float | None = None  # regression, on the test split, in target units
    rmse: float | None = None
    mae: float | None = None
    r2_drop: float | None = None  # vs fp32

    @property
    def score(self) -> float:
        """The task's headline metric: accuracy, or R^2 for regression."""
        return getattr(self, tasks.get(self.task).selection_key)

    @property
    def drop(self) -> float:
        """The headline metric's drop vs fp32."""
        return getattr(self, f"{tasks.get(self.task).selection_key}_drop")


@dataclass(frozen=True)
class CompressResult:
    variants: dict[str, VariantReport]
    accuracy_drop: float  # int8's, vs fp32: accuracy, or R^2 for regression
    passed: bool  # int8's verdict
    selected: str = REFERENCE_VARIANT
    selected_reason: str = ""
    distillation: dict | None = None


def pick_calibration(train: Split, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` training examples, seeded: all of them for a small training split."""
    if n > len(train):
        log.info("calibrating on all %d training examples (calibration_samples is %d)",
                 len(train), n)  # fmt: skip
    return train.sample(n, seed).x


def check_variants_apply(config: NetConfig, params: CompressParams) -> None:
    """Refuse, before any work, a declared variant that this network cannot have."""
    from components.quantize import dynamic_targets

    dynamic = sorted(n for n, steps in params.variants.items() if steps[-1] == "quantize_dynamic")
    ops = FAMILIES[config.family].quantized_ops
    if dynamic and not dynamic_targets(ops, params.quantization):
        raise StageError(
            f"compress.variants.{dynamic[0]}: quantize_dynamic with compress.quantization."
            f"dynamic_op_types {list(params.quantization.dynamic_op_types)} quantizes nothing "
            f"in a {config.family} network (its quantizable ops: {', '.join(sorted(ops))}; "
            "ONNX Runtime has dynamic int8 kernels for Conv, MatMul and LSTM only): add MatMul"
        )


# ---------------------------------------------------------------- the variants


def _torch_steps(steps: tuple[str, ...]) -> tuple[str, ...]:
    return steps[:-1] if steps and steps[-1] in LAST_ONLY else steps


class _Networks:
    """The PyTorch network after each prefix of steps, computed once and kept."""

    def __init__(self, teacher, teacher_config, student_config, data, train_params, params):
        self.nets: dict[tuple[str, ...], object] = {(): teacher}
        self.teacher_config, self.student_config = teacher_config, student_config
        self.train_set, self.val_set = data
        self.train_params, self.params = train_params, params

    def get(self, steps: tuple[str, ...]):
        if steps not in self.nets:
            *before, step = steps
            source = self.get(tuple(before))
            started = time.perf_counter()
            net, report = self._apply(step, source)
            self.nets[steps] = net
            fitted = f"; fine-tuned {report.epochs} epochs, {report.summary()}" if report else ""
            log.info("%s: %.1f s%s", " -> ".join(steps), time.perf_counter() - started, fitted)
        return self.nets[steps]

    def _apply(self, step: str, net):
        from components import distill, prune

        data = (self.train_set, self.val_set)
        if step == "distil":  # the trained network teaches; a first step starts a new student
            student = None if net is self.nets[()] else net
            return distill.distil(
                self.nets[()], self.student_config, *data, self.train_params,
                self.params.distillation, student,
            )  # fmt: skip
        if step == "student_alone":
            return distill.train_alone(
                self.student_config, *data, self.train_params, self.params.distillation
            )
        if step in ("prune_structured", "prune_unstructured"):
            shape = tuple(self.teacher_config.input_shape)
            return prune.prune_and_finetune(
                net, step, shape, *data, self.train_params, self.params.pruning
            )
        raise StageError(f"compress.variants: unknown step {step!r}")  # config refuses it first


def build_variants(
    teacher,
    teacher_config: NetConfig,
    train: Split,
    val: Split,
    params: CompressParams,
    train_params: TrainParams,
    out_dir: Path,
    calibration: np.ndarray,
    student_config: NetConfig | None,
) -> dict[str, tuple[Path, object, OnnxCheck, tuple[str, ...]]]:
    """Write ``<variant>.onnx`` for fp32 and every declared variant, each checked.

    Returns, per variant, its file, its PyTorch source network, the check and its steps.
    """
    from components import quantize
    from components.prune import make_permanent

    shape = tuple(teacher_config.input_shape)
    nets = _Networks(teacher, teacher_config, student_config, (train, val), train_params, params)
    probes = train.head(CHECK_SAMPLES).x  # real examples for exporting and checking fp32 files
    samples = np.concatenate([val.head(CHECK_SAMPLES).x, probes])[:CHECK_SAMPLES]
    # Regression: differences are judged in standard deviations of the training target.
    target_std = None if tasks.get(teacher_config.task).has_classes else teacher_config.target_std
    fp32_exports: dict[tuple[str, ...], Path] = {}
    scratch = Path(tempfile.mkdtemp(prefix="fp32-", dir=out_dir))

    def fp32_of(steps: tuple[str, ...], path: Path | None = None) -> tuple[Path, OnnxCheck | None]:
        """The checked fp32 export of the network after ``steps`` (exported once)."""
        if steps in fp32_exports:
            if path is not None:
                shutil.copyfile(fp32_exports[steps], path)
            return (path or fp32_exports[steps]), None
        target = path or scratch / f"{len(fp32_exports)}.onnx"
        check = export_onnx(
            make_permanent(nets.get(steps)), shape, target, params.onnx_tolerance, probes,
            target_std,
        )  # fmt: skip
        fp32_exports[steps] = target
        return target, check

    built = {}
    checks: dict[tuple[str, ...], OnnxCheck] = {}
    declared = {REFERENCE_VARIANT: (), **params.variants}
    try:
        for name, steps in declared.items():
            steps = tuple(steps)
            path = Path(out_dir) / f"{name}.onnx"
            source_steps = _torch_steps(steps)
            if source_steps == steps:  # no quantization: the fp32 export is the variant
                _, check = fp32_of(steps, path)
                check = checks.setdefault(steps, check)
            else:
                fp32_path, check = fp32_of(source_steps)
                if check is not None:
                    checks[source_steps] = check
                started = time.perf_counter()
                if steps[-1] == "quantize_static":
                    quantize.quantize_static(fp32_path, path, calibration, params.quantization)
                else:
                    quantize.quantize_dynamic(fp32_path, path, params.quantization)
                if not int8_initializers(path):
                    raise StageError(
                        f"compress.variants.{name}: {steps[-1]} left no int8 weight in "
                        f"{path.name} (compress.quantization: {params.quantization.format}, "
                        f"dynamic_op_types {list(params.quantization.dynamic_op_types)})"
                    )
                check = check_quantized(
                    nets.get(source_steps), path, samples, params.quantization.min_agreement,
                    target_std,
                )  # fmt: skip
                log.info(
                    "%s: %s in %.1f s, agrees with its source on %.1f%% of %d examples",
                    name, steps[-1], time.perf_counter() - started, 100 * check.value,
                    check.samples,
                )  # fmt: skip
            built[name] = (path, nets.get(source_steps), check, steps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return built


def select_variant(reports: dict[str, VariantReport], params: CompressParams) -> tuple[str, str]:
    """The variant to package, and why, by ``compress.select.policy``.

    The automatic policies choose among the variants that pass the drop gate (fp32 always
    does); a named variant is returned even when it fails, and the stage then stops.
    """
    policy, gate = params.select.policy, params.max_accuracy_drop
    passing = [r for r in reports.values() if r.passed]
    failing = sorted(r.name for r in reports.values() if not r.passed)
    rejected = f"; over the drop limit: {', '.join(failing)}" if failing else ""
    regression = any(r.task == "regression" for r in reports.values())
    if policy == "named":
        chosen = reports[params.select.variant]
        verdict = "within" if chosen.passed else "NOT within"
        if regression:
            return chosen.name, (
                f"policy named: {chosen.name}, as compress.select.variant says; its R^2 drop vs "
                f"fp32 ({chosen.r2_drop:+.4f}) is {verdict} compress.max_accuracy_drop {gate}"
            )
        return chosen.name, (
            f"policy named: {chosen.name}, as compress.select.variant says; its drops vs fp32 "
            f"(accuracy {chosen.accuracy_drop:+.4f}, macro F1 {chosen.macro_f1_drop:+.4f}) are "
            f"{verdict} compress.max_accuracy_drop {gate}"
        )
    if policy == "smallest_passing":
        key, what = (lambda r: (r.size_bytes, -r.score, r.name)), "smallest file"
    else:
        key, what = (lambda r: (r.latency_ms_batch1, -r.score, r.name)), "fastest at batch 1"
    ranked = sorted(passing, key=key)  # fp32 always passes (drop 0): never empty
    best = ranked[0]
    runner_up = (
        f"; next: {ranked[1].name} ({ranked[1].size_bytes / 1024:.1f} KiB, "
        f"{ranked[1].latency_ms_batch1:.4f} ms)"
        if len(ranked) > 1
        else ""
    )
    drops = "R^2 drop vs fp32 is" if regression else "accuracy and macro F1 drops vs fp32 are"
    return best.name, (
        f"policy {policy}: {best.name} is the {what} ({best.size_bytes / 1024:.1f} KiB, "
        f"{best.latency_ms_batch1:.4f} ms at batch 1, {best.params:,} parameters) among the "
        f"{len(passing)} of {len(reports)} variants whose {drops} "
        f"within {gate} (its drop: {best.drop:+.4f}){runner_up}{rejected}"
    )


def compress(
    model,
    config: NetConfig,
    meta: DatasetMeta,
    splits: dict[str, Split],
    params: CompressParams,
    train_params: TrainParams,
    out_dir: Path,
) -> CompressResult:
    """The core: build every variant, measure it, apply the drop gate, select one.

    ``model`` is the trained network (the teacher), ``config`` its architecture; ``splits``
    holds ``train`` (calibration, fine-tunes), ``val`` (the fine-tunes' best epoch) and
    ``test`` (the measurements); ``train_params`` is the fine-tunes' recipe (values left auto
    are chosen as the train stage chooses them, components/recipe.py).
    """
    from components import distill, prune

    train, val, test = splits["train"], splits["val"], splits["test"]
    if unresolved(train_params):  # the stage passes model.json's recipe, already resolved
        if train_params.model == "auto":
            train_params = train_params.model_copy(update={"model": config.family})
        train_params = resolve_for(train_params, meta, len(train)).params  # as train did
    # Everything that can be refused is refused here, before any work.
    if config.task != meta.task:
        raise StageError(
            f"the trained model is a {config.task} network but the prepared data "
            f"({meta.source}) is a {meta.task} task: re-run the train stage"
        )
    calibration = pick_calibration(train, params.calibration_samples)
    check_variants_apply(config, params)
    student_cfg = None
    if any(s[0] in NEW_STUDENT for s in params.variants.values()):
        student_cfg = distill.check_student(model, config, params.distillation)

    built = build_variants(
        model, config, train, val, params, train_params, out_dir, calibration, student_cfg
    )
    latencies = measure_latencies(
        {n: b[0] for n, b in built.items()}, calibration, params.latency_threads
    )
    measured = {
        name: task_metrics(
            meta.task,
            test.y,
            test.map_x(lambda x, path=path: run_onnx(path, x)),
            meta.class_names,
        )
        for name, (path, *_) in built.items()
    }
    ref = measured[REFERENCE_VARIANT]
    gate = params.max_accuracy_drop + EPS
    reports = {}
    for name, (path, source, check, steps) in built.items():
        m = measured[name]
        common = dict(
            name=name,
            size_bytes=path.stat().st_size,
            latency_ms_batch1=latencies[name][1],
            steps=steps,
            params=distill.count_parameters(source),
            nonzero_params=prune.count_nonzero(source),
            size_gzip_bytes=gzip_size(path),
            latency_ms_batch64=latencies[name][64],
            check=check,
            task=meta.task,
        )
        if meta.is_regression:
            r2_drop = ref["r2"] - m["r2"]
            reports[name] = VariantReport(
                **common, accuracy=None, macro_f1=None, accuracy_drop=None, macro_f1_drop=None,
                r2=m["r2"], rmse=m["rmse"], mae=m["mae"], r2_drop=r2_drop,
                passed=r2_drop <= gate,
            )  # fmt: skip
            continue
        acc_drop, f1_drop = ref["accuracy"] - m["accuracy"], ref["macro_f1"] - m["macro_f1"]
        reports[name] = VariantReport(
            **common,
            accuracy=m["accuracy"],
            macro_f1=m["macro_f1"],
            accuracy_drop=acc_drop,
            macro_f1_drop=f1_drop,
            passed=acc_drop <= gate and f1_drop <= gate,
        )
    selected, reason = select_variant(reports, params)
    int8 = reports[EDGE_INT8_VARIANT]
    return CompressResult(
        reports,
        int8.drop,
        int8.passed,
        selected,
        reason,
        _distillation_summary(model, student_cfg, reports, params) if student_cfg else None,
    )


def _distillation_summary(teacher, student_cfg, reports, params: CompressParams) -> dict:
    """Student vs teacher, and distilled vs alone when both variants were built."""
    from components.distill import count_parameters, new_student

    d = params.distillation
    n_teacher = count_parameters(teacher)
    n_student = count_parameters(new_student(student_cfg, 0))
    out = {
        "student_channels": list(student_cfg.channels),
        "student_hidden_units": list(student_cfg.hidden_units),
        "teacher_params": n_teacher,
        "student_params": n_student,
        "param_ratio": round(n_teacher / n_student, 3),
        "temperature": d.temperature,
        "soft_loss_weight": d.soft_loss_weight,
        "max_epochs": d.max_epochs,
    }
    if FAMILIES[student_cfg.family].recurrent:
        out["student_rnn_hidden_size"] = student_cfg.rnn_hidden_size
    by_steps = {r.steps: r for r in reports.values()}
    distilled, alone = by_steps.get(("distil",)), by_steps.get(("student_alone",))
    if distilled and alone and distilled.task == "regression":
        out["distilled_r2"] = round(distilled.r2, 6)
        out["alone_r2"] = round(alone.r2, 6)
        out["gain_r2"] = round(distilled.r2 - alone.r2, 6)
    elif distilled and alone:
        out["distilled_accuracy"] = round(distilled.accuracy, 6)
        out["alone_accuracy"] = round(alone.accuracy, 6)
        out["gain_points"] = round(100 * (distilled.accuracy - alone.accuracy), 3)
    return out


# ---------------------------------------------------------------- the stage


def _variant_json(v: VariantReport) -> dict:
    task = tasks.get(v.task)
    keys = [*task.variant_keys, *(f"{k}_drop" for k in task.drop_keys)]
    metrics = {k: round(getattr(v, k), 6) for k in keys}
    return {
        "steps": " -> ".join(v.steps) or "none",
        "params": v.params,
        "nonzero_params": v.nonzero_params,
        "size_bytes": v.size_bytes,
        "size_gzip_bytes": v.size_gzip_bytes,
        **metrics,
        "passed": v.passed,
        "latency_ms_batch1": round(v.latency_ms_batch1, 4),
        "latency_ms_batch64": round(v.latency_ms_batch64, 4),
        "onnx_check": {k: round(x, 8) if isinstance(x, float) else x
                       for k, x in asdict(v.check).items() if x is not None}
                      if v.check else None,
    }  # fmt: skip


def result_payload(result: CompressResult, params: CompressParams) -> dict:
    fp32, int8 = result.variants[REFERENCE_VARIANT], result.variants[EDGE_INT8_VARIANT]
    drop_key = f"int8_{tasks.get(int8.task).selection_key}_drop"
    return {
        "task": int8.task,
        "variants": {v.name: _variant_json(v) for v in result.variants.values()},
        "reference": REFERENCE_VARIANT,
        "int8_size_ratio": round(fp32.size_bytes / int8.size_bytes, 3),
        drop_key: round(result.accuracy_drop, 6),
        "gate": {
            "max_accuracy_drop": params.max_accuracy_drop,
            "passed": result.passed,  # int8's; each variant has its own "passed"
        },
        "served_variant": result.selected,  # what gate and package read
        "selected": result.selected,
        "selected_reason": result.selected_reason,
        "policy": params.select.policy,
        "distillation": result.distillation,
        "latency": {
            "threads": params.latency_threads,
            "batch_sizes": list(LATENCY_BATCHES),
            "rounds": LATENCY_ROUNDS,
            "calls_per_round": {str(b): c for b, c in CALLS_PER_ROUND.items()},
            "statistic": "ms per call in the fastest round (ONNX Runtime, CPU)",
        },
    }


def format_table(result: CompressResult) -> str:
    """One line per variant: size, latency, then the task's metrics and the drop gate."""
    if any(v.task == "regression" for v in result.variants.values()):
        head = f"{'R^2':>7} {'drop':>7} {'RMSE':>9} {'MAE':>9}"

        def metrics(v: VariantReport) -> str:
            return f"{v.r2:7.4f} {v.r2_drop:+7.4f} {v.rmse:9.4g} {v.mae:9.4g}"
    else:
        head = f"{'acc':>7} {'drop pt':>7} {'F1':>7}"

        def metrics(v: VariantReport) -> str:
            return f"{v.accuracy:7.4f} {100 * v.accuracy_drop:+7.2f} {v.macro_f1:7.4f}"

    lines = [
        f"{'variant':20} {'params':>8} {'KiB':>7} {'gz KiB':>7} {'b1 ms':>7} {'b64 ms':>7} "
        f"{head}  gate"
    ]
    for v in result.variants.values():
        lines.append(
            f"{v.name:20} {v.params:8d} {v.size_bytes / 1024:7.1f} {v.size_gzip_bytes / 1024:7.1f} "
            f"{v.latency_ms_batch1:7.4f} {v.latency_ms_batch64:7.3f} {metrics(v)}  "
            f"{'pass' if v.passed else 'FAIL'}"
        )
    return "\n".join(lines)


def run(params: Params) -> CompressResult:
    paths, cfg = params.paths, params.compress
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    splits = {s: load_split(paths.prepared_dir, s) for s in ("train", "val", "test")}
    model, card = load_model(paths.model_dir)
    config = config_from_dict(card.config)

    # Build into a scratch folder and swap it in only when everything passed, so a failed
    # run leaves the previous good exports in place.
    out_dir = Path(paths.model_dir) / "onnx"
    scratch = Path(tempfile.mkdtemp(prefix="onnx-", dir=paths.model_dir))
    scratch.chmod(0o755)
    try:
        # Fine-tune as train did: its recorded recipe, every auto value as it chose it.
        try:
            train_params = recorded(card, params.train, meta)
        except ValueError as exc:
            raise StageError(f"{Path(paths.model_dir) / 'model.json'}: {exc}") from None
        result = compress(model, config, meta, splits, cfg, train_params, scratch)
        payload = result_payload(result, cfg)
        write_json(Path(paths.metrics_dir) / "compress.json", payload)
        headline = compress_headline(CompressSummary.model_validate(payload))
        write_headline(paths.metrics_dir, "compress", headline)
        for line in format_table(result).splitlines():
            log.info("%s", line)
        log.info("selected %s: %s", result.selected, result.selected_reason)
        selected = result.variants[result.selected]
        if not selected.passed and selected.task == "regression":
            raise StageError(
                f"{selected.name} (compress.select.variant) loses {selected.r2_drop:.4f} test "
                f"R^2 vs fp32, more than compress.max_accuracy_drop {cfg.max_accuracy_drop}"
            )
        if not selected.passed:
            raise StageError(
                f"{selected.name} (compress.select.variant) loses {selected.accuracy_drop:.4f} "
                f"test accuracy and {selected.macro_f1_drop:.4f} macro F1 vs fp32, more than "
                f"compress.max_accuracy_drop {cfg.max_accuracy_drop}"
            )
        shutil.rmtree(out_dir, ignore_errors=True)
        scratch.rename(out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


if __name__ == "__main__":
    main("compress", run)
