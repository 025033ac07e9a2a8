"""The cloud service through its real HTTP server: right answers, a 4xx (never a 5xx) for bad input.

One server for all ``tests/test_service*.py`` modules (the ``cloud`` fixture of
tests/conftest.py), started the way another machine would: the package stage builds the cloud
bento from a tiny ONNX model (3 classes of 1x8x8 images, batches of at most 4), exports it, the
archive is imported into a fresh ``BENTOML_HOME`` and served with ``bentoml serve <tag>`` from an
empty folder. Starting it takes a few seconds; every request after that takes milliseconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.helpers import STATUSES, try_every_openapi_example
from tests.tiny_models import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    MAX_BATCH,
    MAX_IMAGE_BYTES,
    image,
    reference_probabilities,
)

H, W = IMAGE_SHAPE[1:]


def png(pixels: np.ndarray, fmt: str = "PNG", mode: str = "L", **save) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels).astype(np.uint8), mode=mode).save(buffer, fmt, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(cloud):
    """(base URL, httpx client, path of the served ONNX model, package result)."""
    with httpx.Client(base_url=cloud.url, timeout=30) as client:
        yield cloud.url, client, cloud.onnx_file, cloud.result


# -- answers --------------------------------------------------------------------------------


def test_health_endpoints(served):
    _, client, _, _ = served
    for route in ("/readyz", "/livez", "/healthz"):
        assert client.get(route).status_code == 200, route


def test_predict_matches_onnxruntime_in_process(served):
    _, client, onnx_file, result = served
    images = np.stack([image(s) for s in range(3)])
    expected = reference_probabilities(onnx_file, images[:, None])
    for img, probs in zip(images, expected, strict=True):
        r = client.post("/predict", json={"image": img.tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"label", "class_index", "probabilities", "model_version", "model"}
        assert body["class_index"] == int(probs.argmax())
        assert body["label"] == CLASS_NAMES[body["class_index"]]
        got = np.array([body["probabilities"][n] for n in CLASS_NAMES])
        np.testing.assert_allclose(got, probs, atol=1e-6)
        assert body["model_version"] == result.model_version
        assert body["model"].startswith("tiny:int8-")


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
    assert info["max_image_bytes"] == MAX_IMAGE_BYTES
    assert info["metrics"] == {"accuracy": 0.75}


def test_uploaded_png_gets_the_same_answer_as_its_pixels(served):
    _, client, _, _ = served
    img = image(30)
    as_json = client.post("/predict", json={"image": img.tolist()}).json()
    r = client.post("/predict_image", files={"image": ("digit.png", png(img), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json() == as_json


def test_uploaded_jpeg_and_rgb_png_are_read_as_the_model_needs(served):
    from PIL import Image

    _, client, onnx_file, _ = served
    img = image(31)
    jpeg = png(img, "JPEG", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float64)
    expected = reference_probabilities(onnx_file, decoded[None, None])[0]
    r = client.post("/predict_image", files={"image": ("d.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    got = np.array([r.json()["probabilities"][n] for n in CLASS_NAMES])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # An RGB file is turned into the model's one channel (the content type is not trusted).
    rgb = png(np.stack([img] * 3, axis=-1), mode="RGB")
    r = client.post("/predict_image", files={"image": ("d.png", rgb, "application/octet-stream")})
    assert r.status_code == 200 and r.json()["label"] in CLASS_NAMES


def test_bentoml_client_uploads_a_file(served, tmp_path):
    import bentoml

    url, client, _, _ = served
    path = tmp_path / "digit.png"
    path.write_bytes(png(image(32)))
    expected = client.post("/predict", json={"image": image(32).tolist()}).json()
    with bentoml.SyncHTTPClient(url) as bento_client:
        assert bento_client.predict_image(image=path) == expected


def npy(arr) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, arr, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"], ids=["n-h-w", "n-c-h-w", "n-h-w-c"])
def test_npy_batch_gets_the_same_answers_as_json(served, layout):
    _, client, _, _ = served
    images = np.stack([image(40 + i) for i in range(MAX_BATCH)]).astype(np.uint8)
    arr = {"NHW": images, "NCHW": images[:, None], "NHWC": images[..., None]}[layout]
    as_json = client.post("/predict_batch", json={"images": images.tolist()}).json()
    r = client.post("/predict_array", files={"array": ("x.npy", npy(arr), "application/x-npy")})
    assert r.status_code == 200, r.text
    assert r.json() == as_json


BAD_ARRAYS = {
    "pickled objects": (np.array([{"a": 1}], dtype=object), "array: must be a .npy file"),
    "not npy": (b"\x93NUMPY garbage", "array: must be a .npy file"),
    "npz": (b"PK\x03\x04" + b"\x00" * 100, "array: must be a .npy file"),
    # A header declaring 10^12 images of 8x8 on a file of ~200 bytes.
    "lying header": (
        npy(np.zeros((1, H, W), np.uint8)).replace(b"(1, 8, 8)", b"(1000000000000, 8, 8)"),
        "fewer bytes than its header declares",
    ),
    "wrong shape": (np.zeros((2, 3, 3), np.uint8), "array: shape (2, 3, 3) is not accepted"),
    "one image, no batch axis": (np.zeros((H, W), np.uint8), "array: shape (8, 8)"),
    "too many": (np.zeros((MAX_BATCH + 1, H, W), np.uint8), "between 1 and 4 images"),
    "empty": (np.zeros((0, H, W), np.uint8), "array: must not be empty"),
    "booleans": (np.zeros((1, H, W), bool), "array: every pixel must be a number"),
    "NaN": (np.full((1, H, W), np.nan), "array: NaN or infinite"),
    "out of range": (np.full((1, H, W), 300.0), "array: pixel values must lie in [0, 255]"),
}


@pytest.mark.parametrize("arr, message", BAD_ARRAYS.values(), ids=list(BAD_ARRAYS))
def test_bad_npy_batch_is_a_400_naming_the_problem(served, arr, message):
    _, client, _, _ = served
    data = arr if isinstance(arr, bytes) else npy(arr)
    r = client.post("/predict_array", files={"array": ("x.npy", data, "application/x-npy")})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_concurrent_clients_get_their_own_answers_batched_together(served):
    """32 clients at once, mixing the four predict routes: every answer is the one
    onnxruntime gives in this process for that client's image, and the batcher merged
    requests (the batch-size histogram on /metrics saw model calls of more than one image)."""
    url, client, onnx_file, _ = served
    images = np.stack([image(100 + i) for i in range(96)])
    expected = reference_probabilities(onnx_file, images[:, None])

    def before() -> tuple[float, float]:
        text = client.get("/metrics").text
        return _metric(text, 'image_classifier_batch_size_bucket{le="1.0"}'), _metric(
            text, "image_classifier_batch_size_count"
        )

    ones_before, calls_before = before()

    def ask(i: int) -> tuple[int, dict]:
        with httpx.Client(base_url=url, timeout=30) as c:
            if i % 4 == 0:
                r = c.post("/predict", json={"image": images[i].tolist()})
                return r.status_code, r.json()
            if i % 4 == 1:
                files = {"image": ("x.png", png(images[i]), "image/png")}
                r = c.post("/predict_image", files=files)
                return r.status_code, r.json()
            if i % 4 == 2:
                files = {"array": ("x.npy", npy(images[i : i + 1].astype(np.uint8)), "")}
                r = c.post("/predict_array", files=files)
                return r.status_code, r.json()["predictions"][0]
            r = c.post("/predict_batch", json={"images": [images[i].tolist()]})
            return r.status_code, r.json()["predictions"][0]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(len(images))))
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        got = np.array([body["probabilities"][n] for n in CLASS_NAMES])
        np.testing.assert_allclose(got, expected[i], atol=1e-6, err_msg=f"client {i}")
    ones_after, calls_after = before()
    calls, single = calls_after - calls_before, ones_after - ones_before
    assert 0 < calls <= len(images)
    assert single < calls, "no model call held more than one request: batching did not happen"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_prometheus_metrics_count_requests_by_route_and_status(served):
    _, client, _, _ = served
    client.post("/predict", json={"image": image(1).tolist()})
    client.post("/predict", json={"image": [[1]]})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert "text/plain" in r.headers["content-type"]
    lines = r.text.splitlines()
    for route, code in (("/predict", "200"), ("/predict", "400")):
        assert any(
            line.startswith("bentoml_service_request_total{")
            and f'endpoint="{route}"' in line
            and f'http_response_code="{code}"' in line
            and float(line.split()[-1]) >= 1
            for line in lines
        ), (route, code)
    assert any(line.startswith("bentoml_service_request_duration_seconds_bucket") for line in lines)
    assert any(line.startswith("image_classifier_batch_size_count") for line in lines)


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


def test_two_content_types_are_refused_not_read_one_way_or_the_other(served):
    # The guard, Starlette and BentoML could each read another of the two: refused outright
    # (tests/test_service_hardening.py has the other framing headers).
    _, client, _, _ = served
    body = json.dumps({"image": GOOD}).encode()
    two = [("content-type", "text/plain"), ("content-type", "application/json")]
    r = client.post("/predict", content=body, headers=two)
    assert r.status_code == 400, r.text
    assert "Content-Type sent 2 times" in r.json()["error"]


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


def _bad_png_16bit() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((H, W), 60000, dtype=np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def _multipart(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, str]:
    """A multipart body by hand (name, content, filename or None for a text field)."""
    boundary = "testboundary7"
    chunks = []
    for name, content, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


GOOD_PNG = png(image(6))
BAD_UPLOADS = {
    "wrong size": (
        [("image", png(np.zeros((H + 2, W))), "a.png")],
        f"image: image is {W}x{H + 2} pixels; the model takes {W}x{H}",
    ),
    "not an image": ([("image", b"just some text", "a.png")], "image: must be a PNG or JPEG"),
    "gif": ([("image", png(np.zeros((H, W)), "GIF"), "a.gif")], "image: must be a PNG or JPEG"),
    "truncated": ([("image", GOOD_PNG[: len(GOOD_PNG) // 2], "a.png")], "truncated or corrupt"),
    "16-bit": ([("image", _bad_png_16bit(), "a.png")], "image: image mode I;16"),
    "empty file": ([("image", b"", "a.png")], "image: must be a PNG or JPEG"),
    # BentoML would download a URL given as text (and, without uvloop, fail with a 500).
    "URL as text": ([("image", b"http://example.com/x.png", None)], "image: must be an uploaded"),
    "no file": ([("other", GOOD_PNG, "a.png")], "image: missing"),
    "extra field": ([("image", GOOD_PNG, "a.png"), ("x", b"1", None)], "x: unknown form field"),
    "two files": ([("image", GOOD_PNG, "a.png"), ("image", GOOD_PNG, "b.png")], "exactly one"),
}


@pytest.mark.parametrize("parts, message", BAD_UPLOADS.values(), ids=list(BAD_UPLOADS))
def test_bad_upload_is_a_400_naming_the_problem(served, parts, message):
    _, client, _, _ = served
    body, content_type = _multipart(*parts)
    r = client.post("/predict_image", content=body, headers={"content-type": content_type})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"--x\r\n", "multipart/form-data", 400, "needs a boundary"),
        (b"garbage", "multipart/form-data; boundary=x", 400, "malformed multipart"),
        (b'{"image": [[1]]}', "application/json", 415, "multipart/form-data upload"),
        (GOOD_PNG, "image/png", 415, "multipart/form-data upload"),
    ],
    ids=["no-boundary", "garbage", "json", "raw-png"],
)
def test_upload_route_takes_only_a_multipart_form(served, body, content_type, status, message):
    _, client, _, _ = served
    r = client.post("/predict_image", content=body, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_oversized_upload_is_a_413(served):
    _, client, _, _ = served
    noise = png(np.random.default_rng(0).integers(0, 256, (64, 64)))  # ~4 kB of entropy
    big = noise * 3
    r = client.post("/predict_image", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413, r.text
    assert "request body" in r.json()["error"]


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


@pytest.mark.parametrize("route", ["/predict_rows", "/predict_row", "/forecast"])
def test_table_and_sequence_routes_say_this_bento_serves_images(served, route):
    _, client, _, _ = served
    r = client.post(route, json={"rows": [{"a": 1}]})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error.startswith(f"{route}: this bento serves an image classification model")
    assert "/predict_batch" in error


def test_get_on_an_api_is_not_a_5xx(served):
    _, client, _, _ = served
    for route in ("/predict", "/predict_batch", "/predict_image", "/predict_array"):
        assert client.get(route).status_code == 405


# -- pure helpers (no server) ---------------------------------------------------------------


def test_to_chw_layouts_and_the_ambiguous_case():
    from bentoml.exceptions import InvalidArgument

    from deploy.image import to_chw

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
    from deploy.image import request_limit

    full = json.dumps({"images": [np.full((H, W), 254.99999999999997).tolist()] * MAX_BATCH})
    assert len(full) < request_limit(IMAGE_SHAPE, MAX_BATCH)


def test_every_bento_class_serves_its_kinds_routes_and_documents_them():
    """The classes made from the base and each kind's adapter: the cloud's serve every route
    of their kind, the edge's the JSON ones; all are on the OpenAPI page, with examples."""
    from deploy import edge_service, service
    from deploy.base import KINDS

    classes = {
        "image": (service.ImageClassifier, edge_service.EdgeImageClassifier),
        "table": (service.TablePredictor, edge_service.EdgeTablePredictor),
        "sequence": (service.SequencePredictor, edge_service.EdgeSequencePredictor),
    }
    assert set(classes) == {kind.name for kind in KINDS}
    for kind in KINDS:
        every = {r.path for r in kind.routes}
        json_only = {r.path for r in kind.routes if r.upload_limit is None}
        cloud, edge = classes[kind.name]
        for svc, routes in ((cloud, every), (edge, json_only)):
            assert {api.route for api in svc.apis.values()} == routes | {"/info"}, svc
            paths = svc.openapi_spec.asdict()["paths"]
            assert routes | {"/info"} <= set(paths), svc
            for route in kind.routes:
                if route.path in json_only:
                    body = paths[route.path]["post"]["requestBody"]["content"]
                    field = body["application/json"]["schema"]["properties"][route.field]
                    assert field["description"] and field["examples"], (svc, route.path)
            for path in routes | {"/info"}:
                assert set(map(str, paths[path]["post"]["responses"])) == STATUSES, (svc, path)
        assert edge.inner.guard_rules is not cloud.inner.guard_rules  # one guard each


def test_swagger_page_and_openapi_are_served_locally(served):
    _, client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "swagger-ui" in page.text
    spec = client.get("/docs.json").json()
    routes = {"/predict", "/predict_batch", "/predict_image", "/predict_array", "/info"}
    assert routes <= set(spec["paths"])
    upload = spec["paths"]["/predict_image"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"


def test_every_route_answers_the_example_on_its_openapi_page(served, tmp_path):
    """Swagger's "Try it out" works on the first click: each route's example is a request this
    bento's model answers (an image of its 8x8 shape, not an illustrative 3x3 one), and each
    route lists every status it can answer."""
    _, client, _, _ = served
    tried = try_every_openapi_example(client, tmp_path)
    assert set(tried) == {"/predict", "/predict_batch", "/predict_array", "/predict_image", "/info"}
    post = client.get("/docs.json").json()["paths"]["/predict"]["post"]
    example = post["requestBody"]["content"]["application/json"]["example"]["image"]
    assert np.array(example).shape == (H, W)
    limit = client.post("/info").json()["max_request_bytes"]
    assert f"larger than {limit} bytes" in post["responses"]["413"]["description"]


def test_decode_image_checks_size_before_decoding_pixels():
    import struct
    import zlib

    from bentoml.exceptions import InvalidArgument

    from deploy.image import decode_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    def declaring(width: int, height: int) -> bytes:
        """A PNG of ~60 bytes that declares a width x height RGB image."""
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")

    started = time.perf_counter()
    with pytest.raises(InvalidArgument, match=r"image is 3000x3000 pixels; the model takes"):
        decode_image(declaring(3000, 3000), (1, H, W), "image")
    # Pillow's own bomb check fires first above ~179 M pixels (2.7 GB decoded here).
    with pytest.raises(InvalidArgument, match=r"declares an image far larger"):
        decode_image(declaring(30000, 30000), (1, H, W), "image")
    assert time.perf_counter() - started < 1.0
    rgb = decode_image(png(np.full((H, W, 3), 7), mode="RGB"), (3, H, W), "image")
    assert rgb.shape == (3, H, W) and rgb.dtype == np.float32 and float(rgb.max()) == 7.0


# -- the adaptive batcher, on its own --------------------------------------------------------


def _batcher(max_batch: int = 4, max_wait_s: float = 10.0, inline_rows: int = 16, fail=None):
    from deploy.batching import AdaptiveBatcher

    calls: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if fail is not None and (batch == fail).any():
            raise RuntimeError("model failed")
        return batch * 10

    return AdaptiveBatcher(run, max_batch, max_wait_s, inline_rows), calls


def test_batcher_merges_concurrent_requests_and_returns_each_its_rows():
    batcher, calls = _batcher(max_batch=4)

    async def ask():
        requests = [np.full((n, 1), i, dtype=np.float32) for i, n in enumerate([1, 2, 1, 3, 1])]
        return requests, await asyncio.gather(*(batcher(r) for r in requests))

    requests, answers = asyncio.run(ask())
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer, request * 10)
    assert sum(calls) == 8 and max(calls) <= 4 and len(calls) < 5  # merged, within the cap


def test_batcher_runs_a_lone_request_at_once_and_big_batches_in_a_thread():
    import threading

    seen = []

    def run(batch):
        seen.append(threading.current_thread() is threading.main_thread())
        return batch

    from deploy.batching import AdaptiveBatcher

    batcher = AdaptiveBatcher(run, 64, 10.0, inline_rows=16)

    async def ask():
        started = time.perf_counter()
        await batcher(np.zeros((1, 1)))
        lone = time.perf_counter() - started
        await batcher(np.zeros((32, 1)))
        return lone

    assert asyncio.run(ask()) < 0.05
    assert seen == [True, False]


def test_batcher_failure_reaches_only_its_batch_and_overload_is_a_503():
    from bentoml.exceptions import ServiceUnavailable

    batcher, _ = _batcher(max_batch=1, fail=666)

    async def ask():
        return await asyncio.gather(
            batcher(np.array([[666.0]])), batcher(np.array([[1.0]])), return_exceptions=True
        )

    failed, fine = asyncio.run(ask())
    assert isinstance(failed, RuntimeError) and fine.tolist() == [[10.0]]
    slow, _ = _batcher(max_batch=1, max_wait_s=0.0)

    async def overload():
        return await asyncio.gather(
            *(slow(np.ones((1, 1))) for _ in range(3)), return_exceptions=True
        )

    answers = asyncio.run(overload())
    assert any(isinstance(a, ServiceUnavailable) for a in answers)
    assert ServiceUnavailable.error_code == 503


# -- in process, from MODEL_DIR (the development path) ------------------------------------


def test_service_runs_in_process_from_model_dir(served, monkeypatch):
    from deploy.service import ImageClassifier

    _, _, onnx_file, result = served
    root = onnx_file.parents[2]
    staged = root / "build" / "bento" / result.tag.split(":")[0] / "deploy" / "model"
    monkeypatch.setenv("MODEL_DIR", str(staged))
    svc = ImageClassifier.inner()
    images = [image(21), image(22)]

    async def ask():  # one event loop: the batcher belongs to the loop it first ran in
        return await asyncio.gather(
            *(svc.predict(image=img.tolist()) for img in images),
            svc.predict_batch(images=[img.tolist() for img in images]),
            svc.predict(image=[[1]]),
        )

    *singles, batch, refused = asyncio.run(ask())
    expected = reference_probabilities(onnx_file, np.stack(images)[:, None])
    for answer, probs in zip(singles, expected, strict=True):
        assert answer.class_index == int(probs.argmax())
        assert answer.model_version == result.model_version
    assert [p.class_index for p in batch.predictions] == [s.class_index for s in singles]
    assert refused.status_code == 400 and b"image: shape (1, 1)" in refused.body


def test_service_without_a_model_says_where_it_looked(tmp_path, monkeypatch):
    from deploy.service import ImageClassifier

    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"must hold model\.onnx and model\.json"):
        ImageClassifier.inner()
