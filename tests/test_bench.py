"""Every bench runs: each one's ``--smoke`` mode, as ``python -m bench.<name> --smoke``, on a tiny
finished run built here (tiny 1x8x8 images, the 3-class linear ONNX model of tests/tiny_models.py
as fp32 and its static int8, compress.json serving int8), so a bench that breaks fails CI.

The smoke modes measure next to nothing (a few calls, one epoch, 0.3 s of load): they prove the
code runs end to end on current interfaces, not that the figures mean anything. bench/tune.py
runs whole tuning studies through the real flow: its smoke mode builds its own scratch
repository with 60 tiny images and runs one study of 2 trials of 2 epochs at once (the slowest
smoke here: DVC experiments, Python start-up in each stage); bench/defaults.py's makes its own
tiny data sets from what packages ship (it needs no finished run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.dataset import ArraySet, DatasetMeta, meta_path, save_arrays, split_path
from tests.conftest import REPO_ROOT, tiny_params_dict
from tests.tiny_models import CLASS_NAMES, IMAGE_SHAPE, make_tiny_onnx


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """What `make pipeline` leaves that the benches read, tiny: params.yaml, the prepared
    splits and meta.json, models/onnx/{fp32,int8}.onnx and metrics/compress.json."""
    from components import quantize
    from components.compress import pick_calibration
    from components.config import parse_params

    root = tmp_path_factory.mktemp("bench-run")
    raw = tiny_params_dict(root, "unused")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = parse_params(raw)
    rng = np.random.default_rng(0)
    prepared = Path(params.paths.prepared_dir)
    sizes = {"train": 48, "val": 12, "test": 24}
    for split, n in sizes.items():
        x = rng.integers(0, 256, (n, *IMAGE_SHAPE)).astype(np.uint8)
        save_arrays(ArraySet(x, np.arange(n) % len(CLASS_NAMES)), split_path(prepared, split))
    DatasetMeta(CLASS_NAMES, IMAGE_SHAPE, "tiny", sizes).save(meta_path(prepared))

    onnx_dir = Path(params.paths.model_dir) / "onnx"
    fp32 = make_tiny_onnx(onnx_dir / "fp32.onnx", seed=0)
    train = ArraySet(np.zeros((16, *IMAGE_SHAPE), np.uint8) + 128, np.zeros(16, np.int64))
    calibration = pick_calibration(train, 16)
    int8 = onnx_dir / "int8.onnx"
    quantize.quantize_static(fp32, int8, calibration, params.compress.quantization)
    n_params = int(np.prod(IMAGE_SHAPE)) * len(CLASS_NAMES) + len(CLASS_NAMES)
    variants = {
        name: {"size_bytes": (onnx_dir / f"{name}.onnx").stat().st_size, "params": n_params,
               "steps": steps, "latency_ms_batch1": 0.01, "accuracy": 0.5}
        for name, steps in (("fp32", ""), ("int8", "quantize_static"))
    }  # fmt: skip
    metrics = Path(params.paths.metrics_dir)
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "compress.json").write_text(
        json.dumps({"served_variant": "int8", "variants": variants})
    )
    return root


def smoke(name: str, root: Path, *args: str, timeout: float = 240) -> str:
    """``python -m bench.<name> --smoke`` from ``root``: its output; fails with its end."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--smoke", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"bench.{name} --smoke failed:\n{out[-4000:]}"
    return out


def _results(root: Path, name: str) -> dict:
    return json.loads((root / "build" / "bench-smoke" / f"{name}.json").read_text())


def test_onnx_variants_smoke(finished_run):
    out = smoke("onnx_variants", finished_run)
    assert "speedup_batch1_int8" in out
    assert set(_results(finished_run, "onnx_variants")["variants"]) == {"fp32", "int8"}


def test_compression_smoke(finished_run):
    out = smoke("compression", finished_run)
    assert "int8 vs fp32:" in out and "wider CNNs" in out
    report = _results(finished_run, "compression")
    assert report["int8_study"]["rows"] and len(report["width_study"]) == 1


def test_train_vs_loop_smoke(finished_run):
    smoke("train_vs_loop", finished_run)
    report = _results(finished_run, "train_vs_loop")
    assert report["epochs"] == 1 and report["plain_samples_per_s"] > 0


def test_serve_smoke(finished_run):
    """One baseline server and one bento start: the package stage's core builds the served
    variant (compress.json's served_variant) into a scratch store."""
    out = smoke("serve", finished_run)
    assert "goals:" in out
    report = json.loads((finished_run / "build" / "bench-serve" / "serve.json").read_text())
    assert report["bento"]["1"]["requests_per_s"] > 0 and report["baseline"]["1"]["errors"] == 0


@pytest.mark.usefixtures("prefect_api")  # the two `flows.tune` runs use the session's server
def test_tune_smoke(finished_run):
    """A real study of 2 trials at once in a scratch git + DVC repository, the defaults first;
    the best trial vs the defaults, and an ensemble of the two."""
    out = smoke("tune", finished_run, timeout=900)
    assert "default params" in out and "2 workers" in out
    report = _results(finished_run, "tune")
    assert report["budget"]["smoke"] and report["budget"]["trials_per_study"] == [0, 2]
    assert report["default"]["trial"] == 0 and 0 <= report["default"]["test_accuracy"] <= 1
    assert report["tuned"]["val_accuracy"] >= report["default"]["val_accuracy"]
    assert report["two_workers"]["trials_per_hour"] > 0
    assert report["ensemble"]["ensemble"] is not None, report["ensemble"]
    assert not (finished_run / "build" / "bench-smoke" / "tune-repo").exists()  # cleaned up


def test_defaults_smoke(tmp_path):
    """Three tiny sets, one per data kind, through ingest's, train's and evaluate's cores with
    params.yaml's defaults (two epochs): the recipe's choices and the baselines are reported."""
    smoke("defaults", tmp_path)
    report = json.loads((tmp_path / "build" / "bench-smoke" / "defaults.json").read_text())
    rows = report["results"]
    assert {r["kind"] for r in rows.values()} == {"image", "table", "sequence"}
    assert {r["model"] for r in rows.values()} == {"cnn", "mlp", "gru"}  # train.model auto
    for row in rows.values():
        assert row["baselines"] and row["epochs_run"] == 2 and row["train_seconds"] > 0
        assert any(c.startswith("train.model ") for c in row["choices"])


def test_series_smoke(tmp_path):
    smoke("series", tmp_path)
    report = _results(tmp_path, "series")
    assert report["summary"]["2000"]["file_copied_over_rows"] > 10  # 32 copies against one
    assert {
        report["rows"][f"{layout}-2000"]["epoch"]["batches"] for layout in ("rows", "copied")
    } == {8}
    assert report["rows"]["encode-2000"]["same"]  # one pass encodes as value by value does
    ingested = report["rows"]["ingest-2000"]  # the stage on the CSV: read whole, in batches
    assert [ingested[m]["storage"] for m in ("memory", "shards")] == ["memory", "shards"]
    assert ingested["memory"]["windows"] == ingested["shards"]["windows"]
