"""The service through its real HTTP server: right answers, and a 4xx (never a 5xx) for bad input.

One server for the module, started from a bento that the package stage builds from a tiny ONNX
model (3 classes of 1x8x8 images, max batch 4): the very layout that ships. Starting it takes
a few seconds; every request after that takes milliseconds.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
if "BENTOML_HOME" not in os.environ:  # tests/conftest.py sets it; this is for running alone
    import tempfile

    os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-tests-")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.test_package import CLASS_NAMES, IMAGE_SHAPE, package_tiny  # noqa: E402

MAX_BATCH = 4  # what package_tiny writes into model.json
H, W = IMAGE_SHAPE[1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W)).astype(np.float64)


def reference_probabilities(onnx_file: Path, images: np.ndarray) -> np.ndarray:
    """What onnxruntime in this process says for (N, 1, H, W) raw-pixel images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": images.astype(np.float32)})[0].astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, httpx client, path of the served ONNX model, package result)."""
    import bentoml

    root = tmp_path_factory.mktemp("service")
    result = package_tiny(root, seed=7, name="tiny-served")
    bento_dir = bentoml.bentos.get(result.tag).path
    # Serve the bento by its folder: the same files `bentoml serve <tag>` would use, and no
    # dependence on which store the server process resolves.
    os.environ.pop("MODEL_DIR", None)
    with bentoml.serve(bento_dir, host="127.0.0.1", port=free_port()) as server:
        with bentoml.SyncHTTPClient(server.url, server_ready_timeout=60):
            pass  # waits for /readyz
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield server.url, client, root / "models" / "onnx" / "int8.onnx", result


# -- answers --------------------------------------------------------------------------------


def test_health_endpoints(served):
    _, client, _, _ = served
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200


def test_predict_matches_onnxruntime_in_process(served):
    _, client, onnx_file, result = served
    images = np.stack([image(s) for s in range(3)])
    expected = reference_probabilities(onnx_file, images[:, None])
    for img, probs in zip(images, expected, strict=True):
        r = client.post("/predict", json={"image": img.tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"label", "class_index", "probabilities", "model_version"}
        assert body["class_index"] == int(probs.argmax())
        assert body["label"] == CLASS_NAMES[body["class_index"]]
        got = np.array([body["probabilities"][n] for n in CLASS_NAMES])
        np.testing.assert_allclose(got, probs, atol=1e-6)
        assert body["model_version"] == result.model_version


def test_predict_accepts_hw_chw_and_hwc_layouts(served):
    _, client, _, _ = served
    img = image(11)
    answers = [
        client.post("/predict", json={"image": layout}).json()
        for layout in (img.tolist(), img[None].tolist(), img[:, :, None].tolist())
    ]
    assert answers[0] == answers[1] == answers[2]


def test_predict_accepts_integer_and_float_pixels(served):
    _, client, _, _ = served
    img = image(12)
    as_int = client.post("/predict", json={"image": img.astype(int).tolist()}).json()
    as_float = client.post("/predict", json={"image": img.tolist()}).json()
    assert as_int == as_float


def test_predict_batch_matches_single_predictions(served):
    _, client, _, _ = served
    images = [image(s).tolist() for s in range(MAX_BATCH)]
    r = client.post("/predict_batch", json={"images": images})
    assert r.status_code == 200, r.text
    batch = r.json()["predictions"]
    singles = [client.post("/predict", json={"image": img}).json() for img in images]
    assert len(batch) == MAX_BATCH
    for b, s in zip(batch, singles, strict=True):
        assert b["class_index"] == s["class_index"]
        for name in CLASS_NAMES:
            assert b["probabilities"][name] == pytest.approx(s["probabilities"][name], abs=1e-6)


def test_bentoml_client_works(served):
    import bentoml

    url, _, _, _ = served
    with bentoml.SyncHTTPClient(url) as client:
        body = client.predict(image=image(3).tolist())
        info = client.info()
    assert body["label"] in CLASS_NAMES
    assert info["class_names"] == list(CLASS_NAMES)
    assert info["image_shape"] == list(IMAGE_SHAPE)
    assert info["max_batch_size"] == MAX_BATCH
    assert info["metrics"] == {"accuracy": 0.75}


# -- refusals -------------------------------------------------------------------------------

GOOD = image(5).tolist()


def _rows(value, rows=H, cols=W):
    return [[value] * cols for _ in range(rows)]


BAD_SINGLE = {
    "wrong shape": ({"image": _rows(1, 3, 3)}, "image: shape (3, 3) is not accepted"),
    "wrong channels": ({"image": [_rows(1)] * 3}, "image: shape (3, 8, 8)"),
    "one dimension": ({"image": [1.0] * (H * W)}, "image: shape (64,)"),
    "ragged rows": ({"image": _rows(1, H - 1) + [[1] * (W - 1)]}, "image: must be a rectangular"),
    "strings": ({"image": _rows("a")}, "image: every pixel must be a number; found text"),
    "numeric strings": ({"image": _rows("5")}, "image: every pixel must be a number"),
    "booleans": ({"image": _rows(True)}, "found booleans"),
    "nulls": ({"image": _rows(None)}, "image: every pixel must be a number"),
    "objects": ({"image": _rows({"v": 1})}, "image: every pixel must be a number"),
    "empty": ({"image": []}, "image: must not be empty"),
    "empty rows": ({"image": [[]]}, "image: must not be empty"),
    "above 255": ({"image": _rows(256)}, "image: pixel values must lie in [0, 255]"),
    "negative": ({"image": _rows(-1)}, "image: pixel values must lie in [0, 255]"),
    "negative fraction": ({"image": _rows(-0.5)}, "found min -0.5"),
    "huge integer": ({"image": _rows(10**30)}, "image: every pixel must be a number"),
    "not a list": ({"image": "abc"}, "image"),
    "missing field": ({}, "image"),
    "wrong field": ({"images": [GOOD]}, "image"),
}


@pytest.mark.parametrize("payload, message", BAD_SINGLE.values(), ids=list(BAD_SINGLE))
def test_bad_single_image_is_a_400_naming_the_problem(served, payload, message):
    _, client, _, _ = served
    r = client.post("/predict", json=payload)
    assert r.status_code == 400, r.text
    assert message in r.text


@pytest.mark.parametrize(
    "literal", ["NaN", "Infinity", "-Infinity", "1e999"], ids=["nan", "inf", "-inf", "overflow"]
)
def test_nan_and_infinite_pixels_are_a_400(served, literal):
    _, client, _, _ = served
    rows = [", ".join(["0"] * W)] * H
    rows[0] = ", ".join([literal] + ["0"] * (W - 1))
    body = '{"image": [' + ", ".join(f"[{r}]" for r in rows) + "]}"
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "image: NaN or infinite pixel values are not allowed" in r.text


BAD_BATCH = {
    "empty batch": ({"images": []}, "images: must hold at least 1 image"),
    "too many": ({"images": [GOOD] * (MAX_BATCH + 1)}, f"images: at most {MAX_BATCH} images"),
    "one bad image": ({"images": [GOOD, _rows(300)]}, "images[1]: pixel values must lie in"),
    "one wrong shape": ({"images": [GOOD, [[1]]]}, "images[1]: shape (1, 1)"),
    "not a list": ({"images": "x"}, "images"),
    "images not lists": ({"images": [1, 2]}, "images[0]: must be a nested list"),
}


@pytest.mark.parametrize("payload, message", BAD_BATCH.values(), ids=list(BAD_BATCH))
def test_bad_batch_is_a_400_naming_the_problem(served, payload, message):
    _, client, _, _ = served
    r = client.post("/predict_batch", json=payload)
    assert r.status_code == 400, r.text
    assert message in r.text


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"not json", "application/json", 400, "Invalid JSON"),
        (b"", "application/json", 400, "image"),
        (b"[1, 2]", "application/json", 400, "object"),
        (b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400, "JSON"),
        (b"not json", "multipart/form-data", 415, "Content-Type: application/json"),
        (b"image=1", "application/x-www-form-urlencoded", 415, "Content-Type: application/json"),
        (b"\x80\x04", "application/vnd.bentoml+pickle", 415, "Content-Type: application/json"),
        (b"{}", "text/plain", 415, "Content-Type: application/json"),
    ],
    ids=["not-json", "empty-body", "json-array", "too-deep", "multipart", "form", "pickle", "text"],
)
def test_bodies_that_are_not_a_json_object_are_refused(served, body, content_type, status, message):
    _, client, _, _ = served
    r = client.post("/predict", content=body, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    assert message in r.text


def test_oversized_body_is_a_413_before_parsing(served):
    _, client, _, _ = served
    huge = {"images": [GOOD] * 2000}  # ~1 MB; a full batch of 4 needs a few kB
    r = client.post("/predict_batch", json=huge)
    assert r.status_code == 413, r.text
    assert "request body" in r.text and "MAX_REQUEST_BYTES" in r.text


def test_oversized_chunked_body_is_a_413(served):
    _, client, _, _ = served
    chunk = json.dumps(GOOD).encode()

    def stream():
        yield b'{"images": ['
        for _ in range(2000):
            yield chunk + b", "
        yield chunk + b"]}"

    r = client.post(
        "/predict_batch", content=stream(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text


def test_small_chunked_body_is_served(served):
    _, client, _, _ = served

    def stream():
        yield b'{"image": '
        yield json.dumps(GOOD).encode()
        yield b"}"

    r = client.post("/predict", content=stream(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_random_junk_never_gets_a_5xx(served):
    _, client, _, _ = served
    rng = np.random.default_rng(0)
    atoms = [0, 255, -1, 1e308, "x", None, True, [], {}, [[]], 0.5]

    def junk(depth: int = 0):
        choice = rng.integers(0, 4 if depth < 4 else 1)
        if choice == 0:
            return atoms[rng.integers(len(atoms))]
        if choice == 1:
            return [junk(depth + 1) for _ in range(rng.integers(0, 9))]
        if choice == 2:
            return _rows(junk(depth + 1), int(rng.integers(1, 10)), int(rng.integers(1, 10)))
        return {"image": junk(depth + 1)}

    statuses = set()
    for _ in range(150):
        for route, key in (("/predict", "image"), ("/predict_batch", "images")):
            r = client.post(route, json={key: junk()})
            assert r.status_code < 500, (route, r.text)
            statuses.add(r.status_code)
    assert 400 in statuses
    assert client.get("/readyz").status_code == 200  # still healthy after all that


def test_get_on_an_api_is_not_a_5xx(served):
    _, client, _, _ = served
    assert client.get("/predict").status_code == 405


# -- pure helpers (no server) ---------------------------------------------------------------


def test_to_chw_layouts_and_the_ambiguous_case():
    from bentoml.exceptions import InvalidArgument

    from deploy.service import to_chw

    img = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    chw = to_chw(img.tolist(), (2, 3, 4))
    hwc = to_chw(img.transpose(1, 2, 0).tolist(), (2, 3, 4))
    np.testing.assert_array_equal(chw, hwc)
    assert chw.dtype == np.float32 and chw.shape == (2, 3, 4)
    cube = np.zeros((3, 3, 3)).tolist()
    assert to_chw(cube, (3, 3, 3)).shape == (3, 3, 3)  # C == H == W: read as (C, H, W)
    with pytest.raises(InvalidArgument, match=r"^pic: shape \(3, 4\)"):
        to_chw(img[0].tolist(), (2, 3, 4), field="pic")  # (H, W) only when C is 1


def test_request_limit_fits_a_full_batch_of_long_floats():
    from deploy.service import request_limit

    full = json.dumps({"images": [np.full((H, W), 254.99999999999997).tolist()] * MAX_BATCH})
    assert len(full) < request_limit(IMAGE_SHAPE, MAX_BATCH)


def test_swagger_page_and_openapi_are_served_locally(served):
    _, client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "swagger-ui" in page.text
    spec = client.get("/docs.json").json()
    assert {"/predict", "/predict_batch", "/info"} <= set(spec["paths"])


# -- in process, from MODEL_DIR (the development path) ------------------------------------


def test_service_runs_in_process_from_model_dir(served, monkeypatch):
    from deploy.service import ImageClassifier

    _, _, onnx_file, result = served
    root = onnx_file.parents[2]
    monkeypatch.setenv("MODEL_DIR", str(root / "build" / "bento" / "deploy" / "model"))
    svc = ImageClassifier.inner()
    img = image(21)
    answer = svc.predict(image=img.tolist())
    expected = reference_probabilities(onnx_file, img[None, None])[0]
    assert answer.class_index == int(expected.argmax())
    assert answer.model_version == result.model_version
    refused = svc.predict(image=[[1]])
    assert refused.status_code == 400 and b"image: shape (1, 1)" in refused.body


def test_service_without_a_model_says_where_it_looked(tmp_path, monkeypatch):
    from deploy.service import ImageClassifier

    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"must hold model\.onnx and model\.json"):
        ImageClassifier.inner()
