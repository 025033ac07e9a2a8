"""Typed view of params.yaml: the schema and the checks, never a second copy of the values.

Every stage calls :func:`load_params` once and receives frozen pydantic objects. A bad value
fails here with a message that names the key, before any stage does work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml (or an override) is missing a key or holds a bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    external_dir: Path
    raw_dir: Path
    prepared_dir: Path
    model_dir: Path
    metrics_dir: Path
    reports_dir: Path
    artefacts_dir: Path


class IngestParams(_Section):
    source: str = Field(min_length=1)
    test_fraction: float = Field(gt=0, lt=1)
    val_fraction: float = Field(gt=0, lt=1)
    seed: int

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> IngestParams:
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction must leave at least 10 % for training")
        return self


class ValidateParams(_Section):
    min_rows_per_class: int = Field(ge=1)
    max_missing_fraction: float = Field(ge=0, le=1)


class TrainParams(_Section):
    seed: int
    max_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    optimizer: Literal["adam", "sgd"]
    learning_rate: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    dropout: float = Field(ge=0, lt=1)
    channels: tuple[int, ...] = Field(min_length=1)
    hidden_units: int = Field(ge=1)
    early_stopping_patience: int = Field(ge=1)
    accelerator: Literal["auto", "cpu", "gpu"]
    devices: int | Literal["auto"]
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"]
    precision: Literal["32-true", "16-mixed", "bf16-mixed"]
    deterministic: bool

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 for c in value):
            raise ValueError("every conv block needs at least 1 channel")
        return value


class EvaluateParams(_Section):
    min_accuracy: float = Field(ge=0, le=1)
    min_macro_f1: float = Field(ge=0, le=1)


class CompressParams(_Section):
    calibration_samples: int = Field(ge=1)
    max_accuracy_drop: float = Field(ge=0, le=1)
    onnx_tolerance: float = Field(gt=0)
    serve_variant: Literal["fp32", "int8"]


class PackageParams(_Section):
    bento_name: str = Field(pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    model_name: str = Field(pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    max_batch_size: int = Field(ge=1)


class Params(_Section):
    paths: Paths
    ingest: IngestParams
    validate_: ValidateParams = Field(alias="validate")
    train: TrainParams
    evaluate: EvaluateParams
    compress: CompressParams
    package: PackageParams


def parse_params(raw: dict) -> Params:
    """Validate a params mapping; raise :class:`ParamsError` naming every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"{key}: {err['msg']}")
        raise ParamsError("invalid params: " + "; ".join(problems)) from None


def read_params_file(path: Path = PARAMS_FILE) -> dict:
    """Read params.yaml as a plain mapping (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    return raw


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    return parse_params(read_params_file(path))


def _parse_value(text: str):
    """Parse an override's value the way YAML would (``2`` -> int, ``[8, 16]`` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _resolve_overrides(overrides: list[str], path: Path) -> dict[str, object]:
    """Parse ``key=value`` items and check them against params.yaml; write nothing."""
    raw = read_params_file(path)
    resolved: dict[str, object] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {key!r}: no section {part!r} in {path}")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], dict):
            raise ParamsError(f"override {key!r}: no such parameter in {path}")
        node[leaf] = resolved[key] = _parse_value(text)
    parse_params(raw)  # the whole file must still validate
    return resolved


def check_overrides(overrides: list[str], path: Path = PARAMS_FILE) -> dict[str, object]:
    """Validate overrides without touching params.yaml; return the values by dotted key."""
    return _resolve_overrides(overrides, Path(path))


def apply_overrides(overrides: list[str], path: Path = PARAMS_FILE) -> dict[str, object]:
    """Apply ``key=value`` overrides to params.yaml, as ``dvc exp run --set-param`` does.

    Every override is checked (the key must exist, the result must validate) before the file
    is touched, so a bad override leaves params.yaml exactly as it was. Comments and layout
    are kept. Returns the applied values by dotted key.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    applied = _resolve_overrides(overrides, path)
    if not applied:
        return applied
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    doc = yaml_rt.load(path.read_text())
    for key, value in applied.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    tmp = path.with_suffix(".yaml.tmp")
    with tmp.open("w") as fh:
        yaml_rt.dump(doc, fh)
    tmp.replace(path)
    return applied
