"""Benchmark: a time series' splits stored as its rows (windows as views of them, cut as training
draws them: components/dataset.py ``SeriesWindows``) against the same windows stored copied,
one array of (N, T, F), as the pipeline stored them before.

    make bench-series                 (100k, 1M and 3M steps, ingest 10M too; about 5 minutes)
    python -m bench.series --smoke    (2k steps, every step in this process: does it run?)

For a synthetic series of N steps and 4 features (a seeded random walk, float32), windows of
``WINDOW`` (32) steps forecasting one step ahead, each step in a fresh process so that its peak
resident memory (``VmHWM``) is its own:

1. **store**: the windows made from the rows and written with ``components.dataset.save_arrays``
   (as ingest writes a split): the file's size, the time, the peak memory.
2. **epoch**: the stored split read back with ``load_arrays`` and fed to a linear forecaster
   (T x F -> 1, Adam) through ``components.lightning_module.data_loader``, shuffled, batch 256,
   as the train stage builds it: samples/s over the first ``BATCHES`` (400) batches, and the
   peak memory. The batches are the same in both layouts (tests/test_series_windows.py).

3. **ingest**: the whole ingest stage (``components.ingest.run``, as DVC runs it) on the series
   written as a CSV of N rows (a ``step`` column, the time index, and the 4 features; target
   ``f0``), read whole by pandas (``ingest.storage: memory``) against read in pyarrow batches
   into each split's rows (``shards``): seconds and peak memory. The CSV is written once, a
   100,000 rows at a time, to ``build/bench-series/cache`` (``--smoke``: the smoke folder).

4. **encode** (in this process): ingest's encoding of the N rows, plus a categorical column of
   8 labels (each column in one pass), against the per-value path the service takes for JSON
   rows: seconds, and equality.

Results go to ``bench/results/series.json`` (``--smoke``: ``build/bench-smoke/series.json``,
where the peaks are one process's, cumulative), with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import scale
from bench.scale import _load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "series.json"
SMOKE_RESULTS = Path("build") / "bench-smoke" / "series.json"  # under the folder it runs in
SIZES = (100_000, 1_000_000, 3_000_000)
INGEST_SIZES = (*SIZES, 10_000_000)  # ingest alone also at 10M (its whole read: ~2 GB)
SMOKE_SIZES = (2_000,)
FEATURES, WINDOW, BATCH, BATCHES = 4, 32, 256, 400
LAYOUTS = ("rows", "copied")


def _peak_mb() -> float:
    return round(scale._peak_mb(), 1)


def _series(n: int):
    rng = np.random.default_rng(0)
    rows = np.cumsum(rng.normal(size=(n, FEATURES)), axis=0, dtype=np.float64).astype(np.float32)
    return rows, rows[:, 0].copy()  # forecast the first feature


def step_store(work: Path, n: int, layout: str) -> dict:
    from components.dataset import ArraySet, save_arrays
    from components.kinds.sequence import windows

    rows, target = _series(n)
    started = time.perf_counter()
    split = windows(rows, target, WINDOW, 1)
    if layout == "copied":  # the layout before: every window a copy of its rows
        split = ArraySet(np.ascontiguousarray(split.x), split.y.copy())
    path = work / f"{layout}-{n}.npz"
    save_arrays(split, path)
    return {"seconds": round(time.perf_counter() - started, 3), "file_mb":
            round(path.stat().st_size / 1e6, 2), "windows": len(split),
            "peak_rss_mb": _peak_mb()}  # fmt: skip


def step_epoch(work: Path, n: int, layout: str) -> dict:
    import torch

    from components.dataset import load_arrays
    from components.lightning_module import data_loader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    split = load_arrays(work / f"{layout}-{n}.npz")
    loader = data_loader(split, BATCH, shuffle=True, seed=0, regression=True, batch_norm=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(WINDOW * FEATURES, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, started = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == BATCHES:
            break
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        opt.step()
        seen += len(y)
    seconds = time.perf_counter() - started
    return {"samples_per_s": round(seen / seconds), "batches": min(BATCHES, len(loader)),
            "peak_rss_mb": _peak_mb()}  # fmt: skip


def encode_seconds(n: int) -> dict:
    """Ingest's encoding of the series' rows and a categorical column (components/features.py
    ``encode_frame``: each column in one pass) against the per-value path the service takes for
    JSON rows, on the same frame: seconds of each, and that they agree."""
    import pandas as pd

    from components import features

    rows, _ = _series(n)
    frame = pd.DataFrame(rows, columns=[f"f{j}" for j in range(FEATURES)])
    labels = np.array(list("abcdefgh"), dtype=object)
    frame["regime"] = labels[np.random.default_rng(1).integers(0, len(labels), n)]
    spec = features.fit(frame, list(frame.columns))
    started = time.perf_counter()
    whole = features.encode_frame(frame, spec)
    one_pass = time.perf_counter() - started
    started = time.perf_counter()
    per_value = features.encode({c: frame[c].tolist() for c in frame.columns}, spec)
    loop = time.perf_counter() - started
    return {"one_pass_s": round(one_pass, 3), "per_value_s": round(loop, 3),
            "same": bool(np.array_equal(whole, per_value))}  # fmt: skip


INGEST_MODES = ("memory", "shards")  # ingest.storage: read whole by pandas, or in batches


def series_csv(cache: Path, n: int) -> Path:
    """The series of :func:`_series` as a CSV with a time index column, written once, a block
    of rows at a time (bounded memory)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path = cache / f"series-{n}.csv"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    rows, _ = _series(n)
    scratch = path.with_name(f".{path.name}")
    writer = None
    try:
        for lo in range(0, n, 100_000):
            block = rows[lo : lo + 100_000].astype(np.float64)
            table = pa.table({"step": np.arange(lo, lo + len(block)),
                              **{f"f{j}": block[:, j] for j in range(FEATURES)}})  # fmt: skip
            writer = writer or pcsv.CSVWriter(scratch, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    os.replace(scratch, path)
    return path


def step_ingest(work: Path, n: int, storage: str) -> dict:
    """The ingest stage on the series' CSV, stored as ``storage`` says."""
    from components import ingest
    from components.config import parse_params, read_params_file

    raw = read_params_file(ROOT / "params.yaml")
    root = work / f"ingest-{storage}-{n}"
    raw["paths"] = {k: str(root / v) for k, v in raw["paths"].items()}
    raw["paths"]["external_dir"] = str(work / "cache")
    raw["ingest"].update(source=str(series_csv(work / "cache", n)), kind="sequence",
                         target="f0", window=WINDOW, horizon=1, storage=storage)  # fmt: skip
    started = time.perf_counter()
    result = ingest.run(parse_params(raw))
    return {"seconds": round(time.perf_counter() - started, 2), "storage": result.storage,
            "windows": result.split_sizes, "peak_rss_mb": _peak_mb()}  # fmt: skip


STEPS = {"store": step_store, "epoch": step_epoch, "ingest": step_ingest}


def run_step(step: str, n: int, layout: str, work: Path, here: bool) -> dict:
    """One step in a fresh process (its own peak memory), or ``here`` (smoke)."""
    if here:
        return STEPS[step](work, n, layout)
    cmd = [sys.executable, "-m", "bench.series", "--child", step, "--n", str(n), "--layout",
           layout, "--work", str(work)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench.series {step} n={n} {layout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rows: dict, sizes) -> dict:
    """Per size: how many times smaller the stored file and the peaks are as rows, and the
    training throughput's ratio (rows over copied)."""
    out = {}
    for n in sizes:
        r, c = rows[f"rows-{n}"], rows[f"copied-{n}"]
        out[str(n)] = {
            "file_copied_over_rows": round(c["store"]["file_mb"] / r["store"]["file_mb"], 1),
            "store_peak_copied_over_rows": round(
                c["store"]["peak_rss_mb"] / r["store"]["peak_rss_mb"], 2
            ),
            "epoch_peak_mb": {
                "rows": r["epoch"]["peak_rss_mb"],
                "copied": c["epoch"]["peak_rss_mb"],
            },
            "throughput_rows_over_copied": round(
                r["epoch"]["samples_per_s"] / c["epoch"]["samples_per_s"], 2
            ),
            "ingest_peak_mb": {m: rows[f"ingest-{n}"][m]["peak_rss_mb"] for m in INGEST_MODES},
            "ingest_seconds": {m: rows[f"ingest-{n}"][m]["seconds"] for m in INGEST_MODES},
        }
    return out


def _report(result: dict) -> str:
    lines = [f"series of N steps x {FEATURES} features, windows of {WINDOW}: rows vs copied"]
    for key, row in result["rows"].items():
        if key.startswith("encode-"):
            lines.append(f"  {key:>16}: rows (and a category) encoded in one pass "
                         f"{row['one_pass_s']} s, value by "
                         f"value {row['per_value_s']} s (same: {row['same']})")  # fmt: skip
            continue
        if key.startswith("ingest-"):
            lines.append(f"  {key:>16}: " + "; ".join(
                f"{mode} {row[mode]['seconds']} s (peak {row[mode]['peak_rss_mb']} MB)"
                for mode in INGEST_MODES
            ))  # fmt: skip
            continue
        s, e = row["store"], row["epoch"]
        lines.append(
            f"  {key:>16}: file {s['file_mb']:>8} MB, store {s['seconds']:>6} s "
            f"(peak {s['peak_rss_mb']:>7} MB); epoch {e['samples_per_s']:>7} samples/s "
            f"(peak {e['peak_rss_mb']:>7} MB)"
        )
    for n, s in result["summary"].items():
        lines.append(
            f"  N={n}: file {s['file_copied_over_rows']}x smaller as rows; training throughput "
            f"rows/copied {s['throughput_rows_over_copied']}; epoch peak "
            f"{s['epoch_peak_mb']['rows']} MB against {s['epoch_peak_mb']['copied']} MB; ingest "
            f"peak in batches {s['ingest_peak_mb']['shards']} MB against "
            f"{s['ingest_peak_mb']['memory']} MB read whole"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2k steps, in this process")
    parser.add_argument("--sizes", type=int, nargs="+", help="series lengths (steps)")
    parser.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=LAYOUTS + INGEST_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(STEPS[args.child](Path(args.work), args.n, args.layout)))
        return {}
    sizes = tuple(args.sizes or (SMOKE_SIZES if args.smoke else SIZES))
    work = (SMOKE_RESULTS.parent if args.smoke else ROOT / "build" / "bench-series") / "series"
    work.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    rows = {}
    for n in sizes:
        for layout in LAYOUTS:
            rows[f"{layout}-{n}"] = {
                step: run_step(step, n, layout, work, args.smoke) for step in ("store", "epoch")
            }
            for f in work.glob(f"{layout}-{n}.npz"):
                f.unlink()  # up to 1.6 GB each: not kept
        rows[f"encode-{n}"] = encode_seconds(n)
    for n in args.sizes or (SMOKE_SIZES if args.smoke else INGEST_SIZES):
        series_csv(work / "cache", n)  # written before either run is timed
        rows[f"ingest-{n}"] = {
            mode: run_step("ingest", n, mode, work, args.smoke) for mode in INGEST_MODES
        }
        for mode in INGEST_MODES:
            shutil.rmtree(work / f"ingest-{mode}-{n}", ignore_errors=True)  # not kept
    result = {
        "what": "a series' split stored as its rows (windows are views) vs its windows copied; "
                "ingest of its CSV in batches vs read whole",
        "features": FEATURES, "window": WINDOW, "batch": BATCH, "batches_timed": BATCHES,
        "rows": rows,
        "summary": summarise(rows, sizes),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_before": load_before,
                    "load_after": _load()},
    }  # fmt: skip
    if args.smoke:  # the peaks of one process, each the run's so far
        result["note"] = "smoke: every step in one process"
    out = SMOKE_RESULTS if args.smoke else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{_report(result)}\nwritten to {out}")
    return result


if __name__ == "__main__":
    main()
