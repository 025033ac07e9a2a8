"""Sharded splits: a split as a few large WebDataset tar files, read a shard at a time.

A split that does not fit in memory is written once, in one pass over its examples, as tar
shards in the WebDataset layout (each example is ``<key>.x.npy`` and ``<key>.y.npy``, so
``webdataset.WebDataset(urls).decode()`` reads them too: tested), with an ``index.json`` that
holds the count of every shard. The tar files are written and read with the standard library:
importing ``webdataset`` imports torch (6 s), which the ingest stage has no other need of.
Knowing the counts lets every reader plan an epoch without reading the data:

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
size. WebDataset's layout (not LitData's or MosaicML Streaming's): LitData requires torchvision,
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
FORMAT = "webdataset-npy/1"
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


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # (np.ascontiguousarray would make a 0-d label 1-d)
    array = array if array.flags.c_contiguous else array.copy(order="C")
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_shards(
    examples: Iterable[tuple[np.ndarray, Any]],
    directory: Path,
    n_examples: int,
    *,
    shuffle_seed: int | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> ShardIndex:
    """Write ``n_examples`` (x, y) pairs as shards in ``directory``; return the index.

    ``examples`` is read once, one pair at a time. Every x must have the first one's dtype and
    shape (and every y the first y's): a different one is refused naming its position. The
    shards are written to a temporary folder beside ``directory`` and moved in place only when
    all are complete, so a failed write leaves an earlier split untouched.
    """
    if n_examples < 1:
        raise ShardError(f"cannot shard {n_examples} examples (need at least 1)")
    directory = Path(directory)
    scratch = directory.with_name(f".{directory.name}.writing-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    files: dict[int, _ShardFile] = {}
    try:
        with ExitStack() as open_shards:
            layout, targets = _write_all(examples, n_examples, scratch, shuffle_seed,
                                         shard_bytes, open_shards, files)  # fmt: skip
        np.save(scratch / TARGETS_FILE, targets, allow_pickle=False)
        shards = tuple(files[i].shard() for i in sorted(files))
        index = ShardIndex(shards, str(layout[0]), tuple(layout[1]), str(layout[2]),
                           tuple(layout[3]))  # fmt: skip
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


class _ShardFile:
    """One shard being written: its file, its count and its sha256, hashed as it is written."""

    def __init__(self, path: Path, open_shards: ExitStack) -> None:
        self.name = path.name
        # ExitStack is the context manager: one file open per shard, all closed at once
        self.file = open_shards.enter_context(open(path, "wb"))  # noqa: SIM115
        self.digest = hashlib.sha256()
        self.examples = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)

    def shard(self) -> Shard:
        return Shard(self.name, self.examples, self.digest.hexdigest())


def _write_all(examples, n_examples, scratch, shuffle_seed, shard_bytes, open_shards, writers):
    """Every example into its shard's tar file (``writers``, opened on ``open_shards``);
    returns the layout and every y in reading order (shard 0's first, as each was written):
    the targets a reader needs whole (metrics, class counts) without reading the shards."""
    iterator = iter(examples)
    layout = per_shard = perm = members = targets = None
    for position in range(n_examples + 1):
        try:
            x, y = next(iterator)
        except StopIteration:
            if position != n_examples:
                raise ShardError(f"expected {n_examples} examples, the source gave "
                                 f"{position}") from None  # fmt: skip
            for writer in writers.values():
                writer.write(bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
            return layout, targets
        if position == n_examples:
            raise ShardError(f"the source gave more than the {n_examples} examples expected")
        x, y = np.asarray(x), np.asarray(y)
        if layout is None:
            layout = (x.dtype, x.shape, y.dtype, y.shape)
            members = (_Member(x, "x.npy"), _Member(y, "y.npy"))
            # On disk an example is two 512-byte headers and its padded .npy files: 2,560
            # bytes for a 28x28 image of 784. The shard's file, which a reader holds whole,
            # is what must fit in shard_bytes.
            record = sum(m.size for m in members)
            per_shard = max(1, min(n_examples, shard_bytes // record))
            rng = np.random.default_rng(shuffle_seed)
            perm = rng.permutation(n_examples) if shuffle_seed is not None else None
            targets = np.empty((n_examples, *y.shape), y.dtype)
        elif (x.dtype, x.shape, y.dtype, y.shape) != layout:
            raise ShardError(
                f"example {position}: x {x.dtype}{list(x.shape)}, y {y.dtype}{list(y.shape)}; "
                f"the first was x {layout[0]}{list(layout[1])}, y {layout[2]}{list(layout[3])}"
            )
        slot = int(perm[position]) if perm is not None else position
        shard = slot // per_shard
        if shard not in writers:
            writers[shard] = _ShardFile(scratch / f"shard-{shard:06d}.tar", open_shards)
        # The key is the slot: unique, and a shard's keys say nothing of the source order.
        key = b"%010d" % slot
        writers[shard].write(members[0].record(key, x) + members[1].record(key, y))
        targets[shard * per_shard + writers[shard].examples] = y
        writers[shard].examples += 1
    raise AssertionError("unreachable: the loop returns or raises")


class _Member:
    """One of an example's two tar members, ``<key>.<ext>``: its 512-byte header made once by
    tarfile (USTAR, owner, mode 0444, time 0), then per example only the 10 key digits and the
    checksum patched in, and the .npy header before the array's bytes also made once (every
    example has the first one's dtype and shape). tarfile member by member wrote ~2,500
    examples a second; this, tens of thousands."""

    def __init__(self, first: np.ndarray, ext: str) -> None:
        npy = _npy(first)
        self.npy_header = npy[: len(npy) - first.nbytes]
        info = tarfile.TarInfo(f"{0:010d}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(npy), 0, 0o444, "", ""
        self.header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        self.header[148:156] = b" " * 8  # the checksum counts its own field as spaces
        self.base_sum = sum(self.header) - sum(self.header[:10])
        self.padding = bytes(-len(npy) % tarfile.BLOCKSIZE)
        self.size = len(self.header) + len(npy) + len(self.padding)  # bytes on disk

    def record(self, key: bytes, array: np.ndarray) -> bytes:
        header = self.header
        header[:10] = key
        header[148:156] = b"%06o\0 " % (self.base_sum + sum(key))
        return bytes(header) + self.npy_header + array.tobytes() + self.padding  # C order


# ---------------------------------------------------------------- reading


def read_shard(path: Path, index: ShardIndex, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """One whole shard as (x, y) arrays, in the order written; checked against the index.

    The shards we write are regular: every example is the same two members of the same sizes,
    so the whole file is ``expected`` records of one length, and the arrays are strided views
    of it, checked header by header (``_read_regular``; 5-10x faster than tarfile's member by
    member reading). A shard of another shape (another tool wrote it) is read member by member.
    """
    data = Path(path).read_bytes()
    regular = _read_regular(data, index, expected)
    if regular is not None:
        return regular
    return _read_members(path, index, expected)


def _read_regular(data: bytes, index: ShardIndex, n: int):
    """(x, y) of a shard of ``n`` equal records, or None when the file is not laid out so."""
    block = tarfile.BLOCKSIZE
    try:
        first_x = tarfile.TarInfo.frombuf(data[:block], "utf-8", "surrogateescape")
        x_size = first_x.size
        x_pad = -(-x_size // block) * block
        first_y = tarfile.TarInfo.frombuf(data[block + x_pad : 2 * block + x_pad], "utf-8",
                                          "surrogateescape")  # fmt: skip
    except tarfile.TarError:
        return None
    y_size = first_y.size
    record = 2 * block + x_pad + -(-y_size // block) * block
    if (
        n < 1
        or len(data) < n * record + 2 * block
        or any(data[n * record : n * record + 2 * block])
    ):
        return None
    rows = np.frombuffer(data, np.uint8, n * record).reshape(n, record)
    x_at, y_at = block, 2 * block + x_pad
    headers = (rows[:, :block], rows[:, x_at + x_pad : y_at])
    for header, first, suffix in zip(headers, (first_x, first_y), (b".x.npy", b".y.npy"),
                                     strict=True):  # fmt: skip
        name = first.name.encode()
        if not name.endswith(suffix) or len(name) != 10 + len(suffix):
            return None
        # Every header: the same name suffix, mode, owner, size, time and type as the first
        # (the key and the checksum differ from member to member).
        fixed = np.r_[10 : len(name), len(name) : 100, 100:148, 156]
        if not (header[:, fixed] == header[0, fixed]).all():
            return None
    x_bytes = int(np.prod(index.x_shape, dtype=np.int64)) * np.dtype(index.x_dtype).itemsize
    y_bytes = int(np.prod(index.y_shape, dtype=np.int64)) * np.dtype(index.y_dtype).itemsize
    x_header, y_header = x_size - x_bytes, y_size - y_bytes
    out = []
    for at, head, size, dtype, shape in (
        (x_at, x_header, x_bytes, index.x_dtype, index.x_shape),
        (y_at, y_header, y_bytes, index.y_dtype, index.y_shape),
    ):
        npy_head = rows[:, at : at + head]
        if head <= 0 or not (npy_head == npy_head[0]).all():  # one dtype and shape for all
            return None
        array = np.load(io.BytesIO(npy_head[0].tobytes() + bytes(size)), allow_pickle=False)
        if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
            return None
        flat = np.ascontiguousarray(rows[:, at + head : at + head + size])
        out.append(flat.view(dtype).reshape(n, *shape))
    return out[0], out[1]


def _read_members(path: Path, index: ShardIndex, expected: int):
    x = np.empty((expected, *index.x_shape), dtype=index.x_dtype)
    y = np.empty((expected, *index.y_shape), dtype=index.y_dtype)
    n, key, parts = 0, None, {}
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                name, _, ext = member.name.partition(".")
                if ext not in ("x.npy", "y.npy") or not member.isfile():
                    raise ShardError(f"{path}: unexpected member {member.name!r}")
                if name != key:
                    key, parts = name, {}
                parts[ext] = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                if len(parts) == 2:
                    if n == expected:
                        raise ShardError(f"{path}: more examples than the index's {expected}")
                    x[n], y[n] = parts["x.npy"], parts["y.npy"]
                    n += 1
                tar.members = []
    except (tarfile.TarError, OSError, ValueError) as exc:
        if isinstance(exc, ShardError):
            raise
        raise ShardError(f"{path}: unreadable shard ({exc})") from exc
    if n != expected:
        raise ShardError(f"{path}: {n} examples, the index says {expected}")
    return x, y


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
