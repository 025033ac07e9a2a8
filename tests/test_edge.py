"""The edge bento in hybrid mode: two real services on loopback, then the cloud one stopped.

The edge serves one tiny model, the cloud another (different weights), so every answer shows
which model gave it. The confidence threshold is baked in from params (the median top
probability of the edge model on the test images, so about half of them go to the cloud);
the cloud URL comes from ``CLOUD_URL`` in the edge's environment.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import serving, stop
from tests.tiny_models import (
    CLASS_NAMES,
    image,
    make_tiny_onnx,
    package_tiny,
    reference_probabilities,
)

IMAGES = np.stack([image(200 + i) for i in range(16)])


@pytest.fixture(scope="module")
def hybrid():
    """Cloud and edge servers; yields a dict with their URLs, processes and models."""
    root = Path(tempfile.mkdtemp(prefix="hybrid-"))
    cloud_root, edge_root = root / "cloud", root / "edge"
    edge_onnx = make_tiny_onnx(edge_root / "models" / "onnx" / "int8.onnx", seed=3)
    confidence = reference_probabilities(edge_onnx, IMAGES[:, None]).max(axis=1)
    threshold = float(np.median(confidence))
    cloud = package_tiny(cloud_root, seed=7, name="tiny-hybrid-cloud")
    edge = package_tiny(
        edge_root, name="tiny-hybrid", with_edge=True, edge={"confidence_threshold": threshold}
    ).edge
    with (
        serving(cloud.tag, root, ready=False) as cloud_server,
        serving(edge.tag, root, {"CLOUD_URL": cloud_server.url}, ready=False) as edge_server,
        httpx.Client(base_url=edge_server.url, timeout=30) as client,
    ):
        cloud_server.wait_ready()
        edge_server.wait_ready()
        yield {
            "client": client,
            "servers": {"cloud": cloud_server.process, "edge": edge_server.process},
            "cloud_url": cloud_server.url,
            "cloud_onnx": cloud_root / "models" / "onnx" / "int8.onnx",
            "edge_onnx": edge_onnx,
            "cloud": cloud,
            "edge": edge,
            "sure": confidence >= threshold,
            "threshold": threshold,
        }


def _probabilities(body: dict) -> np.ndarray:
    return np.array([body["probabilities"][n] for n in CLASS_NAMES])


def test_edge_info_shows_its_hybrid_settings(hybrid):
    info = hybrid["client"].post("/info").json()
    assert info["model_version"] == hybrid["edge"].model_version
    assert info["cloud_url"] == hybrid["cloud_url"]
    assert info["confidence_threshold"] == pytest.approx(hybrid["threshold"])


def test_confident_images_are_answered_by_the_edge_the_rest_by_the_cloud(hybrid):
    client = hybrid["client"]
    edge_p = reference_probabilities(hybrid["edge_onnx"], IMAGES[:, None])
    cloud_p = reference_probabilities(hybrid["cloud_onnx"], IMAGES[:, None])
    assert 0 < hybrid["sure"].sum() < len(IMAGES)  # both paths are exercised
    for i, img in enumerate(IMAGES):
        r = client.post("/predict", json={"image": img.tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["edge_confidence"] == pytest.approx(edge_p[i].max(), abs=1e-6)
        assert body["cloud_error"] is None
        if hybrid["sure"][i]:
            assert body["answered_by"] == "edge"
            assert body["model_version"] == hybrid["edge"].model_version
            np.testing.assert_allclose(_probabilities(body), edge_p[i], atol=1e-6)
        else:
            assert body["answered_by"] == "cloud"
            assert body["model_version"] == hybrid["cloud"].model_version
            np.testing.assert_allclose(_probabilities(body), cloud_p[i], atol=1e-6)


def test_a_batch_is_split_between_edge_and_cloud_and_keeps_its_order(hybrid):
    r = hybrid["client"].post("/predict_batch", json={"images": IMAGES[:4].tolist()})
    assert r.status_code == 200, r.text
    got = [p["answered_by"] for p in r.json()["predictions"]]
    assert got == ["edge" if sure else "cloud" for sure in hybrid["sure"][:4]]


@pytest.mark.parametrize(
    "route, payload, message",
    [
        ("/predict", {"image": [[1, 2], [3, 4]]}, "image: shape (2, 2) is not accepted"),
        ("/predict", {"image": [[float("nan")] * 8] * 8}, "image"),
        ("/predict", {"image": []}, "image: must not be empty"),
        ("/predict_batch", {"images": [IMAGES[0].tolist()] * 5}, "images: at most 4 images"),
        ("/predict_batch", {"images": [[["x"] * 8] * 8]}, "images[0]: every pixel"),
    ],
    ids=["shape", "nan", "empty", "too-many", "text"],
)
def test_edge_refuses_bad_input_like_the_cloud(hybrid, route, payload, message):
    client = hybrid["client"]
    r = client.post(route, content=_json(payload), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def _json(payload) -> bytes:
    import json

    return json.dumps(payload).encode()  # allow_nan: NaN goes out as the literal NaN


def test_edge_takes_json_only(hybrid):
    r = hybrid["client"].post("/predict", files={"image": ("a.png", b"x", "image/png")})
    assert r.status_code == 415


def test_with_the_cloud_stopped_the_edge_answers_itself_and_says_so(hybrid):
    """Last in this module: it stops the cloud server."""
    client = hybrid["client"]
    stop(hybrid["servers"]["cloud"])
    unsure = IMAGES[~hybrid["sure"]]
    sure = IMAGES[hybrid["sure"]]
    first = client.post("/predict", json={"image": unsure[0].tolist()})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["answered_by"] == "edge"
    assert body["model_version"] == hybrid["edge"].model_version
    assert "cloud unreachable at " + hybrid["cloud_url"] in body["cloud_error"]
    assert "answered by the edge" in body["cloud_error"]
    # Within cloud_retry_s the cloud is not asked again, and the answer says why.
    again = client.post("/predict", json={"image": unsure[1].tolist()})
    assert again.status_code == 200
    assert "not asked again" in again.json()["cloud_error"]
    assert again.elapsed.total_seconds() < 1
    confident = client.post("/predict", json={"image": sure[0].tolist()}).json()
    assert confident["answered_by"] == "edge" and confident["cloud_error"] is None


# -- in process and as a module -----------------------------------------------------------


def test_edge_without_a_cloud_answers_everything_itself(hybrid, monkeypatch):
    from deploy.edge_service import EdgeImageClassifier

    staged = Path(hybrid["edge_onnx"]).parents[2] / "build" / "bento" / "tiny-hybrid-edge"
    monkeypatch.setenv("MODEL_DIR", str(staged / "deploy" / "model"))
    monkeypatch.delenv("CLOUD_URL", raising=False)
    svc = EdgeImageClassifier.inner()
    unsure = IMAGES[~hybrid["sure"]][0]
    answer = asyncio.run(svc.predict(image=unsure.tolist()))
    assert answer.answered_by == "edge"
    assert answer.cloud_error.startswith("no cloud configured")


def test_a_bad_cloud_url_fails_at_start_up(hybrid, monkeypatch):
    from deploy.edge_service import EdgeImageClassifier

    staged = Path(hybrid["edge_onnx"]).parents[2] / "build" / "bento" / "tiny-hybrid-edge"
    monkeypatch.setenv("MODEL_DIR", str(staged / "deploy" / "model"))
    monkeypatch.setenv("CLOUD_URL", "ftp://somewhere")
    with pytest.raises(ValueError, match=r"must look like http://host:port \(CLOUD_URL\)"):
        EdgeImageClassifier.inner()


def test_edge_service_imports_no_training_stack():
    code = (
        "import sys, deploy.edge_service\n"
        "heavy = {'torch', 'lightning', 'prefect', 'PIL', 'dvc', 'onnx', 'pandas'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout
