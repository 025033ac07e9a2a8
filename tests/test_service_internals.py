"""The serving pieces that make the JSON routes fast, in process (no server).

- JSON pixels read straight into numpy (``deploy/base.py:read_byte_array``): exactly what a
  JSON parser and numpy make of the same body whenever it accepts one, and a refusal to
  decide (the usual reading then words the error) for anything else; answers built without
  pydantic's per-field search are those ``model_construct`` builds;
- the request timeout that replaces BentoML's (``deploy/guard.py:RequestTimeout``): its
  timer is cancelled with the request, a slow request still gets the 504, and it is the one
  in the app every worker serves;
- each worker freezes what it has loaded out of the garbage collector's sight once started.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re

import numpy as np
import orjson
import pytest

from deploy.base import read_byte_array, read_json_field
from deploy.common import JSONByteArray
from deploy.image import to_batch, to_chw

# -- JSON pixels straight into numpy -----------------------------------------------------------


def _as_json_parser_reads(body: bytes, field: str) -> np.ndarray | None:
    """What orjson and numpy make of ``body`` when it is ``{field: <rectangular ints 0-255>}``
    (None otherwise): the reading ``read_byte_array`` must agree with."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or set(data) != {field} or type(data[field]) is not list:
        return None

    def leaves(value):
        for item in value:
            yield from leaves(item) if type(item) is list else (item,)

    if not all(type(v) is int and 0 <= v <= 255 for v in leaves(data[field])):
        return None  # a float, text, true/false, null, an object, out of range
    try:
        arr = np.array(data[field])
    except ValueError:  # ragged
        return None
    return arr.astype(np.uint8) if arr.size and arr.dtype.kind in "iu" else None


def _mutated(body: bytes, rng: random.Random) -> bytes:
    out = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(out) + 1)
        char = rng.choice('0123456789[], \t\n-.e"x').encode()
        roll = rng.random()
        if roll < 0.4 and i < len(out):
            out[i : i + 1] = char
        elif roll < 0.7:
            out[i:i] = char
        elif i < len(out):
            del out[i]
    return bytes(out)


def test_pixels_read_straight_into_numpy_agree_with_a_json_parser():
    """20,000 bodies, well formed and then mutated (a digit, bracket, comma, sign, fraction,
    quote or space added, changed or removed): every one it accepts is read as orjson and numpy
    read it, and it accepts nearly every valid one."""
    rng = random.Random(14)
    accepted = valid = 0
    for _ in range(20_000):
        shape = [rng.randint(1, 3) for _ in range(rng.randint(1, 4))]
        values = [rng.choice([0, 1, 7, 10, 99, 100, 255, 256]) for _ in range(int(np.prod(shape)))]
        separators = rng.choice([(", ", ": "), (",", ":"), (" , ", " : ")])
        body = json.dumps(
            {"images": np.array(values).reshape(shape).tolist()}, separators=separators
        ).encode()
        if rng.random() < 0.7:
            body = _mutated(body, rng)
        expected = _as_json_parser_reads(body, "images")
        got = read_byte_array(body, "images")
        valid += expected is not None
        if got is not None:
            accepted += 1
            assert expected is not None, body
            assert got.array.dtype == np.uint8 and got.array.shape == expected.shape, body
            np.testing.assert_array_equal(got.array, expected, err_msg=str(body))
    assert accepted > 0.99 * valid  # "-0" is the JSON integer it leaves to the parser


@pytest.mark.parametrize(
    "body",
    [
        b'{"images": [[1, 2], [3]]}',  # ragged
        b'{"images": [[1, 2], [3, [4]]]}',  # mixed depth
        b'{"images": [[1, 2.0]]}',
        b'{"images": [[1, 300]]}',
        b'{"images": [[1, -1]]}',
        b'{"images": [[1, true]]}',
        b'{"images": [[1, null]]}',
        b'{"images": [[1, "2"]]}',
        b'{"images": [[1, NaN]]}',
        b'{"images": [[1, 02]]}',
        b'{"images": [[1, 1' + b"0" * 30 + b"]]}",  # beyond 64 bits
        b'{"images": []}',
        b'{"images": [[]]}',
        b'{"images": 5}',
        b'{"images": [[1]], "extra": 1}',
        b'{"image": [[1]]}',
        b'{"\\u0069mages": [[1]]}',
        b"[[1, 2]]",
        b"not json",
        b"",
    ],
)
def test_anything_else_is_left_to_the_json_parser(body):
    assert read_byte_array(body, "images") is None
    # ... and the reader still works for the next body (a refused big integer, say)
    assert read_byte_array(b'{"images": [[1, 2]]}', "images").tolist() == [[1, 2]]


def test_pixels_read_either_way_give_the_same_checked_batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8))
    body = json.dumps({"images": images.tolist()}).encode()
    fast = read_byte_array(body, "images")
    assert type(fast) is JSONByteArray and fast.tolist() == images.tolist()
    as_lists = read_json_field(body, "images", list)
    both = [to_batch(v, (1, 8, 8), 8) for v in (fast, as_lists)]
    assert both[0].dtype == np.float32
    np.testing.assert_array_equal(*both)
    one = read_byte_array(json.dumps({"image": images[0].tolist()}).encode(), "image")
    np.testing.assert_array_equal(to_chw(one, (1, 8, 8)), to_chw(images[0].tolist(), (1, 8, 8)))


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((3, 8, 8), int), "images: at most 2 images per request, got 3"),
        (np.zeros((2, 3, 3), int), "images[0]: shape (3, 3) is not accepted"),
        (np.zeros((2, 64), int), "images[0]: shape (64,) is not accepted"),
        (np.zeros(2, int), "images[0]: must be a nested list of pixel values"),
    ],
)
def test_refusals_of_pixels_read_into_numpy_say_what_they_said_for_lists(images, message):
    from bentoml.exceptions import InvalidArgument

    body = json.dumps({"images": images.tolist()}).encode()
    for value in (read_byte_array(body, "images"), read_json_field(body, "images", list)):
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            to_batch(value, (1, 8, 8), 2)


def test_answers_constructed_cheaply_are_those_model_construct_makes():
    from deploy.common import Prediction, ValuePrediction, constructor

    fields = {
        "label": "b",
        "class_index": 1,
        "probabilities": {"a": 0.25, "b": 0.75},
        "model_version": "r1",
        "model": "m:int8-1",
    }
    cheap, usual = constructor(Prediction)(**fields), Prediction.model_construct(**fields)
    assert cheap == usual and cheap.model_dump_json() == usual.model_dump_json()
    assert cheap.model_fields_set == usual.model_fields_set == set(fields)
    cheap.label = "a"  # assignable, as the edge does with cloud_error
    assert cheap.label == "a" and usual.label == "b"
    value = {"value": 1.5, "target": "y", "model_version": "r1", "model": "m"}
    assert constructor(ValuePrediction)(**value) == ValuePrediction.model_construct(**value)


# -- the request timeout -----------------------------------------------------------------------


def _serve(middleware, *, scope_type: str = "http") -> tuple[list[dict], list]:
    """One request through ``middleware`` on a fresh event loop: (messages sent, every timer
    handle the loop scheduled meanwhile)."""
    sent: list[dict] = []
    timers: list = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        call_later = loop.call_later

        def recorded(*args, **kwargs):
            handle = call_later(*args, **kwargs)
            timers.append(handle)
            return handle

        loop.call_later = recorded
        scope = {"type": scope_type, "method": "POST", "path": "/predict", "headers": []}
        await middleware(scope, receive, send)

    asyncio.run(main())
    return sent, timers


async def _answer(scope, receive, send, delay: float = 0.0) -> None:
    if delay:
        await asyncio.sleep(delay)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_request_timeout_cancels_its_timer_with_the_request():
    # BentoML's TimeoutMiddleware leaves a 30 s timer (and what it holds) behind per request.
    from deploy.guard import RequestTimeout

    sent, timers = _serve(RequestTimeout(_answer, timeout=30))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert len(timers) == 1 and timers[0].cancelled()


def test_a_slow_request_still_gets_a_504():
    from deploy.guard import RequestTimeout

    seen = []

    async def slow(scope, receive, send):
        try:
            await _answer(scope, receive, send, delay=5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    sent, timers = _serve(RequestTimeout(slow, timeout=0.05))
    assert seen == ["cancelled"]  # the request's work is stopped, not left running
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"]) == {
        "error": "Not able to process the request in 0.05 seconds"
    }


def test_an_answer_that_started_is_not_timed_out_and_errors_pass_through():
    from deploy.guard import RequestTimeout

    async def streams(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.1)  # longer than the timeout, after the answer started
        await send({"type": "http.response.body", "body": b"late"})

    sent, timers = _serve(RequestTimeout(streams, timeout=0.05))
    assert [m.get("status") for m in sent] == [200, None] and sent[1]["body"] == b"late"
    assert timers[0].cancelled()

    async def fails(scope, receive, send):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # at once, not after the timeout
        _serve(RequestTimeout(fails, timeout=30))
    sent, timers = _serve(RequestTimeout(_answer, timeout=30), scope_type="lifespan")
    assert timers == []


def test_every_worker_serves_the_request_timeout_not_bentomls():
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from deploy.base import ModelService
    from deploy.guard import RequestTimeout
    from deploy.service import ImageClassifier

    app = ImageClassifier.to_asgi()
    classes = [m.cls for m in app.user_middleware]
    assert RequestTimeout in classes and TimeoutMiddleware not in classes
    ours = next(m for m in app.user_middleware if m.cls is RequestTimeout)
    assert ours.kwargs["timeout"] == ModelService.options["traffic"]["timeout"]


# -- the garbage collector -----------------------------------------------------------------------


def test_each_worker_freezes_its_loaded_heap_once_started():
    from deploy.base import ModelService

    hook = ModelService._freeze_heap
    assert getattr(hook, "__bentoml_startup_hook__", False)  # BentoML runs it in each worker
    gc.unfreeze()
    try:
        hook(object())
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


# -- names from before the renames (issue 13) ----------------------------------------------------


def _model_dir(root, input_name: str = "inputs", **card_changes):
    import onnx

    from tests.tiny_models import CLASS_NAMES, IMAGE_SHAPE, make_tiny_onnx

    model = onnx.load(str(make_tiny_onnx(root / "model.onnx")))
    for node in model.graph.node:
        node.input[:] = [input_name if name == "inputs" else name for name in node.input]
    model.graph.input[0].name = input_name
    onnx.save(model, str(root / "model.onnx"))
    card = {
        "kind": "image",
        "class_names": list(CLASS_NAMES),
        "input_shape": list(IMAGE_SHAPE),
        "model_version": "rtest",
        "model": "tiny:int8-0",
        "max_batch_size": 4,
    }
    (root / "model.json").write_text(json.dumps({**card, **card_changes}))
    return root


def test_a_model_with_the_old_input_name_or_card_field_is_refused_at_start_up(
    tmp_path, monkeypatch
):
    from deploy.service import ImageClassifier

    monkeypatch.setenv("MODEL_DIR", str(_model_dir(tmp_path / "new")))
    assert ImageClassifier.inner().card.input_shape == (1, 8, 8)
    monkeypatch.setenv("MODEL_DIR", str(_model_dir(tmp_path / "old", input_name="images")))
    with pytest.raises(ValueError, match="model.onnx names its input 'images', as models exported"):
        ImageClassifier.inner()
    old_card = _model_dir(tmp_path / "card", input_shape=None, image_shape=[1, 8, 8])
    monkeypatch.setenv("MODEL_DIR", str(old_card))
    with pytest.raises(ValueError, match=r"input_shape is missing \(image_shape is its old name\)"):
        ImageClassifier.inner()
