"""Sharded splits (components/shards.py): WebDataset tar shards, planned per epoch and rank.

Every test writes its own tiny split. The examples carry their own id (x[0] == id), so a test
can tell exactly which examples a reader gave, in which order, to which rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tracemalloc

import numpy as np
import pytest

from components.lightning_module import quiet_lightning
from components.shards import (
    INDEX_FILE,
    ShardError,
    ShardIndex,
    ShardLoader,
    epoch_plan,
    iter_examples,
    read_shard,
    write_shards,
)


def _examples(n: int, classes: int = 4, sort_by_class: bool = True, chunk: int = 1):
    """n examples whose x[0] is their id, in chunks of ``chunk`` (1: as an image folder is
    read, file by file); with sort_by_class, the source is class by class (as an image folder
    reads), the worst order for batches."""
    ids = np.arange(n)
    labels = ids % classes
    order = np.argsort(labels, kind="stable") if sort_by_class else ids
    for lo in range(0, n, chunk):
        i = order[lo : lo + chunk]
        yield np.stack([i, i * 0.5, -i], axis=1).astype(np.float32), labels[i].astype(np.int64)


def _ids(batches) -> list[int]:
    return [int(v) for x, _ in batches for v in np.asarray(x)[:, 0]]


@pytest.fixture
def split(tmp_path):
    """250 examples in shards of 32 (20 bytes each: 3 float32 and an int64), in groups of 4
    (8 shards' buffers of 4 examples fill the 640 bytes)."""
    directory = tmp_path / "train"
    write_shards(_examples(250), directory, 250, shuffle_seed=7, shard_bytes=32 * 20)
    return directory


def test_a_split_is_written_once_as_webdataset_shards_with_an_index(split):
    index = ShardIndex.read(split)
    assert index.examples == 250
    assert [s.examples for s in index.shards] == [32] * 7 + [26]
    assert (index.x_dtype, index.x_shape, index.y_dtype, index.y_shape) == ("float32", (3,),
                                                                           "int64", ())  # fmt: skip
    # A plain WebDataset layout: <key>.x.npy and <key>.y.npy members in each tar, each pair a
    # group of 4 examples (the last shard's 26: 6 groups of 4 and one of 2).
    with tarfile.open(split / index.shards[0].file) as tar:
        names = tar.getnames()
        first = np.load(io.BytesIO(tar.extractfile(names[0]).read()))
    assert len(names) == 16 and all(n.endswith((".x.npy", ".y.npy")) for n in names)
    assert first.shape == (4, 3) and names[:2] == ["0000000000.x.npy", "0000000000.y.npy"]
    with tarfile.open(split / index.shards[-1].file) as tar:
        assert len(tar.getnames()) == 14
    raw = json.loads((split / INDEX_FILE).read_text())
    assert raw["format"] == "webdataset-npy/2" and len(raw["shards"][0]["sha256"]) == 64
    for shard in index.shards:  # hashed as written: the hash of the file on disk
        assert shard.sha256 == hashlib.sha256((split / shard.file).read_bytes()).hexdigest()


def test_webdataset_reads_the_shards(split):
    """The layout is WebDataset's: its own reader decodes every group of every shard, and its
    ``unbatched()`` gives every example."""
    import webdataset as wds

    index = ShardIndex.read(split)
    urls = [str(split / s.file) for s in index.shards]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    samples = list(dataset.to_tuple("x.npy", "y.npy").unbatched())
    assert len(samples) == 250
    ids = sorted(int(x[0]) for x, _ in samples)
    assert ids == list(range(250))
    assert all(int(y) == int(x[0]) % 4 for x, y in samples)


def test_shards_cost_the_examples_bytes_on_disk_whatever_the_chunks(tmp_path):
    """A table's rows arrive a batch at a time, an image folder's one at a time: the same
    shards, byte for byte. On disk they take little more than the examples' bytes (grouped
    members: one example a member took 2,048 bytes here for its 20)."""
    n = 60_000
    written = {}
    for chunk in (1, 4096):
        directory = tmp_path / f"c{chunk}"
        index = write_shards(_examples(n, chunk=chunk), directory, n, shuffle_seed=3,
                             shard_bytes=1 << 18)  # fmt: skip
        written[chunk] = index
    assert written[1] == written[4096] and len(written[1].shards) == 5
    on_disk = sum((tmp_path / "c1" / s.file).stat().st_size for s in written[1].shards)
    # 5 shards of 5 groups of 2,621 (the 5 buffers fill 256 KiB): 2.3 KB of headers and
    # padding a group, 4.5% of its 52 KB; groups of 64 MiB shards are larger still.
    assert on_disk < 1.05 * n * 20, on_disk


def test_a_shard_another_writer_made_an_example_a_member_reads_too(split, tmp_path):
    """The reader walks members, each one example or a group: a shard re-written by tarfile
    one example a member (with another .npy version among them) reads as the same arrays;
    a member that is not x.npy or y.npy, or a y.npy without its x.npy, is refused by name."""
    index = ShardIndex.read(split)
    first = index.shards[0]
    x, y = read_shard(split / first.file, index, first.examples)
    odd = tmp_path / "odd.tar"

    def member(tar, name, array, version=None):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=version)
        info = tarfile.TarInfo(name)
        info.size = buffer.tell()
        buffer.seek(0)
        tar.addfile(info, buffer)

    with tarfile.open(odd, "w") as tar:
        for i in range(len(y)):
            member(tar, f"{i:04d}.x.npy", x[i], version=(2, 0) if i == 1 else None)
            member(tar, f"{i:04d}.y.npy", y[i])
    again = read_shard(odd, index, first.examples)
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)
    with pytest.raises(ShardError, match="32 examples, the index says 33"):
        read_shard(odd, index, 33)
    with tarfile.open(odd, "a") as tar:
        tar.addfile(tarfile.TarInfo("0000000001.meta.json"), io.BytesIO(b""))
    with pytest.raises(ShardError, match="unexpected member '0000000001.meta.json'"):
        read_shard(odd, index, first.examples)
    with tarfile.open(odd, "w") as tar:
        member(tar, "0000.y.npy", y[:1])
    with pytest.raises(ShardError, match="0000.y.npy does not match the x.npy before it"):
        read_shard(odd, index, 1)
    with tarfile.open(odd, "w") as tar:
        member(tar, "0000.x.npy", x[:2].astype(np.float64))
    with pytest.raises(ShardError, match=r"float64\[2, 3\], expected float32\[3\]"):
        read_shard(odd, index, 2)


def test_the_scale_bench_smoke_runs(tmp_path):
    """bench/scale.py --smoke: every step on 1k and 3k images, the stages on a 1k-image folder
    and a 1k-row table, the interleaved throughput pairs; shares disjoint and equal."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--smoke"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((REPO_ROOT / "build" / "bench-smoke" / "scale.json").read_text())
    assert result["sizes"] == [1000, 3000]
    for row in result["rows"].values():
        assert row["ranks_disjoint_equal"] is True
        assert row["epoch_streamed"]["samples"] == row["epoch_in_memory"]["samples"] // 64 * 64
    first = result["rows"]["1000"]
    for stage in ("ingest", "validate", "train", "evaluate"):
        for mode in ("streamed", "in_memory"):
            for prefix in ("", "table_"):
                assert first[f"{prefix}{stage}_{mode}"]["peak_rss_mb"] > 0, (prefix, stage, mode)
    for mode in ("streamed", "in_memory"):  # one epoch of 11 steps: measured, not learnt
        assert 0 <= first[f"table_evaluate_{mode}"]["accuracy"] <= 1
    pairs = result["throughput_paired"]
    assert set(pairs) == {"epoch, plain loop", "train stage, images", "train stage, table"}
    assert all(p["median"] > 0 and len(p["ratios"]) == 1 for p in pairs.values())
    assert result["summary"]["peak_rss_mb"]["table_ingest_streamed"]["1000"] > 0
    assert "k = " in done.stdout and "interleaved pairs" in done.stdout  # the summary printed


def test_shuffled_writing_mixes_a_source_read_class_by_class(split):
    index = ShardIndex.read(split)
    plan = epoch_plan(index, epoch=0, seed=0, shuffle=False, rank=0, world=1)
    chunks = list(iter_examples(split, index, plan, 0, 0, shuffle=False))
    assert sorted(_ids(chunks)) == list(range(250))  # every example once
    for _x, y in chunks:  # each shard a sample of the whole: every class, none dominant
        counts = np.bincount(y, minlength=4)
        assert counts.min() >= 2 and counts.max() <= len(y) * 0.6, counts


def test_epochs_are_reshuffled_and_the_plan_is_the_same_in_every_process(split):
    first = _ids(ShardLoader(split, 16, shuffle=True, seed=3, rank=0, world=1))
    again = _ids(ShardLoader(split, 16, shuffle=True, seed=3, rank=0, world=1))
    loader = ShardLoader(split, 16, shuffle=True, seed=3, rank=0, world=1)
    epoch0, epoch1 = _ids(loader), _ids(loader)
    assert first == again == epoch0
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0) == list(range(250))
    plain = ShardLoader(split, 16, shuffle=False, rank=0, world=1)
    assert _ids(plain) == _ids(plain) != epoch0  # unshuffled: the written order, every epoch


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_equal_shares_of_every_epoch(split, world):
    for epoch in range(2):
        seen = []
        for rank in range(world):
            loader = ShardLoader(split, 10, shuffle=True, seed=1, rank=rank, world=world,
                                 drop_last=True)  # fmt: skip
            loader.epoch = epoch
            batches = list(loader)
            assert len(batches) == len(loader) == (250 // world) // 10  # equal batch counts
            seen.append(_ids(batches))
        flat = [i for ids in seen for i in ids]
        assert len(flat) == len(set(flat))  # no example twice
        assert len({len(ids) for ids in seen}) == 1
    # Without drop_last, every rank gets 250 // world examples: at most world - 1 are left out.
    full = [_ids(ShardLoader(split, 10, shuffle=True, rank=r, world=world)) for r in range(world)]
    assert sum(map(len, full)) == 250 - 250 % world
    assert len(set().union(*full)) == 250 - 250 % world


def test_a_resumed_loader_gives_exactly_the_rest_of_the_epoch(split):
    whole = _ids(ShardLoader(split, 16, shuffle=True, seed=5, rank=0, world=1))
    loader = ShardLoader(split, 16, shuffle=True, seed=5, rank=0, world=1)
    iterator = iter(loader)
    head = _ids([next(iterator) for _ in range(5)])
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed": 80, "examples": 250}
    resumed = ShardLoader(split, 16, shuffle=True, seed=5, rank=0, world=1)
    resumed.load_state_dict(state)
    tail = _ids(resumed)
    assert head + tail == whole
    assert len(list(resumed)) == len(resumed)  # and then the next epoch, whole
    # Saved at the end of an epoch (Lightning's epoch-end checkpoint): resume with the next.
    done = ShardLoader(split, 16, shuffle=True, seed=5, rank=0, world=1)
    done.load_state_dict({"epoch": 0, "consumed": 250, "examples": 250})
    second = ShardLoader(split, 16, shuffle=True, seed=5, rank=0, world=1)
    list(second)
    assert _ids(done) == _ids(second)  # epoch 1


def test_bad_input_is_refused_by_name_and_a_failed_write_keeps_the_old_split(split):
    before = (split / INDEX_FILE).read_text()

    def ragged():
        yield np.zeros((1, 3), np.float32), np.zeros(1, np.int64)
        yield np.zeros((1, 4), np.float32), np.ones(1, np.int64)

    with pytest.raises(
        ShardError, match=r"example 1: x float32\[4\].*the first was x float32\[3\]"
    ):
        write_shards(ragged(), split, 2)
    with pytest.raises(ShardError, match="expected 300 examples, the source gave 250"):
        write_shards(_examples(250), split, 300)
    with pytest.raises(ShardError, match="more than the 10 examples expected"):
        write_shards(_examples(250), split, 10)
    assert (split / INDEX_FILE).read_text() == before
    assert sorted(p.name for p in split.parent.iterdir()) == ["train"]  # no scratch left
    with pytest.raises(ShardError, match="3 examples cannot be shared by 4 processes"):
        small = split.parent / "small"
        write_shards(_examples(3), small, 3)
        list(ShardLoader(small, 1, shuffle=False, rank=0, world=4))
    with pytest.raises(ShardError, match="index.json: not found"):
        ShardLoader(split.parent / "nowhere", 4, shuffle=False)
    loader = ShardLoader(split, 8, shuffle=False)
    with pytest.raises(ShardError, match="split of 99 examples"):
        loader.load_state_dict({"epoch": 0, "consumed": 8, "examples": 99})


def test_writing_holds_a_shard_not_the_split(tmp_path):
    """Peak memory of writing 20x the examples stays flat (the bench measures real sizes)."""

    def peak(n: int) -> int:
        tracemalloc.start()
        write_shards(_examples(n, sort_by_class=False), tmp_path / f"s{n}", n, shuffle_seed=0,
                     shard_bytes=200 * 20)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    peak(10)  # imports
    small, large = peak(500), peak(5_000)
    # The permutation of positions grows (8 bytes an example), and the source's ids here; nothing
    # else may (tarfile kept ~700 bytes per member written: 3.4 MB more here, before the fix).
    assert large - small < 5_000 * 8 * 2 + 256 * 1024, (small, large)


def test_a_killed_fit_resumes_mid_epoch_without_repeating_or_skipping(tmp_path, split):
    """A real Lightning Trainer: killed after 5 batches of epoch 0, resumed from its last
    checkpoint; every example of the two epochs is trained exactly once per epoch."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    seen: list[tuple[int, int]] = []

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            seen.extend((self.current_epoch, int(i)) for i in x[:, 0])
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Killed(RuntimeError):
        pass

    class Kill(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 5:  # the 5th step is trained and saved; Lightning has
                raise Killed  # fetched the 6th and 7th batches: the loader has handed out 7

    def trainer(*callbacks):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1,
                                     save_last=True, save_top_k=0)  # fmt: skip
        return pl.Trainer(
            max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False,
            callbacks=[checkpoint, *callbacks],
        )  # fmt: skip

    def loader():
        return ShardLoader(split, 16, shuffle=True, seed=2, rank=0, world=1)

    quiet_lightning()
    torch.manual_seed(0)
    with pytest.raises(Killed):
        trainer(Kill()).fit(Net(), loader())
    assert len(seen) == 5 * 16
    trainer().fit(Net(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for epoch in (0, 1):
        ids = [i for e, i in seen if e == epoch]
        assert len(ids) == 250 and set(ids) == set(range(250)), epoch
    expected = _ids(ShardLoader(split, 16, shuffle=True, seed=2, rank=0, world=1))
    assert [i for e, i in seen if e == 0] == expected  # the same order as an unbroken epoch
