"""Sharded splits: a split as a few large WebDataset tar files, read a shard at a time.

A split that does not fit in memory is written once, in one pass over its examples, as tar
shards in the WebDataset layout, with an ``index.json`` that holds the count of every shard.
Each member pair ``<key>.x.npy`` / ``<key>.y.npy`` holds a group of examples as one array
(``(k, *x_shape)``): a tar member a example would cost two 512-byte headers and two .npy
files padded to 512 bytes, 2,048 bytes for a table row of a few numbers, which turned a
408 MB Parquet table into 20 GB of shards. ``webdataset.WebDataset(urls).decode()`` reads
them as grouped samples, and its ``.unbatched()`` gives the examples (tested). The tar files
are written and read with the standard library: importing ``webdataset`` imports torch (6 s),
which the ingest stage has no other need of. Knowing the counts lets every reader plan an
epoch without reading the data:

- **Shuffled writing.** With ``shuffle_seed`` set, the writer sends the example at position
  ``p`` to the shard ``perm[p] // per_shard`` of a seeded permutation: every shard is a uniform
  random sample of the split, even when the source arrives class by class (an image folder).
  Every shard but the last holds exactly ``per_shard`` examples.
- **Epoch plan.** An epoch is the shards in a seeded order, each shard's examples in a seeded
  order; the plan is a function of (seed, epoch) alone, the same in every process.
- **Ranks.** Of an epoch of ``N`` examples, rank ``r`` of ``W`` reads the contiguous block
  ``[r * N // W, (r + 1) * N // W)`` truncated to ``N // W`` examples: disjoint blocks, equal
  counts (the at most ``W - 1`` examples left over are the next epoch's to draw, in another
  order), and each rank opens only the shards its block covers.
- **Resume.** :class:`ShardLoader` is stateful in Lightning's sense (``state_dict`` /
  ``load_state_dict``, saved in every checkpoint): its state is the epoch and the examples of it
  already trained, and a resumed loader starts at exactly the next one.

Memory is one shard (``shard_bytes``, 64 MiB by default) plus one batch, whatever the split's
size; writing, one group buffered per shard, at most ``shard_bytes`` in all. WebDataset's
layout (not LitData's or MosaicML Streaming's): LitData requires torchvision,
whose PyPI build does not load beside the CPU build of torch we pin; Streaming brings 46
packages (cloud SDKs, transformers); WebDataset one, and its plain tar files are read by any
tool.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_FILE = "index.json"
TARGETS_FILE = "targets.npy"  # every example's y, in reading order (shard by shard)
FORMAT = "webdataset-npy/2"  # /1 held one example a member
SHARD_BYTES = 64 * 1024 * 1024


class ShardError(ValueError):
    """A sharded split that cannot be written or read as asked; the message says why."""


# ---------------------------------------------------------------- the index


@dataclass(frozen=True)
class Shard:
    file: str
    examples: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    """What ``index.json`` holds: the shards in order, their counts, the examples' layout."""

    shards: tuple[Shard, ...]
    x_dtype: str
    x_shape: tuple[int, ...]
    y_dtype: str
    y_shape: tuple[int, ...]

    @property
    def examples(self) -> int:
        return sum(s.examples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "examples": self.examples,
            "x": {"dtype": self.x_dtype, "shape": list(self.x_shape)},
            "y": {"dtype": self.y_dtype, "shape": list(self.y_shape)},
            "shards": [{"file": s.file, "examples": s.examples, "sha256": s.sha256}
                       for s in self.shards],
        }  # fmt: skip

    @classmethod
    def read(cls, directory: Path) -> ShardIndex:
        path = Path(directory) / INDEX_FILE
        if not path.is_file():
            raise ShardError(f"{path}: not found (is {directory} a sharded split?)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ShardError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
            shards = tuple(Shard(s["file"], int(s["examples"]), s["sha256"]) for s in raw["shards"])
            index = cls(
                shards,
                raw["x"]["dtype"],
                tuple(raw["x"]["shape"]),
                raw["y"]["dtype"],
                tuple(raw["y"]["shape"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ShardError):
                raise
            raise ShardError(f"{path}: unreadable index ({exc})") from exc
        if index.examples != raw.get("examples"):
            raise ShardError(f"{path}: shard counts add up to {index.examples}, not "
                             f"{raw.get('examples')}")  # fmt: skip
        return index


# ---------------------------------------------------------------- writing


def _member(name: str, array: np.ndarray) -> tuple[bytes, memoryview, bytes]:
    """One tar member ``name`` holding the C-ordered ``array`` as .npy: its tar and .npy
    headers, the array's own bytes (not copied) and the padding to a block."""
    npy_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy_header, np.lib.format.header_data_from_array_1_0(array)
    )
    size = npy_header.tell() + array.nbytes
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    data = memoryview(array.reshape(-1).view(np.uint8))
    return header + npy_header.getvalue(), data, bytes(-size % tarfile.BLOCKSIZE)


def write_shards(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    directory: Path,
    n_examples: int,
    *,
    shuffle_seed: int | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> ShardIndex:
    """Write ``n_examples`` examples as shards in ``directory``; return the index.

    ``chunks`` is read once: (xs, ys) arrays of one or more examples each (an image folder
    gives one image a chunk, a table a batch of rows). Every x must have the first one's dtype
    and shape (and every y the first y's): a different one is refused naming its position. The
    shards are written to a temporary folder beside ``directory`` and moved in place only when
    all are complete, so a failed write leaves an earlier split untouched.
    """
    if n_examples < 1:
        raise ShardError(f"cannot shard {n_examples} examples (need at least 1)")
    directory = Path(directory)
    scratch = directory.with_name(f".{directory.name}.writing-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with ExitStack() as open_shards:
            writer = _Writer(scratch, n_examples, shuffle_seed, shard_bytes, open_shards)
            for xs, ys in chunks:
                writer.add(np.asarray(xs), np.asarray(ys))
            writer.finish()
        np.save(scratch / TARGETS_FILE, writer.targets, allow_pickle=False)
        shards = tuple(writer.files[i].shard() for i in sorted(writer.files))
        x_dtype, x_shape, y_dtype, y_shape = writer.layout
        index = ShardIndex(shards, str(x_dtype), x_shape, str(y_dtype), y_shape)
        (scratch / INDEX_FILE).write_text(json.dumps(index.to_json(), indent=1) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(scratch, directory)
            shutil.rmtree(old)
        else:
            os.replace(scratch, directory)
        return index
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Writer:
    """Every example into its shard, and every y into ``targets`` in reading order (shard 0's
    first, each shard's as they arrived): the targets a reader needs whole (metrics, class
    counts) without reading the shards.

    A shard is a sequence of members of ``group`` examples each, ``<key>.x.npy`` holding their
    xs as one array ``(group, *x_shape)`` and ``<key>.y.npy`` their ys (the key: the reading
    position of the group's first example). Per example the tar layout would cost two 512-byte
    headers and two .npy files padded to 512 bytes: 2,048 bytes for a row of a few numbers,
    2,560 for a 28x28 image of 784. A group is made as large as the memory allows: each open
    shard buffers one, and all the buffers together hold at most ``shard_bytes``.
    """

    def __init__(self, scratch, n_examples, shuffle_seed, shard_bytes, open_shards) -> None:
        self.scratch, self.open_shards = scratch, open_shards
        self.n, self.seed, self.shard_bytes = n_examples, shuffle_seed, shard_bytes
        self.files: dict[int, _ShardFile] = {}
        self.layout = None
        self.position = 0

    def _start(self, xs: np.ndarray, ys: np.ndarray) -> None:
        self.layout = (xs.dtype, xs.shape[1:], ys.dtype, ys.shape[1:])
        example = xs[0].nbytes + ys[0].nbytes
        # The shard's file, which a reader holds whole, is what must fit in shard_bytes.
        self.per_shard = max(1, min(self.n, self.shard_bytes // max(1, example)))
        n_shards = -(-self.n // self.per_shard)
        self.group = max(1, min(self.per_shard, self.shard_bytes // (n_shards * max(1, example))))
        rng = np.random.default_rng(self.seed)
        self.perm = rng.permutation(self.n) if self.seed is not None else None
        self.targets = np.empty((self.n, *ys.shape[1:]), ys.dtype)

    def add(self, xs: np.ndarray, ys: np.ndarray) -> None:
        if xs.ndim == 0 or ys.ndim == 0 or len(xs) != len(ys):
            raise ShardError(
                f"examples {self.position}..: a chunk must be (xs, ys) arrays of equal length, "
                f"got shapes {list(xs.shape)} and {list(ys.shape)}"
            )
        if len(xs) == 0:
            return
        if self.layout is None:
            self._start(xs, ys)
        if (xs.dtype, xs.shape[1:], ys.dtype, ys.shape[1:]) != self.layout:
            x_dtype, x_shape, y_dtype, y_shape = self.layout
            raise ShardError(
                f"example {self.position}: x {xs.dtype}{list(xs.shape[1:])}, y {ys.dtype}"
                f"{list(ys.shape[1:])}; the first was x {x_dtype}{list(x_shape)}, y {y_dtype}"
                f"{list(y_shape)}"
            )
        end = self.position + len(xs)
        if end > self.n:
            raise ShardError(f"the source gave more than the {self.n} examples expected")
        slots = (
            self.perm[self.position : end]
            if self.perm is not None
            else np.arange(self.position, end)
        )
        self.position = end
        shard_of = slots // self.per_shard
        if len(xs) == 1:
            self._to_shard(int(shard_of[0]), xs, ys)
            return
        order = np.argsort(shard_of, kind="stable")  # each shard's examples in arrival order
        sorted_shards = shard_of[order]
        starts = np.flatnonzero(np.r_[True, sorted_shards[1:] != sorted_shards[:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], len(order)], strict=True):
            rows = order[lo:hi]
            self._to_shard(int(sorted_shards[lo]), xs[rows], ys[rows])

    def _to_shard(self, shard: int, xs: np.ndarray, ys: np.ndarray) -> None:
        if shard not in self.files:
            quota = min(self.per_shard, self.n - shard * self.per_shard)
            path = self.scratch / f"shard-{shard:06d}.tar"
            self.files[shard] = _ShardFile(path, self.open_shards, shard * self.per_shard, quota,
                                           min(self.group, quota), self.layout)  # fmt: skip
        file = self.files[shard]
        self.targets[file.first + file.examples : file.first + file.examples + len(ys)] = ys
        file.add(xs, ys)

    def finish(self) -> None:
        if self.position != self.n:
            raise ShardError(f"expected {self.n} examples, the source gave {self.position}")
        for file in self.files.values():
            file.close()


class _ShardFile:
    """One shard being written: its file, its buffered group, its count and its sha256."""

    def __init__(self, path: Path, open_shards: ExitStack, first: int, quota: int, group: int,
                 layout) -> None:  # fmt: skip
        self.name = path.name
        # ExitStack is the context manager: one file open per shard, all closed at once
        self.file = open_shards.enter_context(open(path, "wb"))  # noqa: SIM115
        self.digest = hashlib.sha256()
        self.first, self.quota = first, quota  # reading position of its first example, count
        x_dtype, x_shape, y_dtype, y_shape = layout
        self.xs = np.empty((group, *x_shape), x_dtype)
        self.ys = np.empty((group, *y_shape), y_dtype)
        self.buffered = 0
        self.examples = 0  # added, buffered ones included

    def add(self, xs: np.ndarray, ys: np.ndarray) -> None:
        if self.examples + len(xs) > self.quota:  # only a broken permutation could do this
            raise AssertionError(f"{self.name}: more than its {self.quota} examples")
        at = 0
        while at < len(xs):
            take = min(len(self.xs) - self.buffered, len(xs) - at)
            self.xs[self.buffered : self.buffered + take] = xs[at : at + take]
            self.ys[self.buffered : self.buffered + take] = ys[at : at + take]
            self.buffered += take
            self.examples += take
            at += take
            if self.buffered == len(self.xs):
                self._flush()
        if self.examples == self.quota:  # complete: its buffer is not needed any more
            self._flush()
            self.xs = self.ys = None

    def _flush(self) -> None:
        if self.buffered:
            n = self.buffered
            key = f"{self.first + self.examples - n:010d}"
            for part in (
                *_member(f"{key}.x.npy", self.xs[:n]),
                *_member(f"{key}.y.npy", self.ys[:n]),
            ):
                self._write(part)
            self.buffered = 0

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)

    def close(self) -> None:
        if self.xs is not None:
            self._flush()
        self._write(bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker

    def shard(self) -> Shard:
        return Shard(self.name, self.examples, self.digest.hexdigest())


# ---------------------------------------------------------------- reading


def read_shard(path: Path, index: ShardIndex, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """One whole shard as (x, y) arrays, in the order written; checked against the index.

    The file is walked member by member, each member's array read straight into its place in
    the two arrays (``readinto``): memory holds the shard's examples once, not its bytes and
    then the arrays made of them. A member may hold one example (``x_shape``) or a group of
    them (``(k, *x_shape)``), so a shard another WebDataset writer made one example at a time
    reads too.
    """
    x = np.empty((expected, *index.x_shape), index.x_dtype)
    y = np.empty((expected, *index.y_shape), index.y_dtype)
    n_x = n_y = 0  # examples read into x and y
    key = None  # of the x.npy member whose y.npy comes next
    try:
        with open(path, "rb") as file:
            while True:
                header = file.read(tarfile.BLOCKSIZE)
                if len(header) < tarfile.BLOCKSIZE or not any(header):
                    break  # the end-of-archive marker (or the file's end)
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
                name, _, ext = info.name.partition(".")
                if ext not in ("x.npy", "y.npy") or not info.isfile():
                    raise ShardError(f"{path}: unexpected member {info.name!r}")
                if ext == "x.npy":
                    if key is not None:
                        raise ShardError(f"{path}: {key}.x.npy has no y.npy after it")
                    key, got = name, _read_npy(file, info, x, n_x, f"{path}: {info.name}")
                    n_x += got
                else:
                    if name != key:
                        raise ShardError(f"{path}: {info.name} does not match the x.npy before it")
                    got = _read_npy(file, info, y, n_y, f"{path}: {info.name}")
                    n_y += got
                    if n_y != n_x:
                        raise ShardError(f"{path}: {info.name} holds {got} examples, its x.npy "
                                         f"{n_x - n_y + got}")  # fmt: skip
                    key = None
    except tarfile.TarError as exc:
        raise ShardError(f"{path}: unreadable shard ({exc})") from exc
    except OSError as exc:
        raise ShardError(f"{path}: unreadable ({exc})") from exc
    if key is not None:
        raise ShardError(f"{path}: {key}.x.npy has no y.npy after it")
    if n_y != expected:
        raise ShardError(f"{path}: {n_y} examples, the index says {expected}")
    return x, y


def _read_npy(file, info: tarfile.TarInfo, out: np.ndarray, at: int, where: str) -> int:
    """The member ``info`` (an .npy file, ``file`` at its first byte) read into ``out[at:]``;
    ``file`` left at the next member's header. Returns the number of examples it held."""
    start = file.tell()
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            stored, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            stored, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f".npy version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
    except ValueError as exc:
        raise ShardError(f"{where}: not a .npy file we read ({exc})") from None
    shape = out.shape[1:]
    one = tuple(stored) == shape
    if dtype != out.dtype or fortran or not (one or tuple(stored[1:]) == shape):
        order = " (Fortran order)" if fortran else ""
        raise ShardError(f"{where}: {dtype}{list(stored)}{order}, expected {out.dtype}"
                         f"{list(shape)} or a group of them")  # fmt: skip
    count = 1 if one else int(stored[0])
    nbytes = count * (out[0].nbytes if len(out) else 0)
    if file.tell() - start + nbytes != info.size:
        raise ShardError(f"{where}: {info.size} bytes do not hold a {dtype}{list(stored)} array")
    if at + count > len(out):
        raise ShardError(f"{where}: more examples than the index's {len(out)}")
    if file.readinto(memoryview(out[at : at + count].reshape(-1).view(np.uint8))) != nbytes:
        raise ShardError(f"{where}: member {info.name!r} is cut short")
    file.seek(start + info.size + -info.size % tarfile.BLOCKSIZE)
    return count


def iter_in_order(directory: Path, index: ShardIndex) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every example once, as (x, y) chunks of one shard each, in reading order (the order of
    :data:`TARGETS_FILE`): shard 0 first, each shard's examples as they were written."""
    for shard in index.shards:
        yield read_shard(Path(directory) / shard.file, index, shard.examples)


def read_targets(directory: Path, index: ShardIndex) -> np.ndarray:
    """Every example's y in reading order: ``targets.npy``, or one pass over the shards when
    another tool wrote them without it."""
    path = Path(directory) / TARGETS_FILE
    if not path.is_file():
        ys = [y for _, y in iter_in_order(directory, index)]
        return np.concatenate(ys) if ys else np.empty((0, *index.y_shape), index.y_dtype)
    try:
        targets = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable ({exc})") from exc
    if len(targets) != index.examples or targets.dtype != np.dtype(index.y_dtype):
        raise ShardError(f"{path}: {len(targets)} {targets.dtype} targets, the index says "
                         f"{index.examples} {index.y_dtype}")  # fmt: skip
    return targets


@dataclass(frozen=True)
class EpochPlan:
    """Which shards, in which order, and which examples of each, a rank reads in an epoch."""

    order: tuple[int, ...]  # shard numbers, in the order read
    start: int  # this rank's first position in the epoch's sequence
    stop: int  # one past its last


def epoch_plan(
    index: ShardIndex, epoch: int, seed: int, shuffle: bool, rank: int, world: int
) -> EpochPlan:
    if not 0 <= rank < world:
        raise ShardError(f"rank {rank} is not in 0..{world - 1}")
    n = index.examples
    if n < world:
        raise ShardError(f"{n} examples cannot be shared by {world} processes")
    order = list(range(len(index.shards)))
    if shuffle:
        np.random.default_rng((seed, epoch)).shuffle(order)
    share = n // world
    return EpochPlan(tuple(order), rank * share, rank * share + share)


def _within_shard_order(count: int, seed: int, epoch: int, shard: int, shuffle: bool):
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng((seed, epoch, shard)).permutation(count)


def iter_examples(
    directory: Path,
    index: ShardIndex,
    plan: EpochPlan,
    seed: int,
    epoch: int,
    shuffle: bool,
    skip: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This rank's examples of the epoch, as (x, y) chunks of one shard each, after ``skip``."""
    first = plan.start + skip
    position = 0  # of the current shard's first example in the epoch's sequence
    for shard in plan.order:
        count = index.shards[shard].examples
        lo, hi = max(first, position), min(plan.stop, position + count)
        if lo < hi:
            x, y = read_shard(directory / index.shards[shard].file, index, count)
            pick = _within_shard_order(count, seed, epoch, shard, shuffle)[
                lo - position : hi - position
            ]
            yield x[pick], y[pick]
        position += count
        if position >= plan.stop:
            return


class ShardLoader:
    """Batches of a sharded split for one process: an iterable Lightning can checkpoint.

    ``rank``/``world`` default to torch.distributed's when it is initialised (DDP), else 0/1.
    Each ``iter()`` is the next epoch (or, after :meth:`load_state_dict`, the rest of the saved
    one). :meth:`state_dict` counts the examples of the epoch handed out: what training has
    consumed, since Lightning fetches ahead only from loaders that have no length.
    """

    def __init__(
        self,
        directory: Path,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int | None = None,
        world: int | None = None,
        drop_last: bool = False,
        y_dtype: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ShardError(f"batch_size must be at least 1, got {batch_size}")
        self.directory = Path(directory)
        self.index = ShardIndex.read(self.directory)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self._rank, self._world = rank, world
        self.drop_last = drop_last
        self.y_dtype = y_dtype  # the targets as training wants them (float32 for regression)
        self.epoch = 0  # the epoch the next iter() reads
        self._current_epoch = 0
        self._resume_skip = 0
        self._handed = 0  # examples of the current epoch handed out (resumed ones included)

    def _ranks(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world or 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def examples_per_rank(self) -> int:
        return self.index.examples // self._ranks()[1]

    def __len__(self) -> int:
        n = self.examples_per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        rank, world = self._ranks()
        limit = len(self) * self.batch_size if self.drop_last else self.examples_per_rank()
        epoch, skip = self.epoch, self._resume_skip
        if skip >= limit:  # saved at the end of its epoch: resume with the next one
            epoch, skip = epoch + 1, 0
        self._resume_skip = 0
        self.epoch = epoch + 1
        plan = epoch_plan(self.index, epoch, self.seed, self.shuffle, rank, world)
        self._current_epoch, self._handed = epoch, skip
        b, handed = self.batch_size, skip
        carry_x = carry_y = None  # a shard's last examples short of a batch, for the next one
        chunks = iter_examples(self.directory, self.index, plan, self.seed, epoch, self.shuffle,
                               skip)  # fmt: skip
        for x, y in chunks:
            if carry_x is not None:  # copies one batch's worth, once per shard
                x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
            full = min(len(x) // b * b, (limit - handed) // b * b)
            for i in range(0, full, b):
                handed += b
                self._handed = handed
                yield self._batch(x[i : i + b], y[i : i + b])
            carry_x, carry_y = x[full:], y[full:]
        rest = min(len(carry_y) if carry_y is not None else 0, limit - handed)
        if rest > 0 and not self.drop_last:
            self._handed = handed + rest
            yield self._batch(carry_x[:rest], carry_y[:rest])

    def _batch(self, x: np.ndarray, y: np.ndarray):
        import torch

        if self.y_dtype is not None:
            y = y.astype(self.y_dtype, copy=False)
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its examples this process has trained on (or been given)."""
        return {"epoch": self._current_epoch, "consumed": self._handed,
                "examples": self.index.examples}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("examples") != self.index.examples:
            raise ShardError(f"the checkpoint is of a split of {state.get('examples')} examples; "
                             f"{self.directory} has {self.index.examples}")  # fmt: skip
        self.epoch = int(state["epoch"])
        self._resume_skip = int(state["consumed"])
