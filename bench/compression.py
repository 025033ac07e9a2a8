"""Benchmark: what compression buys on the default data, against the issue's goals, in one run.

    make bench            (after `make pipeline`: reads models/onnx and metrics/compress.json)
    python -m bench.compression --smoke   (2 timing rounds, one width: does it run?)

1. Goals, re-measured on the variants the compress stage wrote (more latency rounds than the
   stage takes, variants interleaved so load from other processes hits all alike):
   - int8 vs fp32: size ratio >= 3.5, batch-1 speed-up >= 1.5, accuracy drop <= 0.5 pt;
   - each smaller network (distilled and/or pruned) vs the teacher: >= 4x fewer parameters,
     accuracy drop <= 1 pt.
2. Why int8 is (not) faster here: the same fp32 model quantized in several ways (QDQ or
   QOperator, per-channel or per-tensor, reduce_range, the first conv block kept fp32,
   dynamic), each timed with ONNX Runtime's default optimisations and with its
   QDQPropagationTransformer disabled.
3. When int8 pays: fp32 vs static int8 latency of wider CNNs (random weights, calibrated on
   training images; latency does not depend on what the weights learnt).

Latency is ONNX Runtime on CPU with ``compress.latency_threads`` intra-op threads, the
fastest of many rounds (as in the stage; the medians are recorded too); the test
split has 1,000 images, so one image is 0.1 pt and the standard error of an accuracy near
97 % is about 0.5 pt: a 0.5-pt goal sits at the noise level of this data set. Results go to
stdout and bench/results/compression.json, with the machine's load average.

``--smoke`` (tests/test_bench.py) runs all three parts with 2 timing rounds of one call each
and only the default width (one export), and writes to ``build/bench-smoke/`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from components.compress import pick_calibration
from components.config import load_params
from components.dataset import DatasetMeta, load_arrays, meta_path, split_path
from components.onnx_files import INPUT_NAME, OUTPUT_NAME, run_onnx

ROUNDS = 60
MEDIANS: dict = {}  # the median round of the last measurement, per session and batch size
CALLS = {1: 30, 64: 3}
GOALS = {
    "int8_size_ratio": 3.5,
    "int8_speedup_batch1": 1.5,
    "int8_max_drop_points": 0.5,
    "student_param_ratio": 4.0,
    "student_max_drop_points": 1.0,
}


def session(path: Path, threads: int, disabled: tuple[str, ...] = ()):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
    )


def latencies(sessions: dict, image_shape, rounds: int | None = None) -> dict[str, dict]:
    """ms per call at batch 1 and 64 in the fastest round, as the compress stage measures it
    (sessions take turns within every round); the medians go to ``MEDIANS``."""
    rounds = rounds or ROUNDS
    rng = np.random.default_rng(0)
    feeds = {b: {INPUT_NAME: rng.integers(0, 256, (b, *image_shape)).astype(np.float32)}
             for b in CALLS}  # fmt: skip
    for s in sessions.values():
        for feed in feeds.values():
            for _ in range(5):
                s.run([OUTPUT_NAME], feed)
    times = {n: {b: [] for b in CALLS} for n in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            for b, feed in feeds.items():
                start = time.perf_counter()
                for _ in range(CALLS[b]):
                    s.run([OUTPUT_NAME], feed)
                times[name][b].append((time.perf_counter() - start) / CALLS[b])
    for n, per in times.items():
        MEDIANS[n] = {b: float(np.median(t) * 1000) for b, t in per.items()}
    return {n: {b: float(np.min(t) * 1000) for b, t in per.items()} for n, per in times.items()}


def accuracy(path: Path, test) -> float:
    return float((run_onnx(path, test.x).argmax(axis=1) == test.y).mean())


# ---------------------------------------------------------------- 1. the goals


def goals(onnx_dir: Path, compressed: dict, test, shape, threads: int) -> dict:
    variants = compressed["variants"]
    paths = {n: onnx_dir / f"{n}.onnx" for n in variants}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found: run `make pipeline` first")
    lat = latencies({n: session(p, threads) for n, p in paths.items()}, shape)
    rows = {}
    for name, path in paths.items():
        rows[name] = {
            "steps": variants[name].get("steps", ""),
            "params": variants[name].get("params"),
            "size_bytes": path.stat().st_size,
            "latency_ms_batch1": lat[name][1],
            "latency_ms_batch64": lat[name][64],
            "median_ms_batch1": MEDIANS[name][1],
            "median_ms_batch64": MEDIANS[name][64],
            "accuracy": accuracy(path, test),
        }
    fp32, int8 = rows["fp32"], rows["int8"]
    out = {
        "variants": rows,
        "int8_vs_fp32": {
            "size_ratio": fp32["size_bytes"] / int8["size_bytes"],
            "speedup_batch1": fp32["latency_ms_batch1"] / int8["latency_ms_batch1"],
            "speedup_batch64": fp32["latency_ms_batch64"] / int8["latency_ms_batch64"],
            "speedup_batch1_medians": fp32["median_ms_batch1"] / int8["median_ms_batch1"],
            "accuracy_drop_points": 100 * (fp32["accuracy"] - int8["accuracy"]),
        },
        "smaller_networks_vs_teacher": {},
    }
    r = out["int8_vs_fp32"]
    r["met"] = {
        "size": r["size_ratio"] >= GOALS["int8_size_ratio"],
        "speed_batch1": r["speedup_batch1"] >= GOALS["int8_speedup_batch1"],
        "accuracy": r["accuracy_drop_points"] <= GOALS["int8_max_drop_points"],
    }
    for name, row in rows.items():
        steps = row["steps"] or ""
        smaller = any(m in steps for m in ("distil", "student_alone", "prune_structured"))
        if not smaller or not row["params"]:
            continue
        ratio = fp32["params"] / row["params"]
        drop = 100 * (fp32["accuracy"] - row["accuracy"])
        out["smaller_networks_vs_teacher"][name] = {
            "steps": steps,
            "param_ratio": ratio,
            "accuracy_drop_points": drop,
            "size_ratio": fp32["size_bytes"] / row["size_bytes"],
            "speedup_batch1": fp32["latency_ms_batch1"] / row["latency_ms_batch1"],
            "met": ratio >= GOALS["student_param_ratio"]
            and drop <= GOALS["student_max_drop_points"],
        }
    return out


# ---------------------------------------------------------------- 2. int8, several ways


def int8_study(fp32_path: Path, calibration, test, shape, threads, qparams, tmp: Path) -> dict:
    from components import quantize

    first_block = quantize.first_block_nodes(fp32_path)
    configs = {
        "qdq per-channel (stage default)": ({}, ()),
        "qdq per-tensor": ({"per_channel": False}, ()),
        "qdq reduce_range": ({"reduce_range": True}, ()),
        "qoperator per-channel": ({"format": "qoperator"}, ()),
        "qdq, first block fp32": ({}, first_block),
        "qoperator, first block fp32": ({"format": "qoperator"}, first_block),
    }
    paths = {"fp32": fp32_path}
    for i, (name, (update, exclude)) in enumerate(configs.items()):
        paths[name] = tmp / f"s{i}.onnx"
        quantize.quantize_static(
            fp32_path, paths[name], calibration, qparams.model_copy(update=update), exclude
        )
    for name, ops in (("dynamic MatMul/Gemm", ("MatMul", "Gemm")),
                      ("dynamic all (Conv too)", ("Conv", "MatMul", "Gemm"))):  # fmt: skip
        paths[name] = tmp / f"d{len(paths)}.onnx"
        quantize.quantize_dynamic(
            fp32_path, paths[name], qparams.model_copy(update={"dynamic_op_types": ops})
        )
    no_prop = ("QDQPropagationTransformer",)
    sessions = {}
    for name, path in paths.items():
        sessions[(name, "default")] = session(path, threads)
        sessions[(name, "no QDQ propagation")] = session(path, threads, no_prop)
    lat = latencies(sessions, shape, rounds=ROUNDS // 2)
    rows = []
    for (name, opts), t in lat.items():
        rows.append({
            "config": name,
            "session": opts,
            "size_bytes": paths[name].stat().st_size,
            "latency_ms_batch1": t[1],
            "latency_ms_batch64": t[64],
            "accuracy": accuracy(paths[name], test),
        })  # fmt: skip
    return {"first_block_nodes": list(first_block), "rows": rows}


# ---------------------------------------------------------------- 3. wider networks


def width_study(
    meta, params, calibration, shape, threads, tmp: Path, factors=(1, 2, 4)
) -> list[dict]:
    import torch

    from components import quantize
    from components.model import build_model
    from components.onnx_files import export_onnx
    from components.recipe import resolve_for
    from components.train import net_config

    base = resolve_for(params.train, meta).params  # the network the train stage builds
    rows = []
    for factor in factors:
        train = base.model_copy(update={
            "channels": tuple(c * factor for c in base.channels),
            "hidden_units": tuple(h * factor for h in base.hidden_units),
        })  # fmt: skip
        torch.manual_seed(0)
        net = build_model(net_config(meta, train)).eval()
        fp32, int8 = tmp / f"w{factor}.onnx", tmp / f"w{factor}_int8.onnx"
        export_onnx(net, shape, fp32, params.compress.onnx_tolerance)
        quantize.quantize_static(fp32, int8, calibration, params.compress.quantization)
        lat = latencies({"fp32": session(fp32, threads), "int8": session(int8, threads)}, shape,
                        rounds=ROUNDS // 2)  # fmt: skip
        rows.append({
            "width_factor": factor,
            "channels": list(train.channels),
            "hidden_units": list(train.hidden_units),
            "params": sum(p.numel() for p in net.parameters()),
            "fp32_ms_batch1": lat["fp32"][1], "int8_ms_batch1": lat["int8"][1],
            "fp32_ms_batch64": lat["fp32"][64], "int8_ms_batch64": lat["int8"][64],
            "speedup_batch1": lat["fp32"][1] / lat["int8"][1],
            "speedup_batch64": lat["fp32"][64] / lat["int8"][64],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 rounds, one width, in build/")
    args = parser.parse_args(argv)
    if args.smoke:
        ROUNDS = 2
        CALLS.update({1: 1, 64: 1})
    params = load_params()
    paths, cfg = params.paths, params.compress
    compressed = json.loads((Path(paths.metrics_dir) / "compress.json").read_text())
    meta = DatasetMeta.load(meta_path(paths.prepared_dir))
    shape = tuple(meta.input_shape)
    test = load_arrays(split_path(paths.prepared_dir, "test"))
    train = load_arrays(split_path(paths.prepared_dir, "train"))
    calibration = pick_calibration(train, cfg.calibration_samples)
    onnx_dir = Path(paths.model_dir) / "onnx"
    threads = cfg.latency_threads

    load_before = os.getloadavg()
    started = time.perf_counter()
    result = goals(onnx_dir, compressed, test, shape, threads)
    with tempfile.TemporaryDirectory() as tmp:
        study = int8_study(onnx_dir / "fp32.onnx", calibration, test, shape, threads,
                           cfg.quantization, Path(tmp))  # fmt: skip
        factors = (1,) if args.smoke else (1, 2, 4)
        widths = width_study(meta, params, calibration, shape, threads, Path(tmp), factors)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "onnxruntime": ort.__version__,
            "threads": threads,
        },
        "goals": GOALS,
        **result,
        "int8_study": study,
        "width_study": widths,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path("build/bench-smoke" if args.smoke else "bench/results") / "compression.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"ONNX Runtime {ort.__version__}, {threads} thread(s), load average "
        f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"\n{'variant':22} {'params':>8} {'KiB':>7} {'b1 ms':>8} {'b64 ms':>8} {'accuracy':>8}")
    for name, r in result["variants"].items():
        print(
            f"{name:22} {r['params'] or 0:8d} {r['size_bytes'] / 1024:7.1f} "
            f"{r['latency_ms_batch1']:8.4f} {r['latency_ms_batch64']:8.3f} {r['accuracy']:8.4f}"
        )
    q = result["int8_vs_fp32"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("\nint8 vs fp32:")
    print(f"  size ratio       {q['size_ratio']:.2f}x  (goal >= 3.5: {met(q['met']['size'])})")
    print(
        f"  batch-1 speed-up {q['speedup_batch1']:.2f}x  "
        f"(goal >= 1.5: {met(q['met']['speed_batch1'])}); batch 64: {q['speedup_batch64']:.2f}x"
    )
    print(
        f"  accuracy drop    {q['accuracy_drop_points']:+.2f} pt "
        f"(goal <= 0.5: {met(q['met']['accuracy'])})"
    )
    print("\nsmaller networks vs the teacher (goal: >= 4x fewer parameters, <= 1 pt drop):")
    for name, s in result["smaller_networks_vs_teacher"].items():
        print(
            f"  {name:22} {s['param_ratio']:5.2f}x fewer params, drop "
            f"{s['accuracy_drop_points']:+.2f} pt, {s['size_ratio']:5.2f}x smaller, "
            f"{s['speedup_batch1']:.2f}x at batch 1: {met(s['met'])}  [{s['steps']}]"
        )
    print("\nint8 configurations of fp32.onnx (batch-1 / batch-64 ms):")
    for r in study["rows"]:
        print(
            f"  {r['config']:32} {r['session']:20} {r['size_bytes'] / 1024:6.1f} KiB "
            f"{r['latency_ms_batch1']:7.4f} {r['latency_ms_batch64']:7.3f}  acc {r['accuracy']:.4f}"
        )
    print("\nwider CNNs, fp32 vs static int8 (speed-up at batch 1 / 64):")
    for r in widths:
        print(
            f"  channels {str(r['channels']):10} hidden {str(r['hidden_units']):6} "
            f"{r['params']:8d} params: {r['speedup_batch1']:.2f}x / {r['speedup_batch64']:.2f}x"
        )
    print(f"\nwritten to {out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
