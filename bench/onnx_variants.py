"""Benchmark: int8 vs fp32 ONNX models of the last pipeline run, measured in one run.

    make bench            (after `make pipeline`)
    python -m bench.onnx_variants --smoke   (a few timing calls: does it run?)

Reports file size, median latency at batch 1 and batch 64 (ONNX Runtime, 1 thread) and test
accuracy of each variant, then the ratios int8/fp32. Results go to stdout and to
bench/results/onnx_variants.json. Latency depends on the machine: compare ratios, not times.
``--smoke`` (tests/test_bench.py) times 5 calls instead of hundreds and writes to
``build/bench-smoke/`` instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from components.compress import VARIANTS
from components.config import load_params
from components.dataset import load_arrays, split_path
from components.onnx_files import INPUT_NAME, OUTPUT_NAME, open_session, run_onnx


def median_ms(session, x: np.ndarray, repeats: int) -> float:
    for _ in range(10):
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few calls, results in build/")
    args = parser.parse_args(argv)
    repeats = (5, 5) if args.smoke else (500, 100)
    params = load_params()
    onnx_dir = Path(params.paths.model_dir) / "onnx"
    test = load_arrays(split_path(params.paths.prepared_dir, "test"))
    rows = {}
    for name in VARIANTS:
        path = onnx_dir / f"{name}.onnx"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run `make pipeline` first")
        session = open_session(path)
        accuracy = float((run_onnx(path, test.x).argmax(axis=1) == test.y).mean())
        rows[name] = {
            "size_bytes": path.stat().st_size,
            "latency_ms_batch1": median_ms(session, test.x[:1].astype(np.float32), repeats[0]),
            "latency_ms_batch64": median_ms(session, test.x[:64].astype(np.float32), repeats[1]),
            "test_accuracy": accuracy,
        }
    fp32, int8 = rows["fp32"], rows["int8"]
    ratios = {
        "size_fp32_over_int8": fp32["size_bytes"] / int8["size_bytes"],
        "speedup_batch1_int8": fp32["latency_ms_batch1"] / int8["latency_ms_batch1"],
        "speedup_batch64_int8": fp32["latency_ms_batch64"] / int8["latency_ms_batch64"],
        "accuracy_drop_points": 100 * (fp32["test_accuracy"] - int8["test_accuracy"]),
    }
    report = {
        "machine": platform.processor() or platform.machine(),
        "variants": rows,
        "ratios": ratios,
    }
    out = Path("build/bench-smoke" if args.smoke else "bench/results") / "onnx_variants.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'variant':8} {'size KiB':>9} {'b1 ms':>8} {'b64 ms':>8} {'accuracy':>9}")
    for name, r in rows.items():
        print(
            f"{name:8} {r['size_bytes'] / 1024:9.1f} {r['latency_ms_batch1']:8.3f} "
            f"{r['latency_ms_batch64']:8.3f} {r['test_accuracy']:9.4f}"
        )
    for key, value in ratios.items():
        print(f"{key:24} {value:.3f}")


if __name__ == "__main__":
    main()
