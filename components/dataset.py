"""The on-disk format that stages share: image arrays plus labels, and the data set's metadata.

Images are ``uint8`` arrays shaped ``(N, C, H, W)`` holding raw pixel values 0-255; labels are
``int64`` class indices into ``class_names``. Scaling to 0-1 happens inside the model, so the
exported ONNX model and the served bento take raw pixel values too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A data file is missing or does not hold what the pipeline expects."""


@dataclass(frozen=True)
class ImageSet:
    x: np.ndarray  # (N, C, H, W) uint8
    y: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise DatasetError(f"images must be (N, C, H, W), got shape {self.x.shape}")
        if len(self.x) != len(self.y):
            raise DatasetError(f"{len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DatasetMeta:
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W)
    source: str
    split_sizes: dict[str, int]

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
            image_shape=tuple(raw["image_shape"]),
            source=raw["source"],
            split_sizes=dict(raw["split_sizes"]),
        )


def save_images(images: ImageSet, path: Path) -> None:
    """Write an image set as an uncompressed .npz (fast to load, DVC dedupes by content)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez(fh, x=images.x, y=images.y)


def load_images(path: Path) -> ImageSet:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: run the stage that makes it first")
    with np.load(path, allow_pickle=False) as npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise DatasetError(f"{path} lacks arrays {sorted(missing)}")
        return ImageSet(x=npz["x"], y=npz["y"])


def split_path(prepared_dir: Path, split: str) -> Path:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(prepared_dir) / f"{split}.npz"


def meta_path(prepared_dir: Path) -> Path:
    return Path(prepared_dir) / "meta.json"
