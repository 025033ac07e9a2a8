"""The on-disk format that stages share: input arrays plus targets, and the data set's metadata.

Every kind of data (``DatasetMeta.kind``; components/kinds/ says what each one is) has one
layout: ``x`` is ``(N, *input_shape)`` and ``y`` is ``(N,)``. Images are ``uint8`` pixels
``(N, C, H, W)``; tables ``float32`` encoded features ``(N, F)``; sequences ``float32``
``(N, T, F)``. Targets are ``int64`` class indices into ``class_names`` for classification and
``float32`` values in the target's own units for regression (``class_names`` is then empty).

Each file has its read and write here: the splits (``prepared/<split>.npz``), the rows of a
table or series as read (``prepared/<split>.parquet``), the raw snapshot and ``meta.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
TASKS = ("classification", "regression")


class DatasetError(ValueError):
    """A data file is missing or does not hold what the pipeline expects."""


@dataclass(frozen=True)
class ArraySet:
    x: np.ndarray  # (N, *input_shape): uint8 images or float32 features / sequences
    y: np.ndarray  # (N,) int64 class indices or float32 regression targets

    def __post_init__(self) -> None:
        if self.x.ndim < 2:
            raise DatasetError(
                f"inputs must be (N, ...) with one row per example, got {self.x.shape}"
            )
        if len(self.x) != len(self.y):
            raise DatasetError(f"{len(self.x)} inputs but {len(self.y)} targets")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DatasetMeta:
    class_names: tuple[str, ...]  # empty for regression
    input_shape: tuple[int, ...]  # one example: (C, H, W) | (F,) | (T, F)
    source: str
    split_sizes: dict[str, int]
    kind: str = "image"  # a data kind's name: image | table | sequence | package.module:Class
    task: str = "classification"  # classification | regression
    target: str = ""  # the target column of a table or time series
    feature_names: tuple[str, ...] = ()  # the model's input features, after encoding
    preprocess: dict | None = field(default=None, compare=False)  # components/features.py spec

    def __post_init__(self) -> None:
        from components.kinds import registry  # names only: the kinds build on this module

        if not registry.is_known(self.kind):
            raise DatasetError(
                f"unknown data kind {self.kind!r}; expected one of {registry.names()} or a "
                "plugin 'package.module:Class'"
            )
        if self.task not in TASKS:
            raise DatasetError(f"unknown task {self.task!r}; expected one of {TASKS}")

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def num_outputs(self) -> int:
        """Logits per example (one per class), or 1 predicted value for regression."""
        return 1 if self.is_regression else len(self.class_names)

    def save(self, path: Path) -> None:
        from components.stage import write_text

        write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DatasetMeta:
        """Read what :meth:`save` wrote; any other layout is an error naming the fix."""
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path} not found: run the ingest stage first")
        raw = json.loads(path.read_text())
        expected = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != expected:
            got = set(raw) if isinstance(raw, dict) else set()
            raise DatasetError(
                f"{path}: not this version's data set metadata (missing {sorted(expected - got)}, "
                f"unknown {sorted(got - expected)}): re-run the ingest stage"
            )
        tuples = ("class_names", "input_shape", "feature_names")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in raw.items()})


def save_arrays(data: ArraySet, path: Path) -> None:
    """Write a split as an uncompressed .npz (fast to load, DVC dedupes by content)."""
    from components.stage import replacing

    with replacing(path) as fh:
        np.savez(fh, x=data.x, y=data.y)


def load_arrays(path: Path) -> ArraySet:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: run the stage that makes it first")
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise DatasetError(f"{path} lacks arrays {sorted(missing)}")
        return ArraySet(x=npz["x"], y=npz["y"])


def save_frame(frame, path: Path) -> None:
    """Rows as read (a pandas frame) as Parquet, without the index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def load_frame(path: Path):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: run the stage that makes it first")
    return pd.read_parquet(path)


def raw_path(raw_dir: Path, rows: bool) -> Path:
    """The raw snapshot: the rows of a table or series as Parquet, arrays as .npz."""
    return Path(raw_dir) / ("dataset.parquet" if rows else "dataset.npz")


def split_path(prepared_dir: Path, split: str) -> Path:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(prepared_dir) / f"{split}.npz"


def table_path(prepared_dir: Path, split: str) -> Path:
    """A table or time series split as it was read (before encoding): what validate checks."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(prepared_dir) / f"{split}.parquet"


def meta_path(prepared_dir: Path) -> Path:
    return Path(prepared_dir) / "meta.json"
