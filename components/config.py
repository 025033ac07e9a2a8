"""Typed view of params.yaml: the schema and the checks, never a second copy of the values.

Every stage calls :func:`load_params` once and receives frozen pydantic objects. A bad value
fails here with a message that names the key, before any stage does work.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.families import FAMILIES, MODELS

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml (or an override) is missing a key or holds a bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    """Where the stages read and write. In the repository's params.yaml each is relative and
    inside it (:func:`check_repository_paths`); a stage called from a notebook may be given any
    folders, as long as no two of them overlap."""

    external_dir: Path
    raw_dir: Path
    prepared_dir: Path
    model_dir: Path
    metrics_dir: Path
    reports_dir: Path
    artefacts_dir: Path
    champion_file: Path
    checkpoint_dir: Path

    @model_validator(mode="after")
    def _apart(self) -> Paths:
        named = {}
        for key, value in self.model_dump().items():
            if os.path.normpath(value) == ".":
                raise ValueError(
                    f"paths.{key}: {str(value)!r} is the whole folder; name one inside"
                )
            named[key] = Path(os.path.normpath(value))
        keys = list(named)
        for i, key in enumerate(keys):
            for other in keys[i + 1 :]:
                a, b = named[key], named[other]
                if a.is_absolute() != b.is_absolute():
                    continue  # told apart against the repository: check_repository_paths
                if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                    raise ValueError(
                        f"paths.{key} ({a}) and paths.{other} ({b}) overlap: each stage output "
                        "needs a place of its own (DVC deletes an output before its stage runs)"
                    )
        return self


# Folders DVC deletes before their stage runs (dvc.yaml outs) or a stage deletes itself (the
# train stage drops its checkpoints): nothing git keeps may live there.
DELETED_FOLDERS = (
    "raw_dir", "prepared_dir", "model_dir", "reports_dir", "artefacts_dir", "checkpoint_dir",
)  # fmt: skip
# A dependency only: may be a folder anywhere (DVC reads it) and hold files git keeps (.gitkeep).
READ_ONLY_PATHS = ("external_dir",)


def check_repository_paths(paths: Paths, root: Path) -> None:
    """The ``paths`` of the repository at ``root`` (its params.yaml, overrides applied): each
    relative, inside the repository, apart from the others, and no folder that DVC or a stage
    deletes holding files tracked by git (``paths.artefacts_dir=deploy`` would lose the champion
    record). Raises :class:`ParamsError` naming the param."""
    root = Path(root).resolve()
    resolved = {}
    for key, value in paths.model_dump().items():
        where = f"paths.{key}: {str(value)!r}"
        if key in READ_ONLY_PATHS:
            resolved[key] = (root / value).resolve()
            continue
        if Path(value).is_absolute():
            raise ParamsError(
                f"{where} must be relative to the repository (e.g. {Path(value).name})"
            )
        full = (root / value).resolve()
        if not full.is_relative_to(root) or full == root:
            raise ParamsError(f"{where} must name a place inside the repository")
        resolved[key] = full
    keys = list(resolved)
    for i, key in enumerate(keys):
        for other in keys[i + 1 :]:
            a, b = resolved[key], resolved[other]
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise ParamsError(
                    f"paths.{key} ({getattr(paths, key)}) and paths.{other} "
                    f"({getattr(paths, other)}) overlap: each needs a place of its own"
                )
    for key in DELETED_FOLDERS:
        tracked = _tracked_by_git(root, resolved[key])
        if tracked:
            shown = ", ".join(tracked[:3]) + (
                f" and {len(tracked) - 3} more" if len(tracked) > 3 else ""
            )
            raise ParamsError(
                f"paths.{key}: {str(getattr(paths, key))!r} holds files git tracks ({shown}), and "
                f"the folder is deleted before its stage runs: choose a folder of its own"
            )


def _tracked_by_git(root: Path, path: Path) -> list[str]:
    """The files under ``path`` that git tracks ([] outside a git repository)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", str(path)],
            cwd=root, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [f for f in out.stdout.split("\0") if f] if out.returncode == 0 else []


class IngestParams(_Section):
    source: str = Field(min_length=1)
    kind: str  # auto | image | table | sequence | a plugin "package.module:Class"
    target: str  # tables and time series: the column to predict
    task: Literal["auto", "classification", "regression"]
    features: tuple[str, ...]  # tables and time series: input columns (empty: all but target)
    window: int = Field(ge=1)  # time series: steps of history in one example
    horizon: int = Field(ge=1)  # time series: predict the target this many steps after it
    time_index_as_input: bool  # time series: keep an increasing integer column (a year) as input
    test_fraction: float = Field(gt=0, lt=1)
    val_fraction: float = Field(gt=0, lt=1)
    seed: int
    # memory: splits as .npz, loaded whole; shards: tar shards read a shard at a time (every
    # stage, every DDP rank); auto: shards when the splits' encoded examples exceed
    # shard_above_mb (components/dataset.py, docs/training.md)
    storage: Literal["auto", "memory", "shards"] = "auto"
    shard_above_mb: float = Field(default=1024, gt=0)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from components.kinds import registry  # names only: the kinds build on the data layer

        if value != "auto" and not registry.is_known(value):
            raise ValueError(
                f"unknown data kind {value!r}: use auto, one of {list(registry.names())} or a "
                "plugin 'package.module:Class'"
            )
        return value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> IngestParams:
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction must leave at least 10 % for training")
        return self


class ValidateParams(_Section):
    min_rows_per_class: int = Field(ge=1)
    max_missing_fraction: float = Field(ge=0, le=1)
    # a sharded split's per-example summaries above this many rows: the suites run on a seeded
    # sample of them (counts, shares and ranges still come from every example)
    max_summary_rows: int = Field(default=200_000, ge=100)


class AugmentParams(_Section):
    """Random changes applied to training batches only (never to validation or test)."""

    # None (null): the recipe chooses (components/recipe.py): small shifts and rotations for
    # images, nothing for other kinds
    crop_padding: int | None = Field(ge=0)  # pad by this many pixels, then crop back at random
    max_rotation_degrees: float | None = Field(ge=0, le=180)
    horizontal_flip: bool  # digits must not be flipped; photos usually may (never auto)


class TrainParams(_Section):
    """The train section. ``auto`` / ``None`` (null) values are the recipe's to choose for the
    data (components/recipe.py); any other value is used as it is."""

    model: Literal[("auto", *MODELS)]
    # Time series: forecast the target's level, or its change from the window's last value
    # (added back inside the network); auto: the recipe measures the series and chooses.
    forecast: Literal["auto", "level", "change"] = "auto"
    seed: int
    max_epochs: int | None = Field(ge=1)  # None: from min_steps and the training rows
    min_steps: int = Field(ge=1)  # the step budget when max_epochs is None
    batch_size: int = Field(ge=1)  # global: split across processes under DDP
    optimizer: Literal["sgd", "adam", "adamw"]
    learning_rate: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = Field(ge=0)
    l1_penalty: float = Field(ge=0)
    lr_schedule: Literal["none", "step", "cosine", "onecycle"]
    lr_step_epochs: int = Field(ge=1)
    lr_step_gamma: float = Field(gt=0, le=1)
    gradient_clip_norm: float = Field(ge=0)
    dropout: float = Field(ge=0, lt=1)
    channels: tuple[int, ...] | None  # None: sized to the image
    hidden_units: tuple[int, ...] | None  # None: the recipe's dense layer
    rnn_hidden_size: int | None = Field(ge=1)  # LSTM / GRU: units of each recurrent layer
    rnn_layers: int = Field(ge=1)
    batch_norm: bool
    activation: Literal["relu", "tanh", "sigmoid"]
    augment: AugmentParams
    early_stopping_patience: int | None = Field(ge=1)  # None: from the epochs
    resume: bool
    # also checkpoint every this many optimiser steps (0: at epoch ends only): with sharded
    # splits a killed run then resumes mid-epoch at exactly the next example
    checkpoint_every_n_steps: int = Field(default=0, ge=0)
    init_from: str
    freeze: tuple[str, ...]
    accelerator: Literal["auto", "cpu", "gpu"]
    devices: int | Literal["auto"]
    num_nodes: int = Field(ge=1)
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"]
    precision: Literal["32-true", "16-mixed", "bf16-mixed"]
    deterministic: bool

    @field_validator("channels", "hidden_units")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(c < 1 for c in value):
            raise ValueError("every layer needs at least 1 unit or channel")
        return value

    @model_validator(mode="after")
    def _family_needs(self) -> TrainParams:
        needs_channels = self.model != "auto" and "channels" in FAMILIES[self.model].widths
        if needs_channels and self.channels is not None and not self.channels:
            raise ValueError(f"model {self.model} needs at least one entry in train.channels")
        if self.freeze and not self.init_from:
            raise ValueError("train.freeze needs train.init_from: there is nothing to keep")
        return self


class EvaluateParams(_Section):
    min_accuracy: float = Field(ge=0, le=1)  # classification gates
    min_macro_f1: float = Field(ge=0, le=1)
    min_class_recall: float = Field(ge=0, le=1)
    min_r2: float = Field(le=1)  # regression gate: coefficient of determination on the test split
    max_drop_vs_champion: float = Field(ge=0, le=1)
    baselines: bool  # fit the data kind's classical baselines and report them (baselines.json)
    baseline_max_train_rows: int = Field(ge=10)  # a seeded sample of the train split beyond this
    # gate (off when null): the network's accuracy (R^2) minus the best baseline's must reach
    # this; a small negative number lets it trail by that much
    min_lift_over_baseline: float | None = Field(default=None, ge=-1, le=1)

    @model_validator(mode="after")
    def _lift_needs_baselines(self) -> EvaluateParams:
        if self.min_lift_over_baseline is not None and not self.baselines:
            raise ValueError("evaluate.min_lift_over_baseline needs evaluate.baselines: true")
        return self


class PromoteParams(_Section):
    auto: bool


COMPRESS_METHODS = (
    "distil",  # train on the teacher's soft targets: first, a new smaller student; later, the
    # network so far (e.g. a pruned one) is trained further
    "student_alone",  # the same new student trained on the labels alone: the baseline (first)
    "prune_structured",  # remove whole channels / hidden units (DepGraph), then fine-tune
    "prune_unstructured",  # zero the smallest weights, then fine-tune (the file stays dense)
    "quantize_static",  # int8 weights and activations, calibrated on training images (last)
    "quantize_dynamic",  # int8 weights, activations quantized at run time (last)
)
CompressMethod = Literal[COMPRESS_METHODS]
FIRST_ONLY = ("student_alone",)
NEW_STUDENT = ("distil", "student_alone")  # as a first step: a new, smaller network
LAST_ONLY = ("quantize_static", "quantize_dynamic")
REFERENCE_VARIANT = "fp32"  # the trained network exported as is: every drop is measured from it
EDGE_INT8_VARIANT = "int8"  # other stages and the edge bundle read int8.onnx


class PruningParams(_Section):
    structured_amount: float = Field(gt=0, lt=1)  # share of channels / hidden units removed
    unstructured_amount: float = Field(gt=0, lt=1)  # share of weights zeroed
    finetune_epochs: int = Field(ge=0)
    finetune_learning_rate: float = Field(gt=0)


class DistillationParams(_Section):
    width: float = Field(gt=0, lt=1)  # student widths = teacher's x width, unless given below
    channels: tuple[int, ...] | None  # explicit student conv channels (None: from width)
    hidden_units: tuple[int, ...] | None  # explicit student dense widths (None: from width)
    rnn_hidden_size: int | None = Field(ge=1)  # LSTM/GRU student units (None: from width)
    temperature: float = Field(gt=0)
    soft_loss_weight: float = Field(ge=0, le=1)  # the rest of the loss is on the labels
    max_epochs: int = Field(ge=1)

    @field_validator("channels", "hidden_units")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(c < 1 for c in value):
            raise ValueError("every student layer needs at least 1 unit or channel")
        return value


class QuantizationParams(_Section):
    format: Literal["qdq", "qoperator"]
    per_channel: bool
    reduce_range: bool
    dynamic_op_types: tuple[Literal["Conv", "MatMul", "Gemm", "LSTM"], ...] = Field(min_length=1)
    # The ONNX check of a quantized model: on sample images, the share whose top class is its
    # PyTorch source's (int8 logits differ too much for an absolute tolerance).
    min_agreement: float = Field(gt=0, le=1)


class SelectParams(_Section):
    policy: Literal["smallest_passing", "fastest_passing", "named"]
    variant: str  # the variant policy `named` packages


class CompressParams(_Section):
    calibration_samples: int = Field(ge=1)
    max_accuracy_drop: float = Field(ge=0, le=1)
    onnx_tolerance: float = Field(gt=0)
    latency_threads: int = Field(ge=1)
    pruning: PruningParams
    distillation: DistillationParams
    quantization: QuantizationParams
    variants: dict[str, tuple[CompressMethod, ...]]
    select: SelectParams

    @field_validator("variants")
    @classmethod
    def _valid_pipelines(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for name, steps in value.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise ValueError(f"variant name {name!r}: use lower-case letters, digits, _ and -")
            if name == REFERENCE_VARIANT:
                raise ValueError(
                    f"{name!r} is the uncompressed network; give the variant another name"
                )
            if not steps:
                raise ValueError(f"variant {name!r} has no steps")
            for i, step in enumerate(steps):
                if step in FIRST_ONLY and i != 0:
                    raise ValueError(f"variant {name!r}: {step} can only be the first step")
                if step in LAST_ONLY and i != len(steps) - 1:
                    raise ValueError(f"variant {name!r}: {step} can only be the last step")
        int8 = value.get(EDGE_INT8_VARIANT)
        if int8 is None or int8[-1] not in LAST_ONLY:
            raise ValueError(
                f"variant {EDGE_INT8_VARIANT!r} must be declared and end with a quantize step: "
                "other stages and the edge bundle read int8.onnx"
            )
        return value

    @model_validator(mode="after")
    def _known_names(self) -> CompressParams:
        known = [REFERENCE_VARIANT, *self.variants]
        for key, name in (("select.variant", self.select.variant),):
            if name not in known:
                raise ValueError(f"{key} {name!r} is not a variant; known: {', '.join(known)}")
        return self


class EdgeParams(_Section):
    bento_name: str = Field(pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    confidence_threshold: float = Field(ge=0, le=1)
    cloud_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    cloud_timeout_s: float = Field(gt=0)
    cloud_retry_s: float = Field(ge=0)


class PackageParams(_Section):
    bento_name: str = Field(pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    model_name: str = Field(pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    max_batch_size: int = Field(ge=1)
    max_latency_ms: int = Field(ge=1)
    max_request_bytes: int | None = Field(None, ge=1024)
    max_image_bytes: int = Field(ge=1024)
    edge: EdgeParams

    @model_validator(mode="after")
    def _edge_is_another_bento(self) -> PackageParams:
        if self.edge.bento_name == self.bento_name:
            raise ValueError("edge.bento_name must differ from bento_name")
        return self


class OrchestrateParams(_Section):
    """How the Prefect flow runs the stages; never read by a stage, so no stage re-runs for it."""

    retries: int = Field(ge=0, le=10)
    retry_delay_seconds: float = Field(ge=0)
    lock_wait_seconds: float = Field(ge=0)
    save_experiment: bool
    push: bool
    remote: str
    git_remote: str
    schedule_cron: str
    schedule_timezone: str
    work_pool: str

    @field_validator("schedule_cron")
    @classmethod
    def _five_cron_fields(cls, value: str) -> str:
        # The full check is Prefect's, when the schedule is registered; this catches typos early.
        if len(value.split()) != 5:
            raise ValueError("a cron schedule has 5 fields: minute hour day month weekday")
        return value

    @field_validator("schedule_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (e.g. UTC, Europe/Paris)") from None
        return value


class SearchDimension(_Section):
    """One key of ``tune.space``: a range (``low``, ``high``, optional ``step`` or ``log``) or a
    list of ``choices``. Integers on both ends (and step) make an integer range."""

    # int | float: an integer stays an integer (pydantic's smart union), so 2..8 is an int range
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = None
    log: bool = False
    choices: tuple | None = None

    @model_validator(mode="after")
    def _a_range_or_choices(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("empty choices")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs choices, or both low and high")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low {self.low:g} >= high {self.high:g}")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError("step must be > 0 and cannot be combined with log")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low:g}")
        return self

    @property
    def is_int(self) -> bool:
        """An integer range: low, high (and step) all written as integers."""
        ends = (self.low, self.high, self.step)
        return self.choices is None and all(v is None or type(v) is int for v in ends)


class TunePruningParams(_Section):
    enabled: bool
    startup_trials: int = Field(ge=0)  # no pruning before this many trials have finished
    warmup_epochs: int = Field(ge=0)  # nor before this many epochs of a trial


class EnsembleParams(_Section):
    top_k: int = Field(ge=0)  # 0: no ensemble; otherwise the k best trials' models (k >= 2)
    weighting: Literal["uniform", "val_score"]

    @field_validator("top_k")
    @classmethod
    def _zero_or_two(cls, value: int) -> int:
        if value == 1:
            raise ValueError("an ensemble needs at least 2 members (0 switches it off)")
        return value


STORAGE_PASSWORD_ENV = "TUNE_STORAGE_PASSWORD"  # the tuning database's password, if it has one


class TuneParams(_Section):
    """The tuning study (flows/tune.py); no stage reads it, so no stage re-runs for it."""

    study_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str  # "" = SQLite under build/tune/; or a database URL (password: environment)
    sampler: Literal["tpe", "random", "grid"]
    seed: int
    metric: Literal["val_accuracy", "val_loss", "val_rmse"]  # validation split only, never test
    n_trials: int = Field(ge=1)
    timeout_seconds: float = Field(gt=0)
    trial_timeout_seconds: float = Field(gt=0)  # one trial's `dvc exp run`, then it is killed
    workers: int = Field(ge=1, le=16)
    trial_overrides: tuple[str, ...]  # key=value set in every trial (e.g. the gates off)
    pruning: TunePruningParams
    final_run: bool
    ensemble: EnsembleParams
    space: dict[str, SearchDimension] = Field(min_length=1)

    @field_validator("storage")
    @classmethod
    def _no_password(cls, value: str) -> str:
        # params.yaml is in git, and the URL is shown in logs and reports.
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#@\s]*:[^/?#@\s]*@", value):
            raise ValueError(
                f"holds a password: leave it out of the URL and set it in the environment "
                f"variable {STORAGE_PASSWORD_ENV} (params.yaml is in git)"
            )
        return value

    @model_validator(mode="after")
    def _grid_needs_a_grid(self) -> TuneParams:
        if self.sampler == "grid":
            for key, dim in self.space.items():
                if dim.choices is None and not dim.is_int:
                    raise ValueError(
                        f"space.{key}: the grid sampler needs choices or an integer range"
                    )
        return self


class Params(_Section):
    paths: Paths
    ingest: IngestParams
    validate_: ValidateParams = Field(alias="validate")
    train: TrainParams
    evaluate: EvaluateParams
    compress: CompressParams
    package: PackageParams
    promote: PromoteParams
    orchestrate: OrchestrateParams
    tune: TuneParams


# Keys that changed name, so an older params.yaml gets told what to write instead.
RENAMED = {"evaluate.max_regression": "evaluate.max_drop_vs_champion"}


def parse_params(raw: dict) -> Params:
    """Validate a params mapping; raise :class:`ParamsError` naming every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if key in RENAMED and err["type"] == "extra_forbidden":
                problems.append(f"{key} is now {RENAMED[key]} (same meaning): rename it")
                continue
            problems.append(f"{key}: {err['msg']}")
        raise ParamsError("invalid params: " + "; ".join(problems)) from None


class _SafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """libyaml's safe loader when PyYAML was built with it (its wheels are): the same documents,
    ~8x faster (every stage reads params.yaml and dvc.lock, 1,300 lines, at start: ~60 ms each
    in pure Python). It reads YAML 1.2's floats too, as DVC (ruamel) does: PyYAML follows YAML
    1.1, where ``1e-07`` (no dot, as ruamel and Python write it) is a string."""


_SafeLoader.add_implicit_resolver(  # a copy of the resolvers: PyYAML's own loaders keep theirs
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml(text: str | bytes):
    """``yaml.safe_load``, through libyaml where PyYAML has it, reading YAML 1.2's floats."""
    return yaml.load(text, Loader=_SafeLoader)  # a safe loader, C or Python


def read_params_file(path: Path = PARAMS_FILE) -> dict:
    """Read params.yaml as a plain mapping (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    return raw


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    return parse_params(read_params_file(path))
