"""Ensembles: k trained networks averaged into one ONNX model, checked, measured and gated.

The members are the pipeline's own model directories (``model.pt`` + ``model.json``): the top-k
trials of a tuning study (``flows/tune.py`` restores them from their DVC experiments), or k
seeds of one config. :class:`AveragedProbabilities` averages their softmax probabilities,
uniformly or weighted by their validation scores, and answers the **log** of that average
under the output name ``logits``: every consumer of the pipeline's ONNX models takes a softmax
or an argmax of it, and ``softmax(log p) = p``, so the served probabilities are exactly the
members' averaged probabilities and nothing downstream needs to know it is an ensemble.

    python -m components.ensemble --member runs/a/models --member runs/b/models \
        --out build/ensemble/ensemble.onnx [--weights 0.6 0.4]

The export is checked against the members' own outputs (averaged here, independently of the
exported module); it is measured and gated on the test split like any variant (the absolute
gates of ``evaluate``), beside the best single member (accuracy, macro F1, size, latency at
batch 1); and it packages with the package stage's own :func:`components.package.package`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("pipeline.ensemble")

ENSEMBLE_VARIANT = "ensemble"
CHECK_TOLERANCE = 1e-5  # max |probability difference| between the ONNX file and the members
LATENCY_ROUNDS = 10


class AveragedProbabilities(nn.Module):
    """``log(sum_i w_i * softmax(member_i(x)))`` for weights that sum to 1."""

    def __init__(self, members: list[nn.Module], weights: list[float] | None = None):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} members")
        if any(not w > 0 for w in weights):
            raise ValueError(f"ensemble weights must be positive, got {weights}")
        self.members = nn.ModuleList(members)
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", (w / w.sum()).reshape(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members])
        return torch.log((probs * self.weights).sum(dim=0).clamp_min(1e-30))


def weights_from_scores(scores: list[float], metric: str, weighting: str) -> list[float]:
    """Member weights: equal, or proportional to the validation score (accuracy as it is, a
    loss inverted), normalised to sum to 1."""
    if weighting == "uniform":
        return [1 / len(scores)] * len(scores)
    raw = [1 / max(s, 1e-9) for s in scores] if metric.endswith("loss") else list(scores)
    raw = [max(r, 1e-9) for r in raw]
    return [r / sum(raw) for r in raw]


def _input_shape(card) -> tuple[int, ...]:
    return tuple(int(n) for n in card.config["input_shape"])


def load_members(model_dirs: list[Path]) -> tuple[list[nn.Module], dict]:
    """Load every member (weights only); they must take the same input and know the same
    classes. Returns the networks and the first member's description."""
    from components.model import load_model

    nets, first = [], None
    for model_dir in model_dirs:
        net, described = load_model(Path(model_dir))
        task = described.task
        if task != "classification":
            raise ValueError(
                f"ensemble member {model_dir} is a {task} model: ensembles average class "
                "probabilities, so every member must be a classifier"
            )
        if first is None:
            first = described
        else:
            for what, get in (
                ("input shape", _input_shape),
                ("classes", lambda d: d.class_names),
                ("data kind", lambda d: d.kind),
                # Members must read the same features: one fitted transform for all of them.
                ("input preprocessing", lambda d: d.preprocess),
            ):
                if get(described) != get(first):
                    raise ValueError(
                        f"ensemble member {model_dir} has {what} {get(described)}, the first "
                        f"member {get(first)}: members must solve the same task"
                    )
        nets.append(net.eval())
    return nets, first


def restore_files(root: Path, rev: str, files: list[str | Path], dest: Path) -> Path:
    """Files of a DVC experiment (a git rev; DVC outputs come from the cache) into ``dest``,
    by their names: a trial's ``model.pt`` and ``model.json``, or its test split."""
    import dvc.api

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for file in files:
        path = Path(file).as_posix()
        with dvc.api.open(path, repo=str(root), rev=rev, mode="rb") as src:
            (dest / Path(file).name).write_bytes(src.read())
    return dest


@torch.no_grad()
def averaged_probabilities(nets: list[nn.Module], weights: list[float], x) -> np.ndarray:
    """The reference: each member's own softmax, averaged here with the normalised weights."""
    from components.model import predict_logits

    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    probs = [torch.softmax(predict_logits(n, x).double(), dim=1).numpy() for n in nets]
    return sum(wi * p for wi, p in zip(w, probs, strict=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def export_ensemble(
    nets: list[nn.Module], weights: list[float], input_shape: tuple[int, ...], path: Path
) -> float:
    """Write ONE ONNX file (dynamic batch) and check that the softmax of its output equals the
    members' averaged probabilities; returns the largest difference found."""
    from components.onnx_files import export_graph, run_onnx

    module = AveragedProbabilities(nets, weights).eval()
    export_graph(module, input_shape, Path(path))
    probe = torch.randint(0, 256, (7, *input_shape)).float()
    expected = averaged_probabilities(nets, weights, probe)
    worst = float(np.abs(softmax(run_onnx(Path(path), probe.numpy())) - expected).max())
    if not worst <= CHECK_TOLERANCE:
        raise ValueError(
            f"{Path(path).name}: its probabilities differ from the members' average by "
            f"{worst:.2e} (more than {CHECK_TOLERANCE:.0e})"
        )
    return worst


def measure(paths: dict[str, Path], test, class_names, input_shape, threads: int = 1) -> dict:
    """Test accuracy and macro F1, file size and ONNX Runtime latency at batch 1 and 64."""
    from components.metrics import classification_metrics
    from components.onnx_files import measure_latencies, run_onnx

    latencies = measure_latencies(paths, input_shape, threads, rounds=LATENCY_ROUNDS)
    out = {}
    for name, path in paths.items():
        outputs = test.map_x(lambda x, path=path: run_onnx(path, x))
        m = classification_metrics(test.y, outputs.argmax(axis=1), class_names)
        out[name] = {
            "accuracy": round(m["accuracy"], 6),
            "macro_f1": round(m["macro_f1"], 6),
            "min_class_recall": round(min(c["recall"] for c in m["per_class"].values()), 6),
            "per_class": m["per_class"],
            "size_bytes": Path(path).stat().st_size,
            "latency_ms_batch1": round(latencies[name][1], 4),
            "latency_ms_batch64": round(latencies[name][64], 4),
            "path": str(path),
        }
    return out


def build_and_measure(
    member_dirs: list[Path],
    weights: list[float],
    params,
    out_dir: Path,
    names: list[str] | None = None,
    package: bool = False,
    data_dir: Path | None = None,
) -> dict:
    """The ensemble of ``member_dirs`` (the first is the best single model): exported, checked,
    measured beside that best single model on the test split, gated like any variant (the
    absolute gates of ``evaluate``), and packaged into its own bento when asked and it passes.
    ``data_dir`` holds the data set's ``meta.json`` and ``test.npz`` (default: the workspace's
    ``paths.prepared_dir``). Returns the summary written to ``out_dir/ensemble.json``."""
    from components.dataset import DatasetMeta, load_split, meta_path
    from components.onnx_files import export_onnx
    from components.stage import write_json
    from components.tasks import CLASSIFICATION

    paths = params.paths
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nets, described = load_members(member_dirs)
    shape = _input_shape(described)
    data_dir = Path(data_dir or paths.prepared_dir)
    meta_file = meta_path(data_dir)
    meta = DatasetMeta.load(meta_file)
    test = load_split(data_dir, "test")

    onnx_file = out_dir / f"{ENSEMBLE_VARIANT}.onnx"
    diff = export_ensemble(nets, weights, shape, onnx_file)
    single_file = out_dir / "best_single.onnx"
    export_onnx(nets[0], shape, single_file, params.compress.onnx_tolerance)
    measured = measure(
        {"best_single": single_file, ENSEMBLE_VARIANT: onnx_file},
        test,
        meta.class_names,
        shape,
        params.compress.latency_threads,
    )
    ens, single = measured[ENSEMBLE_VARIANT], measured["best_single"]
    gates = CLASSIFICATION.gates(ens, params.evaluate)
    passed = all(g.passed for g in gates)
    gain = ens["accuracy"] - single["accuracy"]
    verdict = (
        f"{'PASS' if passed else 'FAIL'}: {len(nets)} members, accuracy {ens['accuracy']:.4f} "
        f"vs {single['accuracy']:.4f} for the best single model ({100 * gain:+.2f} pt), "
        f"{ens['size_bytes'] / max(single['size_bytes'], 1):.1f}x its size, "
        f"{ens['latency_ms_batch1'] / max(single['latency_ms_batch1'], 1e-9):.1f}x its "
        f"batch-1 latency; gates: " + "; ".join(g.reason for g in gates)
    )
    for m in measured.values():
        m.pop("per_class")
    summary = {
        "members": [str(d) for d in member_dirs],
        "member_names": names or [Path(d).name for d in member_dirs],
        "weights": [round(w, 6) for w in weights],
        "onnx": str(onnx_file),
        "onnx_check_max_prob_diff": diff,
        "ensemble": ens,
        "best_single": single,
        "gates": {g.name: g.to_json() for g in gates},
        "passed": passed,
        "verdict": verdict,
    }
    if package and passed:
        summary["bento"] = package_ensemble(onnx_file, meta_file, params, out_dir, ens)
    write_json(out_dir / "ensemble.json", summary)
    log.info("%s", verdict)
    return summary


def package_ensemble(onnx_file: Path, meta_file: Path, params, out_dir: Path, metrics: dict):
    """The package stage's own core builds a bento serving the ensemble (its own bento name,
    ``<package.bento_name>-ensemble``, so the pipeline's bentos are untouched)."""
    from components.package import package

    settings = params.package.model_copy(
        update={"bento_name": f"{params.package.bento_name}-{ENSEMBLE_VARIANT}"}
    )
    result = package(
        onnx_file,
        meta_file,
        settings,
        served_variant=ENSEMBLE_VARIANT,
        staging_dir=Path(out_dir) / "bento-staging",
        artefacts_dir=Path(out_dir) / "artefacts",
        metrics={k: metrics[k] for k in ("accuracy", "macro_f1") if k in metrics},
    )
    return result.tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Average trained models into one ONNX model.")
    parser.add_argument(
        "--member",
        action="append",
        required=True,
        type=Path,
        help="a model directory (model.pt + model.json); repeat, 2 or more",
    )
    parser.add_argument("--weights", nargs="+", type=float, help="one positive weight per member")
    parser.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    args = parser.parse_args(argv)
    try:
        nets, described = load_members(args.member)
        weights = args.weights or [1.0] * len(nets)
        diff = export_ensemble(nets, weights, _input_shape(described), args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ensemble: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {len(nets)} members, weights {weights}, "
        f"max probability difference vs the members {diff:.1e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
