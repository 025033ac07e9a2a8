"""The cloud service: an ONNX model behind BentoML with adaptive batching.

One service per kind of data, in this module; the package stage builds the bento around the
one its model needs:

- :class:`ImageClassifier`: images. Clients send raw pixel values 0-255, as nested JSON lists
  (``/predict``, ``/predict_batch``), a .npy batch (``/predict_array``) or a PNG/JPEG file
  (``/predict_image``, multipart upload); the model scales them itself.
- :class:`TablePredictor`: table rows as JSON objects of column -> value (``/predict_row``,
  ``/predict_rows``), classification or regression.
- :class:`SequencePredictor`: sequences of ``T`` steps (the window the model was trained on),
  each step a list of one value per column or an object of column -> value: a time-series
  forecast (``/forecast``, one window) or one answer per sequence (``/predict_sequences``).

Tables and sequences go through the same preprocessing the model was trained behind: the
spec fitted by ingest (``preprocess`` in ``model/model.json``), applied by
``components/features.py``, which the bento ships. Classification answers
``{label, class_index, probabilities, ...}``, regression ``{value, target, ...}`` in the
target's own units.

The model travels inside the bento, next to this file (``model/model.onnx`` and
``model/model.json``, written by ``components/package.py``), so serving needs no model store
and no floating ``:latest`` tag. For development point ``MODEL_DIR`` at any folder holding
those two files and run ``bentoml serve deploy.service:ImageClassifier`` (or the service for
the model's kind; another kind's model is refused at start-up).

Every request is checked on its own (shape, type, range, finiteness, columns, size) and a bad
one is answered ``4xx {"error": "<field>: <rule>"}``; no input may produce a 5xx. A route of
another kind of model (``/predict_rows`` on an image bento) is a 404 saying what is served.

Adaptive batching: only *checked* inputs are queued, because a merged batch that fails fails
every client in it. The public APIs are plain async endpoints that check their input, then
await :class:`deploy.batching.AdaptiveBatcher`, which runs one ONNX Runtime call for every
request waiting (at most ``max_batch_size`` examples). Why not ``@bentoml.api(batchable=True)``:
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
    CARD_FILE,
    INPUT_NAME,
    MAX_BYTES_ENV,
    MODEL_FILE,
    ROUTES,
    Answer,
    ModelCard,
    Prediction,
    RequestGuard,
    RowField,
    RowsField,
    SequencesField,
    ValuePrediction,
    WindowField,
    bad_request,
    check_session,
    class_answer,
    encode_row,
    encode_rows,
    encode_sequences,
    encode_window,
    foreign_routes,
    load_card,
    model_dir_from_env,
    model_outputs,
    open_session,
    read_card,
    records_limit,
    request_limit,
    require_kind,
    softmax,
    to_array_batch,
    to_batch,
    to_chw,
    tracing_off_unless_asked,
    value_answer,
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

_BATCH_HISTOGRAMS: dict = {}  # one per process and name: prometheus refuses a second one


def batch_size_histogram(
    max_batch_size: int, name: str = "image_classifier_batch_size", what: str = "Images"
):
    """Examples per model call, on /metrics as ``name`` (``image_classifier_batch_size``)."""
    if name not in _BATCH_HISTOGRAMS:
        # Imported here, not at module level: BentoML sets PROMETHEUS_MULTIPROC_DIR in the
        # worker after importing this module, and prometheus_client reads it on import.
        from prometheus_client import Histogram

        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch_size})
        _BATCH_HISTOGRAMS[name] = Histogram(
            name,
            f"{what} per ONNX Runtime call after adaptive batching",
            buckets=[b for b in buckets if b <= max_batch_size] + [float("inf")],
        )
    return _BATCH_HISTOGRAMS[name]


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
        require_kind(card, "image", "deploy.service:ImageClassifier", model_dir / CARD_FILE)
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
        CloudGuard.foreign = foreign_routes(
            "image", f"an image classification model of {len(self.class_names)} classes",
            ROUTES["image"],
        )  # fmt: skip
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


# -- tables and sequences -------------------------------------------------------------------


class Predictions(BaseModel):
    predictions: list[Prediction | ValuePrediction] = Field(
        description="one answer per row or sequence, in the request's order: "
        "{label, class_index, probabilities, ...} for classification, {value, target, ...} "
        "for regression"
    )


class PredictorInfo(BaseModel):
    model_version: str = Field(description="the version of the bento serving it")
    model: str = Field(description="name:variant-hash of the ONNX model")
    kind: str = Field(description="table | sequence")
    task: str = Field(description="classification | regression")
    target: str = Field(description="the column the model predicts")
    class_names: list[str] = Field(description="classification: the classes; empty otherwise")
    input_shape: list[int] = Field(description="(F,) features of a row or (T, F) of a sequence")
    columns: list[str] = Field(
        description="the input columns, in order: what a row (or one time step) holds"
    )
    window: int | None = Field(None, description="sequences: the steps each one must hold")
    preprocess: dict[str, Any] = Field(
        description="the transform applied before the model: each numeric column's training "
        "mean and std, each categorical column's categories (components/features.py)"
    )
    max_batch_size: int = Field(description="most rows or sequences per request")
    max_latency_ms: int = Field(description="adaptive batching's latency budget")
    max_request_bytes: int = Field(description="largest JSON body accepted")
    served_variant: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class TableGuard(RequestGuard):
    limits = {"json": 1 << 20}
    upload_routes: dict[str, str] = {}


class SequenceGuard(RequestGuard):
    limits = {"json": 1 << 20}
    upload_routes: dict[str, str] = {}


class _RecordModel:
    """What the table and sequence services share: the card, the session, the batcher, the
    answers. Not a service itself: each service below declares its own APIs."""

    kind = ""

    def _load(self, guard: type[RequestGuard]) -> None:
        model_dir = model_dir_from_env(DEFAULT_MODEL_DIR)
        self.card: ModelCard = load_card(
            model_dir, self.kind, f"deploy.service:{type(self).__name__}"
        )
        card = self.card
        self.spec = card.preprocess
        self.max_batch_size = card.max_batch_size
        max_latency_ms = int(card.raw.get("max_latency_ms") or DEFAULT_MAX_LATENCY_MS)
        steps = card.input_shape[0] if self.kind == "sequence" else 1
        max_bytes = int(
            os.environ.get(MAX_BYTES_ENV)
            or card.raw.get("max_request_bytes")
            or records_limit(self.spec, self.max_batch_size, steps)
        )
        guard.limits = {"json": max_bytes}
        guard.foreign = foreign_routes(self.kind, card.summary, ROUTES[self.kind])
        self.info_payload = PredictorInfo(
            model_version=card.model_version,
            model=card.model,
            kind=card.kind,
            task=card.task,
            target=card.target,
            class_names=list(card.class_names),
            input_shape=list(card.input_shape),
            columns=card.columns,
            window=steps if self.kind == "sequence" else None,
            preprocess=self.spec,
            max_batch_size=self.max_batch_size,
            max_latency_ms=max_latency_ms,
            max_request_bytes=max_bytes,
            served_variant=card.raw.get("served_variant"),
            metrics={k: float(v) for k, v in (card.raw.get("metrics") or {}).items()},
        )
        self.session = open_session(model_dir / MODEL_FILE)
        check_session(self.session, card.input_shape, card.num_outputs, card.task)
        self.batch_sizes = batch_size_histogram(
            self.max_batch_size, f"{self.kind}_predictor_batch_size", "Examples"
        )
        self._batched = AdaptiveBatcher(
            self._outputs, self.max_batch_size, max_latency_ms / 1000, INLINE_ROWS
        )

    def _outputs(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.observe(batch.shape[0])
        logits = self.session.run(None, {INPUT_NAME: batch})[0]
        return model_outputs(logits, self.card.regression)

    async def answer(self, batch: np.ndarray) -> list[Prediction | ValuePrediction]:
        """Encoded float32 examples -> one answer each, through the batcher."""
        out = await self._batched(batch)
        if self.card.regression:
            return [value_answer(v, self.card) for v in out]
        return [class_answer(row, self.card) for row in out]


@bentoml.service(
    workers="cpu_count",
    traffic={"timeout": 30},
    logging={"access": {"enabled": False}},
)
class TablePredictor(_RecordModel):
    """Classify table rows or predict a value from them, with the ONNX model in the bento."""

    kind = "table"

    def __init__(self) -> None:
        self._load(TableGuard)

    @bentoml.api
    async def predict_row(self, row: RowField) -> Answer:
        """One row of column -> value: its class (classification) or value (regression)."""
        try:
            x = encode_row(row, self.spec)
        except InvalidArgument as exc:
            return bad_request(exc)
        return (await self.answer(x))[0]

    @bentoml.api
    async def predict_rows(self, rows: RowsField) -> Predictions:
        """Up to ``max_batch_size`` rows in one call; answers in the same order."""
        try:
            x = encode_rows(rows, self.spec, self.max_batch_size)
        except InvalidArgument as exc:
            return bad_request(exc)
        return Predictions.model_construct(predictions=await self.answer(x))

    @bentoml.api
    def info(self) -> PredictorInfo:
        """What this service serves: the task, the columns and their preprocessing, limits."""
        return self.info_payload


@bentoml.service(
    workers="cpu_count",
    traffic={"timeout": 30},
    logging={"access": {"enabled": False}},
)
class SequencePredictor(_RecordModel):
    """Forecast from a window of a time series, or classify whole sequences (LSTM/GRU)."""

    kind = "sequence"

    def __init__(self) -> None:
        self._load(SequenceGuard)

    @bentoml.api
    async def forecast(self, window: WindowField) -> Answer:
        """One sequence of T steps: the forecast value (regression) or its class."""
        try:
            x = encode_window(window, self.spec, self.card.input_shape)
        except InvalidArgument as exc:
            return bad_request(exc)
        return (await self.answer(x))[0]

    @bentoml.api
    async def predict_sequences(self, sequences: SequencesField) -> Predictions:
        """Up to ``max_batch_size`` sequences in one call; answers in the same order."""
        try:
            x = encode_sequences(sequences, self.spec, self.card.input_shape, self.max_batch_size)
        except InvalidArgument as exc:
            return bad_request(exc)
        return Predictions.model_construct(predictions=await self.answer(x))

    @bentoml.api
    def info(self) -> PredictorInfo:
        """What this service serves: the task, the window, the columns and their
        preprocessing, limits."""
        return self.info_payload


TablePredictor.add_asgi_middleware(TableGuard)
SequencePredictor.add_asgi_middleware(SequenceGuard)
