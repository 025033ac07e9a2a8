"""Sharded splits through the stages (``ingest.storage: shards``): ingest writes them (an image
folder file by file), and validate, train, evaluate, compress and gate read them a shard at a
time, measuring what they measure on the same split in memory. Under DDP each rank reads its
own share of every epoch (real processes, gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components import evaluate, gate, ingest, train, validate
from components.config import parse_params
from components.dataset import ArraySet, DatasetError, ShardedSet, load_split, sharded_path
from components.shards import write_shards
from components.stage import StageError
from tests.conftest import (
    REPO_ROOT,
    SERIES_OVERRIDES,
    TINY_CLASSES,
    make_images,
    make_series,
    params_with,
    tiny_params_dict,
)
from tests.helpers import file_hashes, stage_workspace


def _params(root: Path, source: Path, storage: str, **sections):
    raw = tiny_params_dict(root, str(source))
    raw["paths"]["external_dir"] = str(source.parent)
    raw["ingest"]["storage"] = storage
    for section, values in sections.items():
        raw[section].update(values)
    return parse_params(raw)


def _rows(data) -> np.ndarray:
    """A split's examples as sorted rows (x bytes then y): equal for the same examples in any
    order."""
    parts = []
    for x, y in data.chunks():
        flat = x.reshape(len(x), -1).astype(np.float64)
        parts.append(np.column_stack([flat, y.astype(np.float64)]))
    rows = np.concatenate(parts)
    return rows[np.lexsort(rows.T[::-1])]


@pytest.fixture(scope="module")
def npz_source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "external" / "tiny.npz"
    path.parent.mkdir(parents=True)
    x, y = make_images(per_class=30)
    np.savez(path, x=x, y=y, class_names=np.array(TINY_CLASSES))
    return path


def _png_folder(root: Path, per_class: int = 12, rgb: bool = False) -> Path:
    from PIL import Image

    x, y = make_images(per_class=per_class, size=10)
    folder = root / "external" / "pngs"
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        target = folder / TINY_CLASSES[label] / f"{i:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(img)
        if rgb and i % 2:
            picture = picture.convert("RGB")  # a folder of grey and colour files becomes RGB
        picture.save(target)
    return folder


def test_sharded_splits_hold_the_same_examples_as_in_memory(tmp_path, npz_source):
    memory = _params(tmp_path / "m", npz_source, "memory")
    sharded = _params(tmp_path / "s", npz_source, "shards")
    assert ingest.run(memory).storage == "memory"
    assert ingest.run(sharded).storage == "shards"
    for split in ("train", "val", "test"):
        a = load_split(memory.paths.prepared_dir, split)
        b = load_split(sharded.paths.prepared_dir, split)
        assert isinstance(a, ArraySet) and isinstance(b, ShardedSet)
        assert len(a) == len(b) and b.x.shape == a.x.shape and b.x.dtype == a.x.dtype
        np.testing.assert_array_equal(_rows(a), _rows(b))
        assert not (Path(sharded.paths.prepared_dir) / f"{split}.npz").exists()
    assert (Path(memory.paths.prepared_dir) / "meta.json").read_text() == (
        Path(sharded.paths.prepared_dir) / "meta.json"
    ).read_text()
    # Back to memory: the shards go, so a stage cannot read the stale form.
    ingest.run(_params(tmp_path / "s", npz_source, "memory"))
    assert isinstance(load_split(sharded.paths.prepared_dir, "train"), ArraySet)
    assert not sharded_path(sharded.paths.prepared_dir, "train").exists()


def test_auto_storage_shards_above_the_size_param(tmp_path, npz_source):
    small = _params(tmp_path / "a", npz_source, "auto")
    assert ingest.run(small).storage == "memory"
    over = _params(tmp_path / "b", npz_source, "auto", ingest={"shard_above_mb": 0.001})
    assert ingest.run(over).storage == "shards"  # 90 images of 64 bytes > 1 kB


def test_a_sharded_split_refuses_to_be_used_as_an_array(tmp_path, npz_source):
    params = _params(tmp_path, npz_source, "shards")
    ingest.run(params)
    test = load_split(params.paths.prepared_dir, "test")
    with pytest.raises(DatasetError, match="sharded split.*map_x"):
        np.asarray(test.x)
    head = test.head(5)
    assert isinstance(head, ArraySet) and len(head) == 5
    assert len(test.sample(1000, seed=0)) == len(test)  # all of it when it asks for more


def test_image_folder_is_read_file_by_file_into_the_same_splits(tmp_path):
    folder = _png_folder(tmp_path, rgb=True)
    memory = _params(tmp_path / "m", folder, "memory")
    memory = memory.model_copy(update={"ingest": memory.ingest.model_copy(
        update={"source": str(folder)})})  # fmt: skip
    sharded = memory.model_copy(update={
        "ingest": memory.ingest.model_copy(update={"storage": "shards"}),
        "paths": _params(tmp_path / "s", folder, "shards").paths,
    })  # fmt: skip
    ingest.run(memory)
    result = ingest.run(sharded)
    assert result.storage == "shards" and result.n_examples == 36
    for split in ("train", "val", "test"):
        a = load_split(memory.paths.prepared_dir, split)
        b = load_split(sharded.paths.prepared_dir, split)
        assert b.x.shape[1:] == (3, 10, 10)  # grey and colour files: all RGB, as in memory
        np.testing.assert_array_equal(_rows(a), _rows(b))
    manifest = json.loads((Path(sharded.paths.raw_dir) / "manifest.json").read_text())
    assert manifest["classes"] == sorted(TINY_CLASSES) and len(manifest["files"]) == 36
    assert not (Path(sharded.paths.raw_dir) / "dataset.npz").exists()


def test_a_broken_file_is_named_before_any_split_is_replaced(tmp_path):
    folder = _png_folder(tmp_path)
    params = _params(tmp_path / "w", folder, "shards")
    params = params.model_copy(update={"ingest": params.ingest.model_copy(
        update={"source": str(folder)})})  # fmt: skip
    ingest.run(params)
    prepared = Path(params.paths.prepared_dir)
    before = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    broken = folder / TINY_CLASSES[1] / "zz-broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(StageError, match="zz-broken.png: not a readable image"):
        ingest.run(params)
    after = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    assert after == before


def test_stages_on_shards_measure_what_they_measure_in_memory(tmp_path, npz_source):
    """The same trained model, evaluated and gated on the same test split stored both ways:
    the same metrics and verdicts; validation finds the same counts."""
    sections = {"train": {"max_epochs": 3}, "evaluate": {"baselines": True}}
    memory = _params(tmp_path / "m", npz_source, "memory", **sections)
    sharded = _params(tmp_path / "s", npz_source, "shards", **sections)
    for params in (memory, sharded):
        ingest.run(params)
    checks = [validate.run(p) for p in (memory, sharded)]
    assert [c.passed for c in checks[0].checks] == [c.passed for c in checks[1].checks]
    assert checks[0].stats == checks[1].stats
    train.run(memory)
    shutil.copytree(memory.paths.model_dir, sharded.paths.model_dir)
    a, b = (evaluate.run(p) for p in (memory, sharded))
    assert a.metrics == b.metrics
    assert [g.passed for g in a.gates] == [g.passed for g in b.gates]
    baselines = [
        json.loads((Path(p.paths.metrics_dir) / "baselines.json").read_text())
        for p in (memory, sharded)
    ]
    assert baselines[0]["baselines"].keys() == baselines[1]["baselines"].keys()
    from components.model import load_model
    from components.onnx_files import export_onnx

    net, card = load_model(memory.paths.model_dir)
    onnx = tmp_path / "fp32.onnx"
    export_onnx(net, tuple(card.config["input_shape"]), onnx, 1e-4)
    measured = [
        gate.measure(onnx, load_split(p.paths.prepared_dir, "test"), TINY_CLASSES)
        for p in (memory, sharded)
    ]
    assert measured[0] == measured[1]


def test_sharded_training_runs_through_the_train_stage(tmp_path, npz_source):
    params = _params(tmp_path, npz_source, "shards", train={"max_epochs": 3, "batch_norm": True})
    ingest.run(params)
    result = train.run(params)
    assert result.epochs_run == 3 and result.best_val_accuracy > 0.5
    history = (Path(params.paths.metrics_dir) / "train_history.csv").read_text().splitlines()
    assert len(history) == 4


_RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from components.shards import ShardLoader
dist.init_process_group("gloo")
rank = dist.get_rank()
loader = ShardLoader(sys.argv[1], batch_size=8, shuffle=True, seed=3)
seen = {}
for epoch in range(2):
    seen[epoch] = [int(v) for _, y in loader for v in y.tolist()]
json.dump({"batches": len(loader), "seen": seen}, open(sys.argv[2] + f".{rank}", "w"))
dist.destroy_process_group()
"""


def test_two_ddp_ranks_read_disjoint_halves_of_every_epoch(tmp_path):
    """Two real processes (torch.distributed, gloo): each rank's examples of an epoch are its
    own, both ranks get the same count, and together they cover the epoch (but the one example
    an odd split leaves over)."""
    from tests.helpers import free_port

    n = 101
    ids = np.arange(n, dtype=np.int64)
    examples = ((np.full((1, 4), i, np.float32), ids[i : i + 1]) for i in ids)
    write_shards(examples, tmp_path / "split", n, shuffle_seed=0, shard_bytes=10 * 24)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "split"),
                          str(tmp_path / "seen")], env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-2000:]
    ranks = [json.loads((tmp_path / f"seen.{r}").read_text()) for r in (0, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 7  # ceil(50 / 8)
    for epoch in ("0", "1"):
        a, b = (set(r["seen"][epoch]) for r in ranks)
        assert len(ranks[0]["seen"][epoch]) == len(a) == len(b) == 50
        assert not a & b and len(a | b) == n - 1
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # another order each epoch


@pytest.mark.slow
def test_ddp_train_stage_on_shards(tmp_path, npz_source):
    """`python -m components.train` with two gloo processes on sharded splits."""
    root = stage_workspace(tmp_path / "ddp", npz_source, {"storage": "shards"}, max_epochs=2,
                           devices=2, strategy="ddp", accelerator="cpu")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "WORLD_", "RANK"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = subprocess.run([sys.executable, "-m", "components.train"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "GLOBAL_RANK: 1" in out.stdout + out.stderr
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["epochs_run"] == 2


# ---------------------------------------------------------------- tables, in batches


def test_one_pass_fit_equals_the_whole_frame_fit():
    import pandas as pd

    from components import features

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "a": rng.normal(1e4, 3.0, 5000),  # a large mean: a naive sum of squares loses it
        "b": rng.integers(0, 7, 5000),
        "c": rng.choice(["x", "y", "z", None], 5000),
    })  # fmt: skip
    frame.loc[::17, "a"] = np.nan
    fitter = features.OnePassFit(["a", "b", "c"])
    for lo in range(0, len(frame), 777):
        fitter.update(frame.iloc[lo : lo + 777])
    one, whole = fitter.spec(), features.fit(frame, ["a", "b", "c"])
    assert one["features"] == whole["features"]
    for got, want in zip(one["columns"], whole["columns"], strict=True):
        assert got.keys() == want.keys() and got["type"] == want["type"]
        if got["type"] == "numeric":
            assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
            assert got["std"] == pytest.approx(want["std"], rel=1e-9)
        else:
            assert got["categories"] == want["categories"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_table_is_read_in_batches_into_the_same_splits(tmp_path, suffix, monkeypatch):
    from components.kinds import table
    from tests.conftest import make_table

    monkeypatch.setattr(table, "BATCH_ROWS", 17)  # many batches of a small table
    frame = make_table(n=150)
    path = tmp_path / "external" / f"rows{suffix}"
    path.parent.mkdir(parents=True)
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    target = {"ingest": {"target": "kind"}}
    memory = _params(tmp_path / "m", path, "memory", **target)
    sharded = _params(tmp_path / "s", path, "shards", **target)
    ingest.run(memory)
    assert ingest.run(sharded).storage == "shards"
    metas = [json.loads((Path(p.paths.prepared_dir) / "meta.json").read_text())
             for p in (memory, sharded)]  # fmt: skip
    spec_m, spec_s = (m.pop("preprocess") for m in metas)
    assert metas[0] == metas[1]
    assert spec_m["features"] == spec_s["features"]
    for a, b in zip(spec_m["columns"], spec_s["columns"], strict=True):
        for key in ("mean", "std"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-12)
    for split in ("train", "val", "test"):
        a = load_split(memory.paths.prepared_dir, split)
        b = load_split(sharded.paths.prepared_dir, split)
        np.testing.assert_allclose(_rows(a), _rows(b), rtol=1e-6, atol=1e-6)
        kept = [pd_read(p, split) for p in (memory, sharded)]
        assert sorted(map(tuple, kept[0].astype(str).values.tolist())) == sorted(
            map(tuple, kept[1].astype(str).values.tolist())
        )
    assert validate.run(sharded).success


def pd_read(params, split):
    import pandas as pd

    return pd.read_parquet(Path(params.paths.prepared_dir) / f"{split}.parquet")


def test_a_truncated_csv_is_named_with_the_row_it_stopped_at(tmp_path):
    from tests.conftest import make_table

    path = tmp_path / "external" / "rows.csv"
    path.parent.mkdir(parents=True)
    make_table(n=60).to_csv(path, index=False)
    with open(path, "a") as fh:
        fh.write("1.5,oops\n")  # a row with too few fields
    params = _params(tmp_path / "w", path, "shards", ingest={"target": "kind"})
    with pytest.raises(StageError, match=r"rows\.csv: .*Row #62: Expected 5 columns, got 2"):
        ingest.run(params)


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_mid_epoch(tmp_path):
    """`train.checkpoint_every_n_steps`: SIGKILL mid-epoch, start again: the run resumes from
    the mid-epoch checkpoint (the loader's place in the epoch with it) and finishes."""
    import signal
    import time

    source = tmp_path / "external" / "big.npz"
    source.parent.mkdir(parents=True)
    x, y = make_images(per_class=600, size=12)  # a few seconds an epoch
    np.savez(source, x=x, y=y, class_names=np.array(TINY_CLASSES))
    root = stage_workspace(tmp_path / "ws", source, {"storage": "shards"}, max_epochs=2,
                           batch_size=4, early_stopping_patience=10,
                           checkpoint_every_n_steps=5)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PIPELINE_DEBUG", None)

    def start():
        command = [sys.executable, "-m", "components.train"]
        return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    process = start()
    deadline = time.monotonic() + 180
    steps = root / "build" / "checkpoints"
    while not list(steps.glob("*/step.ckpt")) or list(steps.glob("*/last.ckpt")):
        assert process.poll() is None, "training ended before a mid-epoch checkpoint"
        assert time.monotonic() < deadline, "no mid-epoch checkpoint within 180 s"
        time.sleep(0.02)
    time.sleep(0.05)  # the checkpoint is written whole
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = start()
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from" in out and "mid-epoch, after epoch" in out, out[-3000:]
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["epochs_run"] == 2


def test_a_sample_of_a_class_by_class_split_holds_every_class(tmp_path):
    """A folder arrives class by class and a shard keeps its arrival order: the sample (the
    calibration set, the baselines' rows) must still be a random one, not one class."""
    n = 3000
    labels = np.repeat(np.arange(3), n // 3)  # sorted, as a folder is read
    examples = [(np.zeros((n, 4), np.float32), labels)]
    write_shards(examples, tmp_path / "train", n, shuffle_seed=0, shard_bytes=8 << 20)
    split = ShardedSet.open(tmp_path / "train")
    assert len(split.index.shards) == 1  # the case where a prefix would be one class
    sample = split.sample(90, seed=0)
    assert len(sample) == 90 and min(np.bincount(sample.y, minlength=3)) >= 15


def test_a_series_stored_as_shards_is_its_rows_memory_mapped_and_trains_the_same(tmp_path, caplog):
    """`storage: shards` for a time series: each split is its rows, once (not every window's
    copy of them), read back memory-mapped and never written; validate, train and evaluate
    give what the same series gives in memory, down to the trained model's bytes."""
    from components.dataset import SERIES_FILE, SeriesWindows

    source = tmp_path / "data" / "external" / "series.csv"
    source.parent.mkdir(parents=True)
    make_series(n=400).to_csv(source, index=False)
    runs = {}
    for storage in ("memory", "shards"):
        raw = params_with(tmp_path / storage, str(source), SERIES_OVERRIDES)
        raw["paths"]["external_dir"] = str(source.parent)
        raw["ingest"]["storage"] = storage
        runs[storage] = parse_params(raw)
    before = runs["shards"].ingest.model_copy(update={"storage": "memory"})
    ingest.run(runs["shards"].model_copy(update={"ingest": before}))  # the other form first
    with caplog.at_level("INFO"):
        results = {s: ingest.run(p) for s, p in runs.items()}
    assert results["shards"].storage == "shards"
    assert "stored as each split's rows, memory-mapped by the stages that read them" in caplog.text
    prepared = Path(runs["shards"].paths.prepared_dir)
    for split in ("train", "val", "test"):
        stored = sharded_path(prepared, split)
        assert (stored / SERIES_FILE).is_file() and not (prepared / f"{split}.npz").exists()
        data = load_split(prepared, split)
        in_memory = load_split(runs["memory"].paths.prepared_dir, split)
        assert isinstance(data, SeriesWindows) and isinstance(data.rows.base, np.memmap)
        assert np.array_equal(data.x, in_memory.x) and np.array_equal(data.y, in_memory.y)
        on_disk = sum(f.stat().st_size for f in stored.iterdir())
        assert on_disk < data.rows.nbytes + data.targets.nbytes + 1024  # windows: 8 times it
    sharded_digests = file_hashes(prepared)
    checks = [validate.run(p) for p in runs.values()]
    assert [c.passed for c in checks[0].checks] == [c.passed for c in checks[1].checks]
    assert checks[0].stats == checks[1].stats
    for params in runs.values():
        train.run(params)
    models = [(Path(p.paths.model_dir) / "model.pt").read_bytes() for p in runs.values()]
    assert models[0] == models[1]
    a, b = (evaluate.run(p) for p in runs.values())
    assert a.metrics == b.metrics
    assert sharded_digests == file_hashes(prepared)  # copy-on-write: the files as ingest wrote them


def test_a_stored_series_split_that_is_not_whole_is_refused_by_name(tmp_path):
    from components.dataset import SERIES_FILE, SeriesWindows, save_split

    rows = np.arange(60, dtype=np.float32).reshape(30, 2)
    save_split(SeriesWindows(rows, rows[:, 0].copy(), 4, 1), tmp_path, "val", "shards", 0)
    stored = sharded_path(tmp_path, "val")
    assert np.array_equal(load_split(tmp_path, "val").rows, rows)
    described = (stored / SERIES_FILE).read_text()
    (stored / SERIES_FILE).write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"val: not a stored series split .* re-run ingest"):
        load_split(tmp_path, "val")
    (stored / SERIES_FILE).write_text(described.replace('"rows": 30', '"rows": 31'))
    with pytest.raises(DatasetError, match=r"says 31 float32 rows of 2 features: re-run ingest"):
        load_split(tmp_path, "val")
    (stored / SERIES_FILE).write_text(described)
    (stored / "targets.npy").unlink()
    with pytest.raises(DatasetError, match=r"targets.npy.*re-run ingest"):
        load_split(tmp_path, "val")


def _series_params(root: Path, source: Path, storage: str, **sections):
    raw = params_with(root, str(source), SERIES_OVERRIDES, sections)
    raw["paths"]["external_dir"] = str(source.parent)
    raw["ingest"]["storage"] = storage
    return parse_params(raw)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_series_is_read_in_batches_into_the_same_splits(tmp_path, suffix, monkeypatch, caplog):
    """`storage: shards` reads a time series in pyarrow batches, never whole: the same windows,
    targets, rows kept as read and metadata as a whole read (the fitted means and deviations
    to rounding); a time index is told from a column that only counts within each batch; the
    raw snapshot is a manifest, not a copy."""
    import pandas as pd

    from components.kinds import table

    monkeypatch.setattr(table, "BATCH_ROWS", 37)  # batches that cut across every split
    frame = make_series(n=400)
    frame.insert(0, "step", np.arange(1000, 1400))  # the time index: not an input
    frame["lap"] = np.arange(400) % 37  # increasing within each batch, not along the series
    frame.loc[[5, 250], "temp"] = np.nan  # a missing input in train and in val
    path = tmp_path / "external" / f"series{suffix}"
    path.parent.mkdir(parents=True)
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    allowed = {"validate": {"max_missing_fraction": 0.02}}
    runs = {s: _series_params(tmp_path / s, path, s, **allowed) for s in ("memory", "shards")}
    with caplog.at_level("INFO", logger="pipeline.ingest"):
        results = {s: ingest.run(p) for s, p in runs.items()}
    assert results["shards"].storage == "shards" and results["memory"].storage == "memory"
    lines = [r.getMessage() for r in caplog.records]
    assert all("time index 'step' not an input" in line for line in lines), lines
    assert "(read in batches of 37)" in lines[1] and "read in batches" not in lines[0]
    metas = [json.loads((Path(p.paths.prepared_dir) / "meta.json").read_text())
             for p in runs.values()]  # fmt: skip
    specs = [m.pop("preprocess") for m in metas]
    assert metas[0] == metas[1] and metas[0]["feature_names"] == ["load", "temp", "lap"]
    columns = [s.pop("columns") for s in specs]
    assert specs[0] == specs[1]
    for a, b in zip(*columns, strict=True):
        assert a["name"] == b["name"] and b["mean"] == pytest.approx(a["mean"], rel=1e-12)
        assert b["std"] == pytest.approx(a["std"], rel=1e-12)
    for split in ("train", "val", "test"):
        whole = load_split(runs["memory"].paths.prepared_dir, split)
        batched = load_split(runs["shards"].paths.prepared_dir, split)
        assert isinstance(batched.rows.base, np.memmap)
        np.testing.assert_allclose(batched.rows, whole.rows, rtol=0, atol=1e-6)
        assert np.array_equal(batched.targets, whole.targets)
        assert (batched.window, batched.horizon, len(batched)) == (8, 1, len(whole))
        kept = [pd_read(p, split) for p in runs.values()]
        pd.testing.assert_frame_equal(kept[0], kept[1], check_dtype=False)
    raw = Path(runs["shards"].paths.raw_dir)
    assert not (raw / "dataset.parquet").exists()
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest == {"source": str(path), "rows": 400, "columns": ["load", "temp", "lap"]}
    checks = [validate.run(p) for p in runs.values()]
    assert [c.passed for c in checks[0].checks] == [c.passed for c in checks[1].checks]
    assert checks[0].stats == checks[1].stats


def test_a_series_the_batched_read_refuses_leaves_the_last_good_splits(tmp_path, monkeypatch):
    """Every refusal of a batched series read comes from its first pass, before anything is
    written: the message names the problem, and the last good ingest's files are as they were."""
    from components.kinds import table

    monkeypatch.setattr(table, "BATCH_ROWS", 50)
    path = tmp_path / "data" / "external" / "series.csv"
    path.parent.mkdir(parents=True)
    good = make_series(n=400)
    good.to_csv(path, index=False)
    params = _series_params(tmp_path, path, "shards")
    ingest.run(params)
    data = tmp_path / "data"
    before = file_hashes(data, skip=(path.name,))
    empty = good.copy()
    empty.loc[[10, 300], "load"] = np.nan  # in the first batch and in the seventh
    empty.to_csv(path, index=False)
    with pytest.raises(StageError, match=r"target column 'load' is empty in 2 row\(s\)"):
        ingest.run(params)
    assert file_hashes(data, skip=(path.name,)) == before
    good.to_csv(path, index=False)
    with open(path, "a") as fh:
        fh.write("2026-01-17 16:00:00,1.5\n")  # a last row with too few fields
    with pytest.raises(StageError, match=r"series\.csv: .*Row #402: Expected 3 columns, got 2"):
        ingest.run(params)
    assert file_hashes(data, skip=(path.name,)) == before


def test_validation_reads_a_seeded_sample_of_the_rows_of_a_split_stored_in_parts(
    tmp_path, monkeypatch
):
    """Above ``validate.max_summary_rows``, the rows as read of a sharded table are read as the
    seeded sample the suites run on, a batch at a time, never whole: the checks, their findings
    and the statistics equal those of the whole rows sampled after reading them."""
    import pandas as pd

    from components import dataset, kinds
    from components.dataset import DatasetMeta, load_frame, meta_path
    from components.kinds import table
    from tests.conftest import make_table

    monkeypatch.setattr(table, "BATCH_ROWS", 64)
    monkeypatch.setattr(dataset, "FRAME_BATCH_ROWS", 45)  # samples cut across batches
    frame = make_table(n=900)
    frame.loc[frame.index % 23 == 0, "x2"] = np.nan  # 4.3% missing: over the 2% allowed
    path = tmp_path / "external" / "rows.parquet"
    path.parent.mkdir(parents=True)
    frame.to_parquet(path)
    params = _params(tmp_path / "s", path, "shards", ingest={"target": "kind"},
                     validate={"max_summary_rows": 100, "max_missing_fraction": 0.02})  # fmt: skip
    ingest.run(params)
    prepared = Path(params.paths.prepared_dir)
    meta = DatasetMeta.load(meta_path(prepared))
    whole = {s: pd_read(params, s) for s in ("train", "val", "test")}
    assert len(whole["train"]) > 100 and len(whole["test"]) > 100

    kept = np.sort(np.random.default_rng(0).choice(len(whole["train"]), 100, replace=False))
    want = whole["train"].iloc[kept].reset_index(drop=True)
    pd.testing.assert_frame_equal(load_frame(prepared / "train.parquet", 100), want)
    pd.testing.assert_frame_equal(load_frame(prepared / "train.parquet", 10_000), whole["train"])

    splits = {s: load_split(prepared, s) for s in whole}
    sampled_after = validate.check_splits(splits, meta, params.validate_, frames=whole)
    read_whole = []
    real_read = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda p, *a, **k: read_whole.append(p)
                        or real_read(p, *a, **k))  # fmt: skip
    with pytest.raises(StageError, match=r"column 'x2': missing values <= 2\.0%") as failed:
        validate.run(params)
    # Every row counted: what the samples of val and test (100 of 225 rows) passed, they fail.
    for split in whole:
        share = whole[split]["x2"].isna().mean()
        assert share > 0.02
        assert (
            f"{split}: column 'x2': missing values <= 2.0% (every row) ("
            f"{whole[split]['x2'].isna().sum()} of {len(whole[split])} rows, {share:.1%}; "
            "the limit is validate.max_missing_fraction in params.yaml)"
        ) in str(failed.value)
    assert not read_whole, f"read whole: {read_whole}"
    docs = Path(params.paths.reports_dir) / "validation"
    counted = json.loads((docs / validate.STATISTICS_FILE).read_text())
    for split, rows in whole.items():  # from every row, in one pass, not from the sample
        assert counted[split]["rows_as_read"]["rows"] == len(rows)
        x2 = counted[split]["rows_as_read"]["columns"]["x2"]
        assert x2["missing"] == pytest.approx(rows["x2"].isna().mean(), abs=1e-15)
        assert (x2["min"], x2["max"]) == (rows["x2"].min(), rows["x2"].max())
        assert counted[split]["rows_as_read"]["columns"]["color"] == {"missing": 0.0}
    share = f"{whole['train']['x2'].isna().mean():.2%}"
    assert f"<td>train</td><td>x2</td><td>{share}</td>" in (docs / "summary.html").read_text()
    frames = validate.rows_as_read(kinds.get(meta.kind), prepared, meta, 100)
    assert {s: len(f) for s, f in frames.items()} == {s: min(len(f), 100) for s, f in whole.items()}
    result = validate.check_splits(splits, meta, params.validate_, frames=frames)
    assert [(c.split, c.description, c.passed, c.detail) for c in result.checks] == [
        (c.split, c.description, c.passed, c.detail) for c in sampled_after.checks
    ]
    assert result.stats == sampled_after.stats
