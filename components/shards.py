"""Sharded splits: a split as a few large WebDataset tar files, read a shard at a time.

A split that does not fit in memory is written once, in one pass over its examples, as tar
shards in the WebDataset layout (each example is ``<key>.x.npy`` and ``<key>.y.npy``; any tool
that reads WebDataset reads them), with an ``index.json`` that holds the count of every shard.
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
size. WebDataset (not LitData or MosaicML Streaming): LitData requires torchvision, whose PyPI
build does not load beside the CPU build of torch we pin; Streaming brings 46 packages (cloud
SDKs, transformers); WebDataset brings one, and its tar layout is read by all three.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_FILE = "index.json"
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
    import webdataset as wds

    if n_examples < 1:
        raise ShardError(f"cannot shard {n_examples} examples (need at least 1)")
    directory = Path(directory)
    scratch = directory.with_name(f".{directory.name}.writing-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    writers: dict[int, Any] = {}
    counts: dict[int, int] = {}
    try:
        iterator = iter(examples)
        layout = None
        per_shard = perm = None
        for position in range(n_examples + 1):
            try:
                x, y = next(iterator)
            except StopIteration:
                if position != n_examples:
                    raise ShardError(f"expected {n_examples} examples, the source gave "
                                     f"{position}") from None  # fmt: skip
                break
            if position == n_examples:
                raise ShardError(f"the source gave more than the {n_examples} examples expected")
            x, y = np.asarray(x), np.asarray(y)
            if layout is None:
                layout = (x.dtype, x.shape, y.dtype, y.shape)
                per_shard = max(1, min(n_examples, shard_bytes // max(1, x.nbytes + y.nbytes)))
                rng = np.random.default_rng(shuffle_seed)
                perm = rng.permutation(n_examples) if shuffle_seed is not None else None
            elif (x.dtype, x.shape, y.dtype, y.shape) != layout:
                raise ShardError(
                    f"example {position}: x {x.dtype}{list(x.shape)}, y {y.dtype}{list(y.shape)}; "
                    f"the first was x {layout[0]}{list(layout[1])}, y {layout[2]}{list(layout[3])}"
                )
            slot = int(perm[position]) if perm is not None else position
            shard = slot // per_shard
            if shard not in writers:
                writers[shard] = wds.TarWriter(
                    str(scratch / f"shard-{shard:06d}.tar"), mtime=0, encoder=False
                )
                counts[shard] = 0
            # The key is the slot: unique, and a shard's keys say nothing of the source order.
            writers[shard].write({"__key__": f"{slot:010d}", "x.npy": _npy(x), "y.npy": _npy(y)})
            counts[shard] += 1
            # tarfile keeps a TarInfo per member written (~700 bytes an example, without end):
            # WebDataset's writer never drops them; its reader clears the list the same way.
            writers[shard].tarstream.members = []
        for writer in writers.values():
            writer.close()
        writers.clear()
        shards = tuple(
            Shard(f"shard-{i:06d}.tar", counts[i], _sha256(scratch / f"shard-{i:06d}.tar"))
            for i in sorted(counts)
        )
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
        for writer in writers.values():
            writer.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- reading


def read_shard(path: Path, index: ShardIndex, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """One whole shard as (x, y) arrays, in the order written; checked against the index."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    x = np.empty((expected, *index.x_shape), dtype=index.x_dtype)
    y = np.empty((expected, *index.y_shape), dtype=index.y_dtype)
    n = 0
    with open(path, "rb") as stream:
        for sample in group_by_keys(tar_file_expander([{"stream": stream, "url": str(path)}])):
            if n == expected or "x.npy" not in sample or "y.npy" not in sample:
                raise ShardError(f"{path}: more examples than the index's {expected}, or one "
                                 f"without x.npy and y.npy ({sample.get('__key__')})")  # fmt: skip
            x[n] = np.load(io.BytesIO(sample["x.npy"]), allow_pickle=False)
            y[n] = np.load(io.BytesIO(sample["y.npy"]), allow_pickle=False)
            n += 1
    if n != expected:
        raise ShardError(f"{path}: {n} examples, the index says {expected}")
    return x, y


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
        transform=None,
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
        self.transform = transform
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
        pending_x: list[np.ndarray] = []
        pending_y: list[np.ndarray] = []
        held, handed = 0, skip
        chunks = iter_examples(self.directory, self.index, plan, self.seed, epoch, self.shuffle,
                               skip)  # fmt: skip
        for x, y in chunks:
            pending_x.append(x)
            pending_y.append(y)
            held += len(x)
            while held >= self.batch_size and handed < limit:
                bx, by, pending_x, pending_y = _take(pending_x, pending_y, self.batch_size)
                held -= self.batch_size
                handed += self.batch_size
                self._handed = handed
                yield self._batch(bx, by)
        if held and handed < limit and not self.drop_last:
            bx, by, _, _ = _take(pending_x, pending_y, held)
            self._handed = handed + held
            yield self._batch(bx, by)

    def _batch(self, x: np.ndarray, y: np.ndarray):
        import torch

        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        return self.transform(xt, yt) if self.transform else (xt, yt)

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


def _take(xs: list[np.ndarray], ys: list[np.ndarray], n: int):
    x, y = np.concatenate(xs), np.concatenate(ys)
    return x[:n], y[:n], [x[n:]], [y[n:]]
