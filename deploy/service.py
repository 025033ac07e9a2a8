"""The HTTP service: an ONNX image classifier behind BentoML, every input checked by us.

The model travels inside the bento, next to this file (``model/model.onnx`` and
``model/model.json``, written by ``components/package.py``), so serving needs no model store
and no floating ``:latest`` tag. For development point ``MODEL_DIR`` at any folder holding
those two files and run ``bentoml serve deploy/service.py:ImageClassifier``.

Clients send raw pixel values 0-255 as nested JSON lists; the model scales them itself. We
validate shape, type, range and finiteness ourselves (BentoML's ``Shape`` validator reshapes
instead of rejecting) and answer 400 with ``{"error": "<field>: <rule>"}``: no input may
produce a 5xx.
"""

import json
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

MODEL_DIR_ENV = "MODEL_DIR"
# One ONNX Runtime thread per worker: the CNN is tiny, HTTP + JSON dominate the latency, and
# more threads only contend with the server's own. Raise it for bigger models.
THREADS_ENV = "ORT_INTRA_OP_THREADS"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
INPUT_NAME = "images"
PIXEL_MIN, PIXEL_MAX = 0.0, 255.0
DEFAULT_MAX_BATCH_SIZE = 64
# Request bodies larger than a full batch could need are refused before JSON parsing (a big
# nested list costs ~30x its size in Python objects). Override with this variable.
MAX_BYTES_ENV = "MAX_REQUEST_BYTES"
BYTES_PER_PIXEL = 24  # the longest JSON float, e.g. "254.99999999999997, ", plus brackets


class Prediction(BaseModel):
    label: str = Field(description="the most probable class name")
    class_index: int = Field(description="its index in the model's class list")
    probabilities: dict[str, float] = Field(description="softmax probability of every class")
    model_version: str = Field(description="the version of the bento that answered")


class BatchPrediction(BaseModel):
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    model_version: str = Field(description="the version of the bento serving it")
    model: str | None = Field(None, description="name:variant-hash of the ONNX model")
    class_names: list[str]
    image_shape: list[int] = Field(description="(C, H, W) the model expects")
    max_batch_size: int
    served_variant: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


def read_card(model_dir: Path) -> dict:
    """Read and check ``model.json`` (class names, image shape, version) from ``model_dir``."""
    model_dir = Path(model_dir)
    card_file = model_dir / CARD_FILE
    if not (model_dir / MODEL_FILE).is_file() or not card_file.is_file():
        raise FileNotFoundError(
            f"{model_dir} must hold {MODEL_FILE} and {CARD_FILE} (set {MODEL_DIR_ENV} or "
            "serve the bento built by components/package.py)"
        )
    card = json.loads(card_file.read_text())
    names = card.get("class_names")
    shape = card.get("image_shape")
    if not isinstance(names, list) or not names or len(set(names)) != len(names):
        raise ValueError(f"{card_file}: class_names must be a non-empty list of unique names")
    if not (isinstance(shape, list) and len(shape) == 3 and all(int(d) >= 1 for d in shape)):
        raise ValueError(f"{card_file}: image_shape must be [C, H, W]")
    if not card.get("model_version"):
        raise ValueError(f"{card_file}: model_version is missing")
    return card


def to_chw(image: Any, image_shape: tuple[int, int, int], field: str = "image") -> np.ndarray:
    """Turn one image given as nested lists into a float32 (C, H, W) array, or raise.

    Accepted layouts: (H, W) when C is 1, (C, H, W), and (H, W, C). When C == H == W the
    layouts cannot be told apart and (C, H, W) wins. Raises ``InvalidArgument`` whose message
    names ``field`` and the rule that failed.
    """
    c, h, w = image_shape
    if not isinstance(image, list):
        raise InvalidArgument(f"{field}: must be a nested list of pixel values")
    if len(image) == 0:
        raise InvalidArgument(f"{field}: must not be empty")
    try:
        arr = np.asarray(image)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(
            f"{field}: must be a rectangular nested list of numbers (rows of unequal length?)"
        ) from None
    if arr.dtype.kind not in "iuf":
        found = {"b": "booleans", "U": "text", "S": "text"}.get(
            arr.dtype.kind, "null, objects or integers too large"
        )
        raise InvalidArgument(f"{field}: every pixel must be a number; found {found}")
    if arr.size == 0:
        raise InvalidArgument(f"{field}: must not be empty")
    if arr.ndim == 2 and c == 1 and arr.shape == (h, w):
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape == (c, h, w):
        pass
    elif arr.ndim == 3 and arr.shape == (h, w, c):
        arr = arr.transpose(2, 0, 1)
    else:
        accepted = [f"(C, H, W) = {(c, h, w)}", f"(H, W, C) = {(h, w, c)}"]
        if c == 1:
            accepted.insert(0, f"(H, W) = {(h, w)}")
        raise InvalidArgument(
            f"{field}: shape {tuple(arr.shape)} is not accepted; expected " + " or ".join(accepted)
        )
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{field}: NaN or infinite pixel values are not allowed")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < PIXEL_MIN or hi > PIXEL_MAX:
        raise InvalidArgument(
            f"{field}: pixel values must lie in [0, 255] (raw pixels, not scaled); "
            f"found min {lo:g}, max {hi:g}"
        )
    return arr.astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _bad_request(exc: InvalidArgument) -> JSONResponse:
    # BentoML 1.4.39 answers an InvalidArgument with the body `[{"error": ...}]` (a stray
    # tuple); we answer `{"error": ...}`, the shape its own schema errors have.
    return JSONResponse({"error": str(exc)}, status_code=400)


def request_limit(image_shape: tuple[int, int, int], max_batch_size: int) -> int:
    """Body size (bytes) that a full batch of the longest-written pixels fits in."""
    return max_batch_size * int(np.prod(image_shape)) * BYTES_PER_PIXEL + 64 * 1024


class RequestGuard:
    """ASGI middleware that answers 415/413 before BentoML parses a POST body.

    Without it a multipart body without a boundary answers 500 (BentoML's form parser), and
    a huge body is parsed into Python objects before any check of ours runs. The size limit
    is set by the service once it knows the model (``limits["max_bytes"]``).
    """

    limits: dict[str, int] = {"max_bytes": 1 << 20}

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        media = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if media != b"application/json":
            got = media.decode("latin-1")
            message = f"body must be JSON sent as Content-Type: application/json, got {got!r}"
            return await self._reject(scope, send, 415, message)
        limit = self.limits["max_bytes"]
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._reject(scope, send, 400, "Content-Length must be a whole number")
            if int(declared) > limit:
                return await self._reject(scope, send, 413, self._too_large(int(declared), limit))
            return await self.app(scope, receive, send)
        # No declared length (chunked upload): read it here, within the limit, then replay.
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self._reject(scope, send, 413, self._too_large(len(body), limit))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    def _too_large(size: int, limit: int) -> str:
        return (
            f"request body: {size} bytes is more than the {limit} allowed "
            f"(set {MAX_BYTES_ENV} to change it)"
        )

    @staticmethod
    async def _reject(scope: dict, send: Any, status: int, message: str) -> None:
        await JSONResponse({"error": message}, status_code=status)(scope, None, send)


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


@bentoml.service(traffic={"timeout": 30})
class ImageClassifier:
    """Classify images with the ONNX model shipped in the bento (or found in ``MODEL_DIR``)."""

    def __init__(self) -> None:
        import onnxruntime as ort

        model_dir = Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)
        card = read_card(model_dir)
        self.class_names: list[str] = [str(n) for n in card["class_names"]]
        self.image_shape: tuple[int, int, int] = tuple(int(d) for d in card["image_shape"])
        self.model_version: str = str(card["model_version"])
        self.max_batch_size = int(card.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        RequestGuard.limits["max_bytes"] = int(
            os.environ.get(MAX_BYTES_ENV) or request_limit(self.image_shape, self.max_batch_size)
        )
        self.info_payload = ModelInfo(
            model_version=self.model_version,
            model=card.get("model"),
            class_names=self.class_names,
            image_shape=list(self.image_shape),
            max_batch_size=self.max_batch_size,
            served_variant=card.get("served_variant"),
            metrics={k: float(v) for k, v in (card.get("metrics") or {}).items()},
        )

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get(THREADS_ENV, "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_dir / MODEL_FILE), sess_options=options, providers=["CPUExecutionProvider"]
        )
        # Fail at start-up, not on the first request, when the model and its card disagree.
        probe = np.zeros((1, *self.image_shape), dtype=np.float32)
        logits = self.session.run(None, {INPUT_NAME: probe})[0]
        if logits.shape != (1, len(self.class_names)):
            raise ValueError(
                f"model answers logits of shape {logits.shape} for one image, but model.json "
                f"lists {len(self.class_names)} classes"
            )

    def _classify(self, batch: np.ndarray) -> list[Prediction]:
        logits = self.session.run(None, {INPUT_NAME: batch})[0]
        probs = softmax(logits)
        out = []
        for row in probs:
            idx = int(row.argmax())
            out.append(
                Prediction(
                    label=self.class_names[idx],
                    class_index=idx,
                    probabilities={n: float(p) for n, p in zip(self.class_names, row, strict=True)},
                    model_version=self.model_version,
                )
            )
        return out

    @bentoml.api
    def predict(self, image: ImageField) -> Prediction:
        """Classify one image."""
        try:
            arr = to_chw(image, self.image_shape, "image")
        except InvalidArgument as exc:
            return _bad_request(exc)
        return self._classify(arr[None])[0]

    @bentoml.api
    def predict_batch(self, images: ImagesField) -> BatchPrediction:
        """Classify up to ``max_batch_size`` images in one call; answers in the same order."""
        try:
            if len(images) == 0:
                raise InvalidArgument("images: must hold at least 1 image")
            if len(images) > self.max_batch_size:
                raise InvalidArgument(
                    f"images: at most {self.max_batch_size} images per request, got {len(images)}"
                )
            batch = np.stack(
                [to_chw(img, self.image_shape, f"images[{i}]") for i, img in enumerate(images)]
            )
        except InvalidArgument as exc:
            return _bad_request(exc)
        return BatchPrediction(predictions=self._classify(batch))

    @bentoml.api
    def info(self) -> ModelInfo:
        """What this service serves: model version, classes, input shape, limits, metrics."""
        return self.info_payload


ImageClassifier.add_asgi_middleware(RequestGuard)
