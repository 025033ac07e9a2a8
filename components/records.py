"""The files stages hand each other, one typed model each, read and written here only.

A stage reads another stage's output only through these models, so a file that lacks a key, holds
a wrong type or comes from another version of the code is refused with one line that names the
file, the key and the stage to re-run, instead of being half-read with ``.get(...)``.
Writes (components/stage.py ``write_json``) go through a temporary file and ``os.replace``: a
killed run never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from components.stage import StageError, write_json

# Where each hand-off lives: in ``paths.metrics_dir`` (bento.json: ``paths.artefacts_dir``).
TRAIN_FILE = "train.json"
VALIDATION_FILE = "validation.json"
EVALUATE_FILE = "evaluate.json"
BASELINES_FILE = "baselines.json"
EVALUATE_GATES_FILE = "evaluate_gates.json"
COMPRESS_FILE = "compress.json"
GATE_FILE = "gate.json"
BENTO_FILE = "bento.json"
# The numbers runs are compared by, one file per stage: ``metrics_dir/headline/<stage>.json``.
HEADLINE_DIR = "headline"


class Record(BaseModel):
    """A hand-off file: unknown keys are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


R = TypeVar("R", bound=BaseModel)


def read(model: type[R], path: Path, stage: str) -> R:
    """``path`` as ``model``, or a StageError naming the file, the problem and what to re-run."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: run the {stage} stage first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path} is not valid JSON ({exc}): re-run the {stage} stage") from None
    if not isinstance(data, dict):
        raise StageError(f"{path} must hold a JSON object: re-run the {stage} stage")
    expected = model.model_fields.get("format")
    if expected is not None and data.get("format") != expected.default:
        raise StageError(
            f"{path} is in format {data.get('format', 1)}, this code reads format "
            f"{expected.default} (written by an older or newer version): re-run the {stage} "
            f"stage (dvc repro {stage})"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise StageError(
            f"{path} does not hold what the {stage} stage writes ({problems}): re-run the "
            f"{stage} stage (dvc repro {stage})"
        ) from None


# -- evaluate ------------------------------------------------------------------------------


class ValidationSummary(Record):
    """validation.json: the Great Expectations verdict on the prepared splits."""

    success: bool
    evaluated_expectations: int
    failed: tuple[str, ...]  # one line per failed check


class TrainSummary(Record):
    """train.json: how long training ran and the best validation figures (what tuning reads).

    ``best_val_loss`` always; the task's validation metric (``val_accuracy``, ``val_rmse``) as
    ``best_<metric>``, the one extra key this record allows.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    epochs_run: int
    best_epoch: int
    best_val_loss: float

    @model_validator(mode="after")
    def _one_metric(self) -> TrainSummary:
        extra = dict(self.model_extra or {})
        if len(extra) != 1 or not next(iter(extra)).startswith("best_val_"):
            raise ValueError(f"needs one best_val_<metric> besides best_val_loss, has {extra}")
        if not isinstance(next(iter(extra.values())), int | float):
            raise ValueError(f"{next(iter(extra))} must be a number")
        return self

    def best(self, metric: str) -> float:
        """``best_<metric>``, e.g. ``best("val_loss")``; a StageError when it was not logged."""
        value = getattr(self, f"best_{metric}", None)
        if value is None:
            raise StageError(f"train.json has no best_{metric}: train logged {self.logged}")
        return float(value)

    @property
    def logged(self) -> list[str]:
        return ["val_loss", *(k.removeprefix("best_") for k in self.model_extra or {})]


class BaselineFigures(Record):
    metrics: dict[str, float]  # the task's headline test metrics
    fit_seconds: float  # fit and predict, measured
    train_rows: int  # examples it was fitted on (a seeded sample of a larger split)


class Baselines(Record):
    """baselines.json (evaluate): the classical baselines beside the network, same splits."""

    network: dict[str, float]  # the network's headline test metrics
    baselines: dict[str, BaselineFigures]
    best: str | None  # the baseline with the best accuracy (R^2); None when none was fitted
    lift: float | None  # the network's accuracy (R^2) minus the best baseline's


class ClassFigures(Record):
    precision: float
    recall: float
    f1: float
    support: int


class EvaluateMetrics(Record):
    """``metrics/evaluate.json``: the network's test metrics, numbers only. The verdicts are in
    :class:`Verdicts` (``evaluate_gates.json``), so that a changed threshold leaves this file, and
    the stages that read it (compress), unchanged."""

    format: Literal[3] = 3
    task: Literal["classification", "regression"]
    target: str = ""
    test_examples: int
    # classification
    accuracy: float | None = None
    macro_precision: float | None = None
    macro_recall: float | None = None
    macro_f1: float | None = None
    min_class_recall: float | None = None
    per_class: dict[str, ClassFigures] | None = None
    # regression
    r2: float | None = None
    rmse: float | None = None
    mae: float | None = None

    @model_validator(mode="after")
    def _the_task_metrics(self) -> EvaluateMetrics:
        from components import tasks

        missing = [k for k in tasks.get(self.task).required_metrics if getattr(self, k) is None]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)} (a {self.task} run writes them)")
        return self

    def numbers(self) -> dict:
        """The metrics that are set, by key (per-class figures as plain dicts)."""
        return self.model_dump(exclude_none=True, exclude={"format", "task", "target"})


class GateJson(Record):
    value: float | None = None
    threshold: float | None = None
    op: Literal[">=", "<="]
    passed: bool
    reason: str


class Verdicts(Record):
    """``metrics/evaluate_gates.json``: evaluate's verdict on the network, one reason per gate."""

    format: Literal[1] = 1
    passed: bool
    failed: list[str]
    gates: dict[str, GateJson]

    @classmethod
    def of(cls, gates) -> Verdicts:
        return cls(
            passed=all(g.passed for g in gates),
            failed=[g.reason for g in gates if not g.passed],
            gates={g.name: g.to_json() for g in gates},
        )


# -- compress ------------------------------------------------------------------------------


class CompressedVariant(Record):
    """One compressed model as compress measured it. The keys stages read are typed; the rest
    (steps, parameters, the ONNX check, the task's metrics and drops) are details for people
    and the report."""

    model_config = ConfigDict(extra="allow", frozen=True)

    size_bytes: int
    latency_ms_batch1: float | None = None


class CompressSummary(Record):
    """``metrics/compress.json``: every variant compress built and the one it picked to serve."""

    model_config = ConfigDict(extra="allow", frozen=True)

    served_variant: str
    variants: dict[str, CompressedVariant]
    task: Literal["classification", "regression"] | None = None  # None: files before it was kept

    @model_validator(mode="after")
    def _serves_a_variant(self) -> CompressSummary:
        if not self.variants:
            raise ValueError("variants must name at least one model")
        if self.served_variant not in self.variants:
            raise ValueError(
                f"served_variant {self.served_variant!r} is not one of {sorted(self.variants)}"
            )
        return self


# -- gate ----------------------------------------------------------------------------------


class SplitFingerprint(Record):
    sha256: str
    examples: int


class ChampionComparison(Record):
    run: str | None = None
    source: Literal["none", "not comparable", "recorded", "re-evaluated"]
    note: str
    metrics: dict[str, float] | None = None
    # What a client of the champion finds changed in this run's inputs, in one line (None: the
    # same inputs, or no champion): such a run is packaged and recorded, never auto-promoted.
    inputs_differ: str | None = None


class InputColumn(Record):
    """One column a client sends to a table's or series' service: its name, its type and, for
    a category, the values the model knows (components/features.py's spec, less its fit)."""

    name: str
    type: Literal["numeric", "categorical"]
    categories: list[str] | None = None


class JudgedVariant(Record):
    """One ONNX variant as the gate stage measured and judged it (metrics keys: its task's)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    served: bool
    passed: bool
    model_sha256: str
    size_bytes: int
    latency_ms_batch1: float | None = None
    gates: dict[str, GateJson]


class GateReport(Record):
    """``metrics/gate.json``: the verdict on the model about to be packaged, and on what data."""

    format: Literal[1] = 1
    passed: bool
    failed: list[str]
    served_variant: str
    task: Literal["classification", "regression"]
    kind: str
    target: str
    class_names: list[str]
    input_shape: list[int]  # of one example (was image_shape)
    preprocess_sha256: str | None = None
    # The columns a client sends (tables, series; None for images): the champion record keeps
    # them to tell a later run whose inputs differ (components/champion.py InputSchema).
    input_columns: list[InputColumn] | None = None
    test_split: SplitFingerprint
    network: dict[str, float]
    champion: ChampionComparison
    variants: dict[str, JudgedVariant]

    def served(self) -> JudgedVariant:
        return self.variants[self.served_variant]


# -- headline metrics ----------------------------------------------------------------------


class Headline(Record):
    """``metrics/headline/<stage>.json``: the few numbers ``dvc exp show``, ``make history`` and
    ``dvc metrics diff`` compare between runs (the stage's ``metrics:`` in dvc.yaml; the records
    above are plain outs). Numbers only, and no key in two files: DVC makes a column of every
    string too, and names a key two files share ``<path>:<key>``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _numbers_only(self) -> Headline:
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, not {value!r}")
        return self

    def numbers(self) -> dict[str, float]:
        return dict(self.model_extra or {})


def train_headline(summary: TrainSummary) -> Headline:
    """The epoch whose weights were kept (its validation figures are train.json's)."""
    return Headline(best_epoch=summary.best_epoch)


def evaluate_headline(metrics: EvaluateMetrics) -> Headline:
    """The network's headline test metrics: accuracy and macro F1, or R^2, RMSE and MAE."""
    from components import tasks

    return Headline(**{k: getattr(metrics, k) for k in tasks.get(metrics.task).headline_keys})


def compress_headline(summary: CompressSummary) -> Headline:
    """What the bento serves, whichever variant it is: its test accuracy (R^2), size and
    latency at batch 1, as ``served_accuracy`` (``served_r2``), ``served_kib``, ``served_ms``."""
    from components import tasks

    served = summary.variants[summary.served_variant]
    task = tasks.get(summary.task) if summary.task else tasks.of_metrics(served.model_dump())
    key = task.selection_key
    numbers = {
        f"served_{key}": getattr(served, key, None),
        "served_kib": round(served.size_bytes / 1024, 1),
        "served_ms": served.latency_ms_batch1,
    }
    return Headline(**{k: v for k, v in numbers.items() if v is not None})


def headline_keys() -> tuple[str, ...]:
    """Every key a headline file may hold, for any task (``make history`` keeps these columns)."""
    from components import tasks

    keys = ["best_epoch"]
    for task in tasks.TASKS.values():
        keys += [*task.headline_keys, f"served_{task.selection_key}"]
    return (*dict.fromkeys(keys), "served_kib", "served_ms")


def headline_path(metrics_dir: Path, stage: str) -> Path:
    return Path(metrics_dir) / HEADLINE_DIR / f"{stage}.json"


def write_headline(metrics_dir: Path, stage: str, headline: Headline) -> None:
    write_json(headline_path(metrics_dir, stage), headline)


def read_headline(metrics_dir: Path, stage: str) -> Headline:
    return read(Headline, headline_path(metrics_dir, stage), stage)


# -- package -------------------------------------------------------------------------------


class EdgeBento(Record):
    model_config = ConfigDict(extra="allow", frozen=True)

    tag: str | None = None


class BentoSummary(Record):
    """``artefacts/bento.json``: the bentos package built (tags pinned, never ``latest``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    tag: str
    archive: str
    served_variant: str
    model: str
    model_version: str
    edge: EdgeBento | None = None

    @model_validator(mode="after")
    def _pinned(self) -> BentoSummary:
        if ":" not in self.tag or self.tag.endswith(":latest"):
            raise ValueError(f"bento tag {self.tag!r} is not a pinned name:version")
        return self


def read_validation(metrics_dir: Path) -> ValidationSummary:
    return read(ValidationSummary, Path(metrics_dir) / VALIDATION_FILE, "validate")


def read_train(metrics_dir: Path) -> TrainSummary:
    return read(TrainSummary, Path(metrics_dir) / TRAIN_FILE, "train")


def parse_train(text: str, origin: str) -> TrainSummary:
    """train.json's text as found elsewhere (an experiment's commit: tuning reads it there)."""
    try:
        return TrainSummary.model_validate_json(text)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise StageError(f"{origin}: not a train.json this code reads ({problem})") from None


def read_baselines(metrics_dir: Path) -> Baselines:
    return read(Baselines, Path(metrics_dir) / BASELINES_FILE, "evaluate")


def read_evaluate(metrics_dir: Path) -> EvaluateMetrics:
    return read(EvaluateMetrics, Path(metrics_dir) / EVALUATE_FILE, "evaluate")


def read_evaluate_gates(metrics_dir: Path) -> Verdicts:
    return read(Verdicts, Path(metrics_dir) / EVALUATE_GATES_FILE, "evaluate")


def read_compress(metrics_dir: Path) -> CompressSummary:
    return read(CompressSummary, Path(metrics_dir) / COMPRESS_FILE, "compress")


def read_gate(metrics_dir: Path) -> GateReport:
    return read(GateReport, Path(metrics_dir) / GATE_FILE, "gate")


def read_bento(artefacts_dir: Path) -> BentoSummary:
    return read(BentoSummary, Path(artefacts_dir) / BENTO_FILE, "package")


__all__ = ["write_json"]  # the one JSON writer, re-exported for the stages that write records
