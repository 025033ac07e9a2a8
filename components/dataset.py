"""The on-disk format that stages share: input arrays plus targets, and the data set's metadata.

Every kind of data (``DatasetMeta.kind``; components/kinds/ says what each one is) has one
layout: ``x`` is ``(N, *input_shape)`` and ``y`` is ``(N,)``. Images are ``uint8`` pixels
``(N, C, H, W)``; tables ``float32`` encoded features ``(N, F)``; sequences ``float32``
``(N, T, F)``. Targets are ``int64`` class indices into ``class_names`` for classification and
``float32`` values in the target's own units for regression (``class_names`` is then empty).

Each file has its read and write here: the splits, the rows of a table or series as read
(``prepared/<split>.parquet``), the raw snapshot and ``meta.json``.

A split is stored one of two ways (``ingest.storage``; docs/training.md says what each costs):

- **in memory**: ``prepared/<split>.npz``, loaded whole as an :class:`ArraySet`;
- **sharded**: ``prepared/<split>/``, WebDataset tar shards (components/shards.py) opened as a
  :class:`ShardedSet`, whose targets are in memory and whose inputs are read a shard at a time.
  A time series' split is the exception: ``prepared/<split>/`` holds its rows and targets as
  ``.npy`` files and its window in ``series.json``, read back memory-mapped as
  :class:`SeriesWindows` (its windows as shards would store every row once per window it
  falls in).

Stages read either through the same few calls: ``len``, ``y``, ``x.dtype`` and ``x.shape``,
:meth:`~ArraySet.map_x` (a function of a batch of inputs, over every example in order),
:meth:`~ArraySet.chunks`, :meth:`~ArraySet.sample` and :meth:`~ArraySet.head` (a few examples in
memory). Only an :class:`ArraySet`'s ``x`` is an array; a sharded split's ``x`` says so when
used as one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from components import shards

SPLITS = ("train", "val", "test")
TASKS = ("classification", "regression")


class DatasetError(ValueError):
    """A data file is missing or does not hold what the pipeline expects."""


def sample_positions(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of the positions ``0..n-1``, a seeded choice in order: the one sample of a split,
    of its summaries and of its rows as read, so that a sample drawn from a file read in
    batches is the one drawn from the whole."""
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


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

    @property
    def nbytes(self) -> int:
        """What the split takes in memory (and, stored, on disk)."""
        return self.x.nbytes + self.y.nbytes

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every example once, in order, as (x, y) chunks: here the whole split."""
        yield self.x, self.y

    def map_x(self, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``fn`` of the inputs, in order: here one call on them all."""
        return np.asarray(fn(self.x))

    def sample(self, n: int, seed: int) -> ArraySet:
        """At most ``n`` examples, a seeded choice kept in order; all of them when fewer."""
        if len(self) <= n:
            return self
        keep = sample_positions(len(self), n, seed)
        return ArraySet(self.x[keep], self.y[keep])

    def head(self, n: int) -> ArraySet:
        """The first ``n`` examples (all when fewer)."""
        return self if len(self) <= n else ArraySet(self.x[:n], self.y[:n])


WINDOWS_PER_CHUNK = 4096  # windows of a series copied out at a time (map_x, chunks)


class SeriesWindows(ArraySet):
    """A time series' split: every run of ``window`` consecutive rows, (N, T, F), each labelled
    with the target ``horizon`` rows after its last. ``x`` is a read-only view of the rows,
    which neighbouring windows share: the split holds, and stores, the series once rather than
    T times (a 10M-step series of 4 features is 160 MB; its 32-step windows were 5 GB).
    :meth:`map_x`, :meth:`chunks` and :meth:`head` hand out windows copied a chunk at a time;
    training reads them from the rows (components/lightning_module.py)."""

    def __init__(self, rows: np.ndarray, targets: np.ndarray, window: int, horizon: int):
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        targets = np.ascontiguousarray(targets, dtype=np.float32)
        if rows.ndim != 2 or targets.shape != (len(rows),):
            raise DatasetError(
                f"a series is (rows, features) with one target per row, got rows "
                f"{rows.shape} and targets {targets.shape}"
            )
        if window < 1 or horizon < 0 or len(rows) < window + horizon:
            raise DatasetError(
                f"{len(rows)} rows hold no window of {window} steps with a target {horizon} "
                "step(s) after it"
            )
        n = len(rows) - window - horizon + 1
        view = np.lib.stride_tricks.sliding_window_view(rows, window, axis=0)[:n]
        for name, value in (("x", np.transpose(view, (0, 2, 1))),  # (n, T, F)
                            ("y", targets[window + horizon - 1 :][:n]), ("rows", rows),
                            ("targets", targets), ("window", int(window)),
                            ("horizon", int(horizon))):  # fmt: skip
            object.__setattr__(self, name, value)
        self.__post_init__()

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.targets.nbytes

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(self), WINDOWS_PER_CHUNK):
            part = slice(i, i + WINDOWS_PER_CHUNK)
            yield np.ascontiguousarray(self.x[part]), self.y[part]

    def map_x(self, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(fn(x)) for x, _ in self.chunks()])  # never empty

    def head(self, n: int) -> ArraySet:
        return ArraySet(np.ascontiguousarray(self.x[:n]), self.y[:n].copy())

    def sample(self, n: int, seed: int) -> ArraySet:
        if len(self) <= n:  # asked for in memory: copies, as a writable array
            return self.head(n)
        return super().sample(n, seed)  # the choice of windows is copied out


class ShardedInputs:
    """What a sharded split's ``x`` answers without reading it: dtype, shape, ndim. Used as an
    array, it says what to call instead."""

    def __init__(self, index: shards.ShardIndex, directory: Path) -> None:
        self.dtype = np.dtype(index.x_dtype)
        self.shape = (index.examples, *index.x_shape)
        self.ndim = len(self.shape)
        self._where = directory

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, *args, **kwargs):
        raise DatasetError(
            f"{self._where} is a sharded split, read a shard at a time: use map_x, chunks, "
            "sample or head, not the whole x in memory"
        )

    def __getitem__(self, item):
        self.__array__()


@dataclass(frozen=True)
class ShardedSet:
    """A split on disk as shards (components/shards.py): targets in memory, inputs streamed."""

    directory: Path
    index: shards.ShardIndex
    y: np.ndarray  # every target, in reading order

    @classmethod
    def open(cls, directory: Path) -> ShardedSet:
        directory = Path(directory)
        try:
            index = shards.ShardIndex.read(directory)
            return cls(directory, index, shards.read_targets(directory, index))
        except shards.ShardError as exc:
            raise DatasetError(str(exc)) from None

    @property
    def x(self) -> ShardedInputs:
        return ShardedInputs(self.index, self.directory)

    def __len__(self) -> int:
        return self.index.examples

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every example once, in reading order, one shard a chunk."""
        return shards.iter_in_order(self.directory, self.index)

    def map_x(self, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``fn`` of each shard's inputs, concatenated: the outputs of every example in order,
        with one shard in memory at a time."""
        outputs = [np.asarray(fn(x)) for x, _ in self.chunks()]
        return np.concatenate(outputs)

    def sample(self, n: int, seed: int) -> ArraySet:
        """At most ``n`` examples in memory, a seeded sample. Every shard is a uniform random
        sample of the split (the writer scatters examples by a seeded permutation), so whole
        shards in a seeded order are one too; the last shard needed gives a seeded choice of
        its examples (a shard keeps the order they arrived in: class by class for a folder).
        Only those shards are read."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.index.shards))
        return self._take([int(i) for i in order], n, rng)

    def head(self, n: int) -> ArraySet:
        """The first ``n`` examples in reading order."""
        return self._take(range(len(self.index.shards)), n)

    def _take(self, order, n: int, rng: np.random.Generator | None = None) -> ArraySet:
        """``n`` examples of the shards in ``order``, only those shards read: the first ones
        of the last shard needed, or with ``rng`` a seeded choice of them."""
        xs, ys, have = [], [], 0
        for i in order:
            if have >= n:
                break
            shard = self.index.shards[i]
            x, y = shards.read_shard(self.directory / shard.file, self.index, shard.examples)
            need = n - have
            if need < len(y):
                pick = np.sort(rng.choice(len(y), need, replace=False)) if rng else slice(need)
                x, y = x[pick], y[pick]
            xs.append(x)
            ys.append(y)
            have += len(y)
        return ArraySet(np.concatenate(xs), np.concatenate(ys))


Split = ArraySet | ShardedSet
STORAGES = ("memory", "shards")


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
        if isinstance(data, SeriesWindows):  # the rows, not every window's copy of them
            np.savez(fh, rows=data.rows, targets=data.targets, window=data.window,
                     horizon=data.horizon)  # fmt: skip
        else:
            np.savez(fh, x=data.x, y=data.y)


def load_arrays(path: Path) -> ArraySet:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: run the stage that makes it first")
    with np.load(path, allow_pickle=False) as npz:
        if "rows" in npz.files:  # a series' windows (SeriesWindows)
            missing = {"rows", "targets", "window", "horizon"} - set(npz.files)
            if missing:
                raise DatasetError(f"{path} lacks arrays {sorted(missing)}")
            return SeriesWindows(npz["rows"], npz["targets"], int(npz["window"]),
                                 int(npz["horizon"]))  # fmt: skip
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise DatasetError(f"{path} lacks arrays {sorted(missing)}")
        return ArraySet(x=npz["x"], y=npz["y"])


# A series split stored out of memory (``storage: shards``): its rows and targets as .npy files
# beside this description, read back memory-mapped.
SERIES_FILE = "series.json"
SERIES_FORMAT = "series-rows-npy/1"
SERIES_ARRAYS = ("rows.npy", "targets.npy")


def save_series_rows(data: SeriesWindows, directory: Path) -> None:
    """A series split as its rows, one target per row and its window (``storage: shards``),
    written beside ``directory`` and moved in place when complete. A stage that reads it back
    (:func:`load_series_rows`) holds only the pages of rows it touches."""
    rows = data.rows
    with SeriesRowsWriter(directory, len(rows), rows.shape[1], data.window, data.horizon) as out:
        out.write(rows, data.targets)


class SeriesRowsWriter:
    """A series split's rows and targets written batch by batch (:meth:`write`) into ``.npy``
    files, each header written for the split's known length and the batches appended after
    it, so that memory holds one batch, not the split (a memory map's dirty pages would count
    as this process's memory): the form :func:`load_series_rows` reads, byte for byte what
    ``np.save`` writes. Written into a scratch folder beside ``directory`` and moved in place
    only when every row came; on an error the folder that was there is kept."""

    def __init__(self, directory: Path, n_rows: int, n_features: int, window: int,
                 horizon: int) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.scratch = self.directory.with_name(f".{self.directory.name}.writing")
        self.described = {"format": SERIES_FORMAT, "window": int(window), "horizon": int(horizon),
                          "rows": int(n_rows), "features": int(n_features)}  # fmt: skip
        self.written = 0
        self.files: list = []

    def __enter__(self) -> SeriesRowsWriter:
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        n, width = self.described["rows"], self.described["features"]
        descr = np.lib.format.dtype_to_descr(np.dtype(np.float32))
        for name, shape in zip(SERIES_ARRAYS, ((n, width), (n,)), strict=True):
            fh = open(self.scratch / name, "wb")  # noqa: SIM115 (closed in __exit__)
            self.files.append(fh)
            header = {"descr": descr, "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(fh, header)
        return self

    def write(self, rows: np.ndarray, targets: np.ndarray) -> None:
        """The next ``len(rows)`` rows of the split ((k, features)) and their targets."""
        k, width, n = len(rows), self.described["features"], self.described["rows"]
        if rows.shape[1:] != (width,) or np.shape(targets) != (k,):
            raise DatasetError(
                f"{self.directory}: a batch of rows {rows.shape} and targets "
                f"{np.shape(targets)}, where the split has {width} features"
            )
        if self.written + k > n:
            raise DatasetError(
                f"{self.directory}: more than the {n} rows planned for this split (did the "
                "source change while it was read?)"
            )
        for fh, array in zip(self.files, (rows, targets), strict=True):
            fh.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        self.written += k

    def __exit__(self, kind, value, tb) -> None:
        import shutil

        from components.stage import write_text

        try:
            for fh in self.files:
                fh.close()
            if kind is not None:
                return
            if self.written != self.described["rows"]:
                raise DatasetError(
                    f"{self.directory}: {self.written} rows came of the "
                    f"{self.described['rows']} planned for this split (did the source change "
                    "while it was read?)"
                )
            text = json.dumps(self.described, indent=2) + "\n"
            write_text(self.scratch / SERIES_FILE, text)
            shutil.rmtree(self.directory, ignore_errors=True)
            self.scratch.rename(self.directory)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)


def load_series_rows(directory: Path) -> SeriesWindows:
    """What :func:`save_series_rows` wrote, its rows and targets memory-mapped copy-on-write:
    pages are read from the file as they are touched, and the arrays are writable as torch
    wants them to be (``torch.from_numpy`` warns on a read-only array), while nothing is ever
    written back to the file."""
    directory = Path(directory)
    try:
        described = json.loads((directory / SERIES_FILE).read_text())
        if not isinstance(described, dict) or described.get("format") != SERIES_FORMAT:
            found = described.get("format") if isinstance(described, dict) else described
            raise ValueError(f"format {found!r}, this code reads {SERIES_FORMAT}")
        rows, targets = (
            np.load(directory / name, mmap_mode="c", allow_pickle=False) for name in SERIES_ARRAYS
        )
        window, horizon = int(described["window"]), int(described["horizon"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{directory}: not a stored series split ({exc}): re-run ingest"
        ) from None
    shape = (described.get("rows"), described.get("features"))
    if rows.dtype != np.float32 or rows.shape != shape or targets.shape != shape[:1]:
        raise DatasetError(
            f"{directory}: {rows.dtype} rows {rows.shape} and targets {targets.shape}, where "
            f"{SERIES_FILE} says {shape[0]} float32 rows of {shape[1]} features: re-run ingest"
        )
    return SeriesWindows(rows, targets, window, horizon)


def stored_out_of_memory(prepared_dir: Path, split: str) -> bool:
    """Whether ingest stored ``split`` for reading in parts (``storage: shards``): as shards,
    or a series' rows memory-mapped. Such a split is never read whole."""
    sharded = sharded_path(prepared_dir, split)
    return (sharded / shards.INDEX_FILE).is_file() or (sharded / SERIES_FILE).is_file()


def load_split(prepared_dir: Path, split: str) -> Split:
    """A prepared split as ingest stored it: ``<split>.npz`` in memory, ``<split>/`` sharded
    (a series: its rows, memory-mapped)."""
    path = split_path(prepared_dir, split)
    sharded = sharded_path(prepared_dir, split)
    if (sharded / shards.INDEX_FILE).is_file():
        return ShardedSet.open(sharded)
    if (sharded / SERIES_FILE).is_file():
        return load_series_rows(sharded)
    return load_arrays(path)


def save_split(data: ArraySet, prepared_dir: Path, split: str, storage: str, seed: int) -> None:
    """Store a split in memory (``.npz``) or as shards, removing the other form's leftover.
    A series' split "as shards" is its rows, read back memory-mapped: the same windows, each row
    stored once (as windows, every row would be stored ``window`` times)."""
    if storage not in STORAGES:
        raise DatasetError(f"unknown storage {storage!r}; expected one of {STORAGES}")
    if storage == "shards" and isinstance(data, SeriesWindows):
        save_series_rows(data, sharded_path(prepared_dir, split))
        clear_other_storage(prepared_dir, split, "shards")
    elif storage == "shards":
        write_sharded(data.chunks(), len(data), prepared_dir, split, seed)
    else:
        save_arrays(data, split_path(prepared_dir, split))
        clear_other_storage(prepared_dir, split, "memory")


def stored_as(storage: str, series: bool) -> str:
    """How ingest stored the splits (``series``: a time series' rows), in the words it logs."""
    if storage != "shards":
        return "in memory (.npz)"
    if series:
        return "as each split's rows, memory-mapped by the stages that read them (.npy)"
    return "as shards"


def write_sharded(chunks, n: int, prepared_dir: Path, split: str, seed: int) -> None:
    """Write ``n`` examples of a split as shards, read a chunk at a time from ``chunks``: (xs,
    ys) arrays of one example or more (:func:`components.shards.write_shards`)."""
    try:
        shards.write_shards(chunks, sharded_path(prepared_dir, split), n, shuffle_seed=seed)
    except shards.ShardError as exc:
        raise DatasetError(f"{split} split: {exc}") from None
    clear_other_storage(prepared_dir, split, "shards")


def clear_other_storage(prepared_dir: Path, split: str, kept: str) -> None:
    """An earlier run's split stored the other way would be read instead of this one."""
    import shutil

    if kept == "shards":
        split_path(prepared_dir, split).unlink(missing_ok=True)
    else:
        shutil.rmtree(sharded_path(prepared_dir, split), ignore_errors=True)


def split_digest(prepared_dir: Path, split: str) -> bytes:
    """SHA-256 of a stored split's files (for a sharded one, its index, which holds every
    shard's hash): what decides that two runs trained on the same data."""
    sharded = sharded_path(prepared_dir, split)
    if (sharded / shards.INDEX_FILE).is_file():
        return hashlib.sha256((sharded / shards.INDEX_FILE).read_bytes()).digest()
    if (sharded / SERIES_FILE).is_file():
        digest = hashlib.sha256()
        for name in (SERIES_FILE, *SERIES_ARRAYS):
            with (sharded / name).open("rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
        return digest.digest()
    return hashlib.sha256(split_path(prepared_dir, split).read_bytes()).digest()


FRAME_BATCH_ROWS = 65_536  # rows of a Parquet file read at a time for a sample (load_frame)


def save_frame(frame, path: Path) -> None:
    """Rows as read (a pandas frame) as Parquet, without the index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


class FrameWriter:
    """Rows as read, batch by batch (pandas frames of one schema), into one Parquet file,
    written beside it and moved in place when closed without an error."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.scratch = self.path.with_name(f".{self.path.name}.writing")
        self.writer = None

    def write(self, frame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.scratch, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.writer is not None:
            self.writer.close()
        if kind is None and self.writer is not None:
            self.scratch.replace(self.path)
        else:
            self.scratch.unlink(missing_ok=True)


def load_frame(path: Path, max_rows: int | None = None, seed: int = 0):
    """Rows as :func:`save_frame` wrote them. With ``max_rows``, a file of more rows gives a
    seeded sample of that many, kept in order, read a batch at a time so that memory holds the
    sample and one batch, not the file: the rows ``frame.iloc[keep]`` of the whole frame would
    give, ``keep`` from :func:`sample_positions`."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: run the stage that makes it first")
    if max_rows is None:
        return pd.read_parquet(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering: ~80 MB more Arrow memory
    n = file.metadata.num_rows
    if n <= max_rows:
        return pd.read_parquet(path)
    keep = sample_positions(n, max_rows, seed)
    taken, start = [], 0
    for batch in file.iter_batches(batch_size=FRAME_BATCH_ROWS):
        lo, hi = np.searchsorted(keep, (start, start + batch.num_rows))
        if hi > lo:
            taken.append(batch.take(pa.array(keep[lo:hi] - start)))
        start += batch.num_rows
    return pa.Table.from_batches(taken, schema=file.schema_arrow).to_pandas()


def frame_stats(path: Path) -> dict:
    """Every row of a file :func:`save_frame` wrote, in one pass a batch at a time: the number
    of rows, and per column the share missing (null or NaN) and, for numbers and times, the
    smallest and largest value present (None when every value is missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} not found: run the stage that makes it first")
    file = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering: ~80 MB more Arrow memory
    schema = file.schema_arrow
    ranged = {f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
              or pa.types.is_temporal(f.type)}  # fmt: skip
    missing = dict.fromkeys(schema.names, 0)
    bounds: dict[str, list] = {name: [] for name in ranged}  # each batch's (min, max)
    rows = 0
    for batch in file.iter_batches(batch_size=FRAME_BATCH_ROWS):
        rows += batch.num_rows
        for name, column in zip(schema.names, batch.columns, strict=True):
            missing[name] += column.null_count
            if pa.types.is_floating(column.type):
                missing[name] += pc.sum(pc.is_nan(column)).as_py() or 0
            if name in ranged:
                low, high = (v.as_py() for v in pc.min_max(column).values())
                if low is not None and low == low:  # None: all null; NaN: all NaN
                    bounds[name].append((low, high))
    columns = {name: {"missing": missing[name] / rows if rows else 0.0} for name in schema.names}
    for name, found in bounds.items():
        low, high = (min(b[0] for b in found), max(b[1] for b in found)) if found else (None, None)
        columns[name] |= {"min": _plain(low), "max": _plain(high)}
    return {"rows": rows, "columns": columns}


def _plain(value):
    """A value for JSON: a number or None as it is, a time as ISO text, a duration as text."""
    if value is None or isinstance(value, int | float):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def raw_path(raw_dir: Path, rows: bool) -> Path:
    """The raw snapshot: the rows of a table or series as Parquet, arrays as .npz."""
    return Path(raw_dir) / ("dataset.parquet" if rows else "dataset.npz")


def split_path(prepared_dir: Path, split: str) -> Path:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(prepared_dir) / f"{split}.npz"


def sharded_path(prepared_dir: Path, split: str) -> Path:
    """A split stored as shards: a folder of tar files and their index."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(prepared_dir) / split


def table_path(prepared_dir: Path, split: str) -> Path:
    """A table or time series split as it was read (before encoding): what validate checks."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(prepared_dir) / f"{split}.parquet"


def meta_path(prepared_dir: Path) -> Path:
    return Path(prepared_dir) / "meta.json"
