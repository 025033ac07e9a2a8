"""The on-disk format that stages share: input arrays plus targets, and the data set's metadata.

Three kinds of data (``DatasetMeta.kind``), one layout: ``x`` is ``(N, *input_shape)`` and
``y`` is ``(N,)``.

- ``image``: ``uint8`` arrays shaped ``(N, C, H, W)`` holding raw pixel values 0-255. Scaling to
  0-1 happens inside the model, so the exported ONNX model and the bento take raw pixels too.
- ``table``: ``float32`` features ``(N, F)`` already transformed by the preprocessing that ingest
  fitted on the training split (standardised numbers, one-hot categories; components/features.py).
  That transform travels in ``meta.preprocess`` and is applied again by the served bento.
- ``sequence``: ``float32`` ``(N, T, F)``: windows cut from a time series (forecasting) or one
  sequence per sample (classification), standardised the same way.

Targets are ``int64`` class indices into ``class_names`` for classification, and ``float32``
values in the target's own units for regression (``class_names`` is then empty).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
KINDS = ("image", "table", "sequence")
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


ImageSet = ArraySet  # the name the image-only stages grew up with


@dataclass(frozen=True)
class DatasetMeta:
    class_names: tuple[str, ...]  # empty for regression
    input_shape: tuple[int, ...]  # one example: (C, H, W) | (F,) | (T, F)
    source: str
    split_sizes: dict[str, int]
    kind: str = "image"  # image | table | sequence
    task: str = "classification"  # classification | regression
    target: str = ""  # the target column of a table or time series
    feature_names: tuple[str, ...] = ()  # the model's input features, after encoding
    preprocess: dict | None = field(default=None, compare=False)  # components/features.py spec

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DatasetError(f"unknown data kind {self.kind!r}; expected one of {KINDS}")
        if self.task not in TASKS:
            raise DatasetError(f"unknown task {self.task!r}; expected one of {TASKS}")

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The input shape (the name from when every input was an image)."""
        return self.input_shape

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def num_outputs(self) -> int:
        """Logits per example (one per class), or 1 predicted value for regression."""
        return 1 if self.is_regression else len(self.class_names)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DatasetMeta:
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path} not found: run the ingest stage first")
        raw = json.loads(path.read_text())
        return cls(
            class_names=tuple(raw["class_names"]),
            input_shape=tuple(raw.get("input_shape") or raw["image_shape"]),
            source=raw["source"],
            split_sizes=dict(raw["split_sizes"]),
            kind=raw.get("kind", "image"),
            task=raw.get("task", "classification"),
            target=raw.get("target", ""),
            feature_names=tuple(raw.get("feature_names", ())),
            preprocess=raw.get("preprocess"),
        )


def save_images(data: ArraySet, path: Path) -> None:
    """Write a split as an uncompressed .npz (fast to load, DVC dedupes by content)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez(fh, x=data.x, y=data.y)


def load_images(path: Path) -> ArraySet:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: run the stage that makes it first")
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise DatasetError(f"{path} lacks arrays {sorted(missing)}")
        return ArraySet(x=npz["x"], y=npz["y"])


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
