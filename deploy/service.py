"""The cloud service: an ONNX image classifier behind BentoML with adaptive batching.

The model travels inside the bento, next to this file (``model/model.onnx`` and
``model/model.json``, written by ``components/package.py``), so serving needs no model store
and no floating ``:latest`` tag. For development point ``MODEL_DIR`` at any folder holding
those two files and run ``bentoml serve deploy.service:ImageClassifier``.

Clients send raw pixel values 0-255, as nested JSON lists (``/predict``, ``/predict_batch``)
or as a PNG/JPEG file (``/predict_image``, multipart upload); the model scales them itself.
Every request is checked on its own (shape, type, range, finiteness, size) and a bad one is
answered ``4xx {"error": "<field>: <rule>"}``; no input may produce a 5xx.

Adaptive batching: only *checked* images are queued, because a merged batch that fails fails
every client in it. The public APIs are plain async endpoints that check their input, then
await :class:`deploy.batching.AdaptiveBatcher`, which runs one ONNX Runtime call for every
request waiting (at most ``max_batch_size`` images). Why not ``@bentoml.api(batchable=True)``:
a batchable API called from another API of the same service goes through BentoML's
self-proxy, an HTTP client over the app with JSON both ways (measured ~4x slower, and 500s
under concurrent load), and BentoML's dispatcher added ~10 ms per request to a lone client
after a burst (see ``batching.py``, and README, "Serving").
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field

from deploy.batching import AdaptiveBatcher
from deploy.common import (
    INPUT_NAME,
    MAX_BYTES_ENV,
    MODEL_FILE,
    Prediction,
    RequestGuard,
    bad_request,
    check_session,
    model_dir_from_env,
    open_session,
    read_card,
    request_limit,
    softmax,
    to_array_batch,
    to_batch,
    to_chw,
    tracing_off_unless_asked,
)

tracing_off_unless_asked()

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEFAULT_MAX_LATENCY_MS = 10_000
DEFAULT_MAX_IMAGE_BYTES = 1 << 20
# A merged batch up to this many images runs on the event loop: a thread hand-off costs more
# than the ~50 us per image the CNN needs. Bigger batches run in a worker thread so the loop
# keeps reading requests meanwhile (ONNX Runtime releases the GIL).
INLINE_ROWS = 16
IMAGE_FORMATS = ("PNG", "JPEG")
UPLOAD_FIELD = "image"
ARRAY_FIELD = "array"


class BatchPrediction(BaseModel):
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    model_version: str = Field(description="the version of the bento serving it")
    model: str = Field(description="name:variant-hash of the ONNX model")
    class_names: list[str]
    image_shape: list[int] = Field(description="(C, H, W) the model expects")
    max_batch_size: int = Field(description="most images per /predict_batch request")
    max_latency_ms: int = Field(description="adaptive batching's latency budget")
    max_request_bytes: int = Field(description="largest JSON body accepted")
    max_image_bytes: int = Field(description="largest /predict_image upload accepted")
    served_variant: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class CloudGuard(RequestGuard):
    limits = {"json": 1 << 20, "/predict_image": DEFAULT_MAX_IMAGE_BYTES + 4096}
    upload_routes = {"/predict_image": UPLOAD_FIELD, "/predict_array": ARRAY_FIELD}


ImageField = Annotated[
    list[Any],
    Field(
        description="one image of raw pixel values 0-255 as nested lists: (H, W) for one "
        "channel, (C, H, W) or (H, W, C)",
    ),
]
ImagesField = Annotated[
    list[Any],
    Field(description="a list of images, each as for /predict; at most max_batch_size"),
]
UploadField = Annotated[
    Path,
    Field(description="a PNG or JPEG file of exactly the model's image size (see /info)"),
]
ArrayField = Annotated[
    Path,
    Field(
        description="a .npy file (numpy.save, no pickles) of raw pixel values 0-255 shaped "
        "(N, H, W) for one channel, (N, C, H, W) or (N, H, W, C); N at most max_batch_size"
    ),
]

_BATCH_HISTOGRAM: list = []  # one per process: prometheus refuses a second registration


def batch_size_histogram(max_batch_size: int):
    """Images per model call, on /metrics as ``image_classifier_batch_size``."""
    if not _BATCH_HISTOGRAM:
        # Imported here, not at module level: BentoML sets PROMETHEUS_MULTIPROC_DIR in the
        # worker after importing this module, and prometheus_client reads it on import.
        from prometheus_client import Histogram

        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch_size})
        _BATCH_HISTOGRAM.append(
            Histogram(
                "image_classifier_batch_size",
                "Images per ONNX Runtime call after adaptive batching",
                buckets=[b for b in buckets if b <= max_batch_size] + [float("inf")],
            )
        )
    return _BATCH_HISTOGRAM[0]


def decode_array(
    data: bytes, image_shape: tuple[int, int, int], max_batch_size: int, field: str
) -> np.ndarray:
    """A .npy file of N images -> checked float32 (N, C, H, W); pickled objects refused.

    The header is read first: a file must hold the bytes its header declares, so a small
    upload cannot make numpy allocate a huge array.
    """
    from numpy.lib import format as npy

    bad = InvalidArgument(f"{field}: must be a .npy file written by numpy.save (no pickles)")
    buffer = io.BytesIO(data)
    try:
        version = npy.read_magic(buffer)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read_header(buffer)
    except Exception:  # ValueError on a bad magic or header, EOFError, ...
        raise bad from None
    if dtype.hasobject:
        raise bad
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > len(data):
        raise InvalidArgument(f"{field}: the file holds fewer bytes than its header declares")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:
        raise bad from None
    return to_array_batch(arr, image_shape, max_batch_size, field)


def decode_image(data: bytes, image_shape: tuple[int, int, int], field: str) -> np.ndarray:
    """A PNG/JPEG file -> float32 (C, H, W) raw pixels; refuses other formats and sizes."""
    from PIL import Image

    c, h, w = image_shape
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidArgument(
            f"{field}: the file declares an image far larger than {w}x{h} pixels"
        ) from None
    except Exception:  # UnidentifiedImageError, and Pillow raises many kinds on bad files
        raise InvalidArgument(f"{field}: must be a PNG or JPEG image file") from None
    # Checked before decoding the pixels: a tiny file may declare a huge image.
    if img.size != (w, h):
        raise InvalidArgument(
            f"{field}: image is {img.size[0]}x{img.size[1]} pixels; the model takes "
            f"{w}x{h} (width x height)"
        )
    if img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"):
        raise InvalidArgument(f"{field}: image mode {img.mode} is not supported; send 8-bit")
    try:
        img = img.convert("L" if c == 1 else "RGB")
    except Exception:  # the pixels are decoded here: OSError, SyntaxError, zlib.error, ...
        raise InvalidArgument(f"{field}: the image file is truncated or corrupt") from None
    if c not in (1, 3):
        raise InvalidArgument(f"{field}: image files serve 1- or 3-channel models only")
    arr = np.asarray(img, dtype=np.float32)
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


@bentoml.service(
    # One process per core (cgroup-aware): HTTP + JSON, not the model, take the CPU, and one
    # Python process uses one core. Each worker batches its own requests. Override with
    # BENTOML_CONFIG_OPTIONS="services.ImageClassifier.workers=N".
    workers="cpu_count",
    traffic={"timeout": 30},
    # One line per request costs ~30 % of the throughput; /metrics counts requests anyway.
    logging={"access": {"enabled": False}},
)
class ImageClassifier:
    """Classify images with the ONNX model shipped in the bento (or found in ``MODEL_DIR``)."""

    def __init__(self) -> None:
        model_dir = model_dir_from_env(DEFAULT_MODEL_DIR)
        card = read_card(model_dir)
        self.class_names: list[str] = [str(n) for n in card["class_names"]]
        self.image_shape: tuple[int, int, int] = tuple(int(d) for d in card["image_shape"])
        self.model_version: str = str(card["model_version"])
        self.model = str(card.get("model") or "unknown")
        self.max_batch_size = int(card.get("max_batch_size") or 64)
        max_latency_ms = int(card.get("max_latency_ms") or DEFAULT_MAX_LATENCY_MS)
        max_bytes = int(
            os.environ.get(MAX_BYTES_ENV)
            or card.get("max_request_bytes")
            or request_limit(self.image_shape, self.max_batch_size)
        )
        max_image_bytes = int(card.get("max_image_bytes") or DEFAULT_MAX_IMAGE_BYTES)
        # Multipart adds a few hundred bytes of headers around the file. A .npy batch is far
        # smaller than the same batch as JSON: the JSON limit bounds it too.
        CloudGuard.limits = {
            "json": max_bytes,
            "/predict_image": max_image_bytes + 4096,
            "/predict_array": max_bytes,
        }
        self.info_payload = ModelInfo(
            model_version=self.model_version,
            model=self.model,
            class_names=self.class_names,
            image_shape=list(self.image_shape),
            max_batch_size=self.max_batch_size,
            max_latency_ms=max_latency_ms,
            max_request_bytes=max_bytes,
            max_image_bytes=max_image_bytes,
            served_variant=card.get("served_variant"),
            metrics={k: float(v) for k, v in (card.get("metrics") or {}).items()},
        )
        self.session = open_session(model_dir / MODEL_FILE)
        check_session(self.session, self.image_shape, len(self.class_names))
        self.batch_sizes = batch_size_histogram(self.max_batch_size)
        self._batched = AdaptiveBatcher(
            self._probabilities, self.max_batch_size, max_latency_ms / 1000, INLINE_ROWS
        )

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.observe(batch.shape[0])
        return softmax(self.session.run(None, {INPUT_NAME: batch})[0])

    async def classify(self, batch: np.ndarray) -> list[Prediction]:
        """Checked (N, C, H, W) float32 images -> one answer each, through the batcher."""
        probs = await self._batched(batch)
        return [self._answer(row) for row in probs]

    def _answer(self, row: np.ndarray) -> Prediction:
        idx = int(row.argmax())
        # Built from our own checked values: construct, don't validate (~5x cheaper).
        return Prediction.model_construct(
            label=self.class_names[idx],
            class_index=idx,
            probabilities=dict(zip(self.class_names, row.tolist(), strict=True)),
            model_version=self.model_version,
            model=self.model,
        )

    @bentoml.api
    async def predict(self, image: ImageField) -> Prediction:
        """Classify one image sent as nested lists of raw pixel values."""
        try:
            arr = to_chw(image, self.image_shape, "image")
        except InvalidArgument as exc:
            return bad_request(exc)
        return (await self.classify(arr[None]))[0]

    @bentoml.api
    async def predict_batch(self, images: ImagesField) -> BatchPrediction:
        """Classify up to ``max_batch_size`` images in one call; answers in the same order."""
        try:
            batch = to_batch(images, self.image_shape, self.max_batch_size)
        except InvalidArgument as exc:
            return bad_request(exc)
        return BatchPrediction.model_construct(predictions=await self.classify(batch))

    @bentoml.api
    async def predict_array(self, array: ArrayField) -> BatchPrediction:
        """Classify a batch sent as one .npy file (multipart/form-data, field ``array``).

        The compact way to send many images: no JSON to parse, answers in the same order.
        """
        try:
            data = Path(array).read_bytes()
            batch = decode_array(data, self.image_shape, self.max_batch_size, ARRAY_FIELD)
        except InvalidArgument as exc:
            return bad_request(exc)
        return BatchPrediction.model_construct(predictions=await self.classify(batch))

    @bentoml.api
    async def predict_image(self, image: UploadField) -> Prediction:
        """Classify one uploaded PNG or JPEG file (multipart/form-data, field ``image``)."""
        try:
            arr = decode_image(Path(image).read_bytes(), self.image_shape, UPLOAD_FIELD)
        except InvalidArgument as exc:
            return bad_request(exc)
        return (await self.classify(arr[None]))[0]

    @bentoml.api
    def info(self) -> ModelInfo:
        """What this service serves: model version, classes, input shape, limits, metrics."""
        return self.info_payload


ImageClassifier.add_asgi_middleware(CloudGuard)
