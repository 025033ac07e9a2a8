"""Ensembles: one ONNX file whose probabilities are its members' averaged probabilities, checked
against the members' own outputs, and served from a real bento by `bentoml serve`."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from components.ensemble import (
    AveragedProbabilities,
    build_and_measure,
    export_ensemble,
    load_members,
    package_ensemble,
    softmax,
    weights_from_scores,
)
from components.model import NetConfig, build_model, save_model

SHAPE = (1, 8, 8)
CLASSES = ("circle", "square", "cross")


def tiny_member(root: Path, seed: int, family: str = "cnn", classes=CLASSES) -> Path:
    """A small untrained network of the pipeline's own kind, saved as the train stage does."""
    names = {f.name for f in dataclasses.fields(NetConfig)}
    shape_key = "input_shape" if "input_shape" in names else "image_shape"
    config = NetConfig(
        family=family, num_classes=len(classes), channels=(4,), hidden_units=(8,),
        dropout=0.0, batch_norm=False, activation="relu", **{shape_key: SHAPE},
    )  # fmt: skip
    torch.manual_seed(seed)
    net = build_model(config)
    out = root / f"member-{seed}-{family}"
    save_model(
        net, config, out,
        extra={
            "class_names": list(classes), "trained_epochs": 1, "kind": "image",
            "task": "classification", "target": "", "feature_names": [], "preprocess": None,
        },
    )  # fmt: skip
    return out


def members_own_average(dirs, weights, x) -> np.ndarray:
    """Each member's own softmax, through its own forward pass, averaged here."""
    nets, _ = load_members(dirs)
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    with torch.no_grad():
        probs = [torch.softmax(n(torch.as_tensor(x).float()), 1).double().numpy() for n in nets]
    return sum(wi * p for wi, p in zip(w, probs, strict=True))


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"inputs": x.astype(np.float32)})[0]


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.8, 0.2]])
def test_one_onnx_file_gives_the_members_averaged_probabilities(tmp_path, weights):
    dirs = [tiny_member(tmp_path, 0), tiny_member(tmp_path, 1, family="mlp")]
    out = tmp_path / "ensemble.onnx"
    nets, _ = load_members(dirs)
    diff = export_ensemble(nets, weights, SHAPE, out)
    assert diff <= 1e-5
    x = np.random.default_rng(3).integers(0, 256, (11, *SHAPE)).astype(np.float32)
    probs = softmax(run_onnx(out, x))  # what the service does with the model's output
    expected = members_own_average(dirs, weights, x)
    assert np.abs(probs - expected).max() < 1e-5
    assert np.allclose(probs.sum(1), 1, atol=1e-6)
    # the members disagree, so the average is not just one of them
    single = members_own_average(dirs[:1], [1.0], x)
    assert np.abs(probs - single).max() > 1e-3


def test_weights_from_validation_scores():
    assert weights_from_scores([0.9, 0.6], "val_accuracy", "uniform") == [0.5, 0.5]
    w = weights_from_scores([0.9, 0.6], "val_accuracy", "val_score")
    assert w == pytest.approx([0.6, 0.4])
    w = weights_from_scores([0.2, 0.4], "val_loss", "val_score")  # lower loss, more weight
    assert w == pytest.approx([2 / 3, 1 / 3])


def test_bad_ensembles_are_refused(tmp_path):
    a = tiny_member(tmp_path, 0)
    with pytest.raises(ValueError, match="at least 2 members"):
        AveragedProbabilities(load_members([a])[0])
    other = tiny_member(tmp_path, 1, classes=("a", "b", "c"))
    with pytest.raises(ValueError, match="classes"):
        load_members([a, other])
    nets, _ = load_members([a, tiny_member(tmp_path, 2)])
    with pytest.raises(ValueError, match="positive"):
        AveragedProbabilities(nets, [1.0, 0.0])


@pytest.mark.slow
def test_the_ensemble_is_measured_gated_and_serves_from_a_bento(tmp_path, tiny_params):
    from components.dataset import DatasetMeta
    from tests.conftest import make_images
    from tests.helpers import serving

    data = tmp_path / "prepared"
    data.mkdir()
    x, y = make_images(per_class=6, seed=5)
    np.savez(data / "test.npz", x=x[:, None], y=y)
    DatasetMeta(CLASSES, SHAPE, "test", {"test": len(y)}).save(data / "meta.json")
    dirs = [tiny_member(tmp_path, 0), tiny_member(tmp_path, 1)]
    params = tiny_params.model_copy(
        update={"evaluate": tiny_params.evaluate.model_copy(
            update={"min_accuracy": 0.0, "min_macro_f1": 0.0, "min_class_recall": 0.0})}
    )  # fmt: skip
    summary = build_and_measure(dirs, [0.5, 0.5], params, tmp_path / "out", data_dir=data)
    assert summary["passed"], summary["verdict"]
    for key in ("ensemble", "best_single"):
        assert summary[key]["size_bytes"] > 0 and summary[key]["latency_ms_batch1"] > 0
    assert summary["ensemble"]["size_bytes"] > summary["best_single"]["size_bytes"]
    assert json.loads((tmp_path / "out" / "ensemble.json").read_text())["passed"]

    onnx_file = Path(summary["onnx"])
    tag = package_ensemble(onnx_file, data / "meta.json", params, tmp_path / "out", {})
    cwd = Path(tempfile.mkdtemp(prefix="serve-ensemble-"))
    with serving(tag, cwd) as server:
        import httpx

        images = x[:4]
        reply = httpx.post(
            f"{server.url}/predict_batch", json={"images": images.tolist()}, timeout=30
        )
        assert reply.status_code == 200, reply.text
        served = np.array([[p["probabilities"][c] for c in CLASSES]
                           for p in reply.json()["predictions"]])  # fmt: skip
        expected = members_own_average(dirs, [0.5, 0.5], images[:, None].astype(np.float32))
        assert np.abs(served - expected).max() < 1e-4
        info = httpx.post(f"{server.url}/info", json={}, timeout=10).json()
        assert "ensemble" in json.dumps(info)
