"""What the cloud service (``service.py``) and the edge service (``edge_service.py``) share.

Reading and checking the model card, checking one image sent as nested JSON lists, encoding
table rows and sequences with the preprocessing the model was trained behind
(``components/features.py``, shipped inside the bento), the answers' shapes, and the ASGI
guard that refuses bodies of the wrong type or size before BentoML parses them. It imports
only numpy, pydantic, starlette, bentoml and components/features.py (numpy only): no Pillow,
no ONNX Runtime, so the edge bento stays lean.

Every refusal is an :class:`~bentoml.exceptions.InvalidArgument` whose message starts with the
field (``image``, ``images[3]``, ``rows[2], column 'age'``, ``window[5]``, ``request body``)
and states the rule it broke; the services answer it as ``400 {"error": "<field>: <rule>"}``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from components.features import FeatureError, encode_records, feature_names

MODEL_DIR_ENV = "MODEL_DIR"
# Request bodies larger than a full batch could need are refused before JSON parsing (a big
# nested list costs ~30x its size in Python objects). Override with this variable.
MAX_BYTES_ENV = "MAX_REQUEST_BYTES"
# One ONNX Runtime thread per worker: the CNN is tiny, HTTP + JSON dominate the latency, and
# more threads only contend with the server's own. Raise it for bigger models.
THREADS_ENV = "ORT_INTRA_OP_THREADS"
MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
INPUT_NAME = "images"
KINDS = ("image", "table", "sequence")
TASKS = ("classification", "regression")
PIXEL_MIN, PIXEL_MAX = 0.0, 255.0
DEFAULT_MAX_BATCH_SIZE = 64
BYTES_PER_PIXEL = 24  # the longest JSON float, e.g. "254.99999999999997, ", plus brackets


def tracing_off_unless_asked() -> None:
    """Switch OpenTelemetry off unless the environment says otherwise.

    BentoML wraps every request in OpenTelemetry spans, exported nowhere unless tracing is
    configured; measured here they cost ~30 % of the CPU a small-model request takes. Set
    ``OTEL_SDK_DISABLED=false`` (and BentoML's ``tracing`` config) to trace. Called when a
    service module is imported: BentoML builds its tracer after importing the service.
    """
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")


class Prediction(BaseModel):
    label: str = Field(description="the most probable class name")
    class_index: int = Field(description="its index in the model's class list")
    probabilities: dict[str, float] = Field(description="softmax probability of every class")
    model_version: str = Field(description="the version of the bento that answered")
    model: str = Field(description="name:variant-hash of the ONNX model that answered")


class ValuePrediction(BaseModel):
    value: float = Field(description="the predicted value, in the target's own units")
    target: str = Field(description="what is predicted: the target column (may be empty)")
    model_version: str = Field(description="the version of the bento that answered")
    model: str = Field(description="name:variant-hash of the ONNX model that answered")


class Answer(BaseModel):
    """One answer of a table or sequence service, as its OpenAPI page documents it: a
    classification answer is a :class:`Prediction`, a regression answer a
    :class:`ValuePrediction` (only the fields of the model's task are sent)."""

    label: str | None = Field(None, description="classification: the most probable class")
    class_index: int | None = Field(None, description="classification: its index")
    probabilities: dict[str, float] | None = Field(
        None, description="classification: softmax probability of every class"
    )
    value: float | None = Field(
        None, description="regression: the predicted value, in the target's own units"
    )
    target: str | None = Field(None, description="regression: the target column")
    model_version: str = Field(description="the version of the bento that answered")
    model: str = Field(description="name:variant-hash of the ONNX model that answered")


def read_card(model_dir: Path) -> dict:
    """Read and check ``model.json`` (kind, task, classes, input shape, preprocessing,
    version) from ``model_dir``. A card without ``kind`` describes an image classifier."""
    model_dir = Path(model_dir)
    card_file = model_dir / CARD_FILE
    if not (model_dir / MODEL_FILE).is_file() or not card_file.is_file():
        raise FileNotFoundError(
            f"{model_dir} must hold {MODEL_FILE} and {CARD_FILE} (set {MODEL_DIR_ENV} or "
            "serve the bento built by components/package.py)"
        )
    card = json.loads(card_file.read_text())
    kind, task = card.get("kind", "image"), card.get("task", "classification")
    if kind not in KINDS:
        raise ValueError(f"{card_file}: kind must be one of {list(KINDS)}, got {kind!r}")
    if task not in TASKS:
        raise ValueError(f"{card_file}: task must be one of {list(TASKS)}, got {task!r}")
    names = card.get("class_names")
    if task == "regression":
        if names:
            raise ValueError(f"{card_file}: a regression model has no class_names")
    elif not isinstance(names, list) or not names or len(set(names)) != len(names):
        raise ValueError(f"{card_file}: class_names must be a non-empty list of unique names")
    if kind == "image":
        shape = card.get("image_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(int(d) >= 1 for d in shape)):
            raise ValueError(f"{card_file}: image_shape must be [C, H, W]")
    else:
        shape = card.get("input_shape")
        rank, layout = (1, "[F]") if kind == "table" else (2, "[T, F]")
        if not (
            isinstance(shape, list)
            and len(shape) == rank
            and all(isinstance(d, int) and d >= 1 for d in shape)
        ):
            raise ValueError(f"{card_file}: input_shape must be {layout} for a {kind} model")
        check_spec(card.get("preprocess"), shape, kind, card_file)
    if not card.get("model_version"):
        raise ValueError(f"{card_file}: model_version is missing")
    return card


def check_spec(spec: Any, input_shape: Sequence[int], kind: str, where: Any) -> None:
    """A table's or sequence's preprocess spec must encode exactly the model's features."""
    if not isinstance(spec, dict) or not isinstance(spec.get("columns"), list):
        raise ValueError(
            f"{where}: a {kind} model needs its preprocess spec (components/features.py) with "
            "a list of columns; re-run the ingest stage"
        )
    try:
        for col in spec["columns"]:
            if col["type"] == "numeric":
                float(col["mean"]), float(col["std"])
            elif col["type"] != "categorical" or not isinstance(col["categories"], list):
                raise TypeError
        width = len(feature_names(spec["columns"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: the preprocess spec's columns are malformed") from None
    if width != input_shape[-1]:
        raise ValueError(
            f"{where}: the preprocess spec encodes {width} features but the model takes "
            f"{input_shape[-1]}"
        )
    window = spec.get("window")
    if kind == "sequence" and window is not None and window != input_shape[0]:
        raise ValueError(
            f"{where}: the preprocess spec's window is {window} steps but the model takes "
            f"{input_shape[0]}"
        )


@dataclass(frozen=True)
class ModelCard:
    """A checked model card of a table or sequence model, as the services use it."""

    kind: str
    task: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    preprocess: dict
    target: str
    model_version: str
    model: str
    max_batch_size: int
    raw: dict

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def num_outputs(self) -> int:
        return 1 if self.regression else len(self.class_names)

    @property
    def columns(self) -> list[str]:
        """The input columns a row (or one time step) holds, in the model's order."""
        return [str(c["name"]) for c in self.preprocess["columns"]]

    @property
    def summary(self) -> str:
        """E.g. "a table regression model predicting 'price'"."""
        what = (
            f"predicting {self.target!r}" if self.regression and self.target
            else f"of {len(self.class_names)} classes" if not self.regression
            else "predicting a value"
        )  # fmt: skip
        return f"a {self.kind} {self.task} model {what}"


def load_card(model_dir: Path, kind: str, service: str) -> ModelCard:
    """The card in ``model_dir`` (see :func:`read_card`), which must describe a ``kind`` model."""
    card = read_card(model_dir)
    require_kind(card, kind, service, Path(model_dir) / CARD_FILE)
    return ModelCard(
        kind=kind,
        task=card.get("task", "classification"),
        class_names=tuple(str(n) for n in card.get("class_names") or ()),
        input_shape=tuple(int(d) for d in card["input_shape"]),
        preprocess=card["preprocess"],
        target=str(card.get("target") or ""),
        model_version=str(card["model_version"]),
        model=str(card.get("model") or "unknown"),
        max_batch_size=int(card.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE),
        raw=card,
    )


def require_kind(card: dict, kind: str, service: str, where: Any) -> None:
    """Refuse at start-up a card of another data kind than the service serves."""
    found = card.get("kind", "image")
    if found != kind:
        raise ValueError(
            f"{where} describes a {found} model, but {service} serves {kind} models; serve "
            f"the bento the package stage built (it picks the service for the model's kind)"
        )


def model_dir_from_env(default: Path) -> Path:
    return Path(os.environ.get(MODEL_DIR_ENV) or default)


def open_session(model_file: Path):
    """An ONNX Runtime CPU session with ``ORT_INTRA_OP_THREADS`` threads (default 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get(THREADS_ENV, "1"))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
    )


def check_session(
    session: Any, image_shape: tuple[int, ...], n_classes: int, task: str = "classification"
) -> None:
    """Fail at start-up, not on the first request, when the model and its card disagree."""
    probe = np.zeros((1, *image_shape), dtype=np.float32)
    logits = session.run(None, {INPUT_NAME: probe})[0]
    if logits.shape != (1, n_classes):
        if task == "regression":
            raise ValueError(
                f"model answers outputs of shape {logits.shape} for one example; a regression "
                "model answers (1, 1)"
            )
        raise ValueError(
            f"model answers logits of shape {logits.shape} for one image, but model.json "
            f"lists {n_classes} classes"
        )


def to_chw(image: Any, image_shape: tuple[int, int, int], field: str = "image") -> np.ndarray:
    """Turn one image given as nested lists into a float32 (C, H, W) array, or raise.

    Accepted layouts: (H, W) when C is 1, (C, H, W), and (H, W, C). When C == H == W the
    layouts cannot be told apart and (C, H, W) wins. Raises ``InvalidArgument`` whose message
    names ``field`` and the rule that failed.
    """
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
    check_numbers(arr, field)
    return check_pixels(to_layout(arr, image_shape, field), field)


def check_numbers(arr: np.ndarray, field: str) -> None:
    if arr.dtype.kind not in "iuf":
        found = {"b": "booleans", "U": "text", "S": "text"}.get(
            arr.dtype.kind, "null, objects or integers too large"
        )
        raise InvalidArgument(f"{field}: every pixel must be a number; found {found}")
    if arr.size == 0:
        raise InvalidArgument(f"{field}: must not be empty")


def check_pixels(arr: np.ndarray, field: str) -> np.ndarray:
    """Finite values in [0, 255] -> the same values as float32; else ``InvalidArgument``."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidArgument(f"{field}: NaN or infinite pixel values are not allowed")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < PIXEL_MIN or hi > PIXEL_MAX:
        raise InvalidArgument(
            f"{field}: pixel values must lie in [0, 255] (raw pixels, not scaled); "
            f"found min {lo:g}, max {hi:g}"
        )
    return arr.astype(np.float32)


def to_layout(arr: np.ndarray, image_shape: tuple[int, int, int], field: str) -> np.ndarray:
    """(H, W), (C, H, W) or (H, W, C) -> (C, H, W); anything else is refused."""
    out = batch_layout(arr[None], image_shape)
    if out is None:
        c, h, w = image_shape
        accepted = [f"(C, H, W) = {(c, h, w)}", f"(H, W, C) = {(h, w, c)}"]
        if c == 1:
            accepted.insert(0, f"(H, W) = {(h, w)}")
        raise InvalidArgument(
            f"{field}: shape {tuple(arr.shape)} is not accepted; expected " + " or ".join(accepted)
        )
    return out[0]


def batch_layout(arr: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray | None:
    """(N, H, W), (N, C, H, W) or (N, H, W, C) -> (N, C, H, W); None for any other shape."""
    c, h, w = image_shape
    if arr.ndim == 3 and c == 1 and arr.shape[1:] == (h, w):
        return arr[:, None]
    if arr.ndim == 4 and arr.shape[1:] == (c, h, w):
        return arr
    if arr.ndim == 4 and arr.shape[1:] == (h, w, c):
        return arr.transpose(0, 3, 1, 2)
    return None


def to_batch(images: Any, image_shape: tuple[int, int, int], max_batch_size: int) -> np.ndarray:
    """Check a list of images (each as for :func:`to_chw`) into a float32 (N, C, H, W) array.

    A well-formed batch is checked as one array; when that fails, image by image, so that
    the message names the first bad one (``images[3]: ...``).
    """
    if not isinstance(images, list):
        raise InvalidArgument("images: must be a list of images")
    if len(images) == 0:
        raise InvalidArgument("images: must hold at least 1 image")
    if len(images) > max_batch_size:
        raise InvalidArgument(
            f"images: at most {max_batch_size} images per request, got {len(images)}"
        )
    try:
        whole = batch_layout(np.asarray(images), image_shape)
        if whole is not None and whole.dtype.kind in "iuf":
            return check_pixels(whole, "images")
    except (ValueError, TypeError, OverflowError, InvalidArgument):
        pass  # ragged, mixed or bad somewhere: find out where, below
    return np.stack([to_chw(img, image_shape, f"images[{i}]") for i, img in enumerate(images)])


def to_array_batch(
    arr: np.ndarray, image_shape: tuple[int, int, int], max_batch_size: int, field: str
) -> np.ndarray:
    """Check an (N, ...) numeric array of images into float32 (N, C, H, W), or raise."""
    check_numbers(arr, field)
    batch = batch_layout(arr, image_shape)
    if batch is None:
        c, h, w = image_shape
        accepted = [f"(N, C, H, W) = (N, {c}, {h}, {w})", f"(N, H, W, C) = (N, {h}, {w}, {c})"]
        if c == 1:
            accepted.insert(0, f"(N, H, W) = (N, {h}, {w})")
        raise InvalidArgument(
            f"{field}: shape {tuple(arr.shape)} is not accepted; expected " + " or ".join(accepted)
        )
    if not 1 <= len(batch) <= max_batch_size:
        raise InvalidArgument(
            f"{field}: between 1 and {max_batch_size} images per request, got {len(batch)}"
        )
    return check_pixels(batch, field)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- tables and sequences: JSON rows -> the model's features, by the trained transform ---------


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


def _relocate(message: str, where: Callable[[int], str], field: str) -> str:
    """components/features.py names rows ``row 3, column 'age': ...``; name them as the
    request does (``rows[3], column 'age': ...``, ``window[3], ...``)."""
    found = re.match(r"row (\d+)(.*)", message, flags=re.S)
    if found:
        return where(int(found.group(1))) + found.group(2)
    return f"{field}: {message}"


def _encode(records: list, spec: dict, field: str, where: Callable[[int], str]) -> np.ndarray:
    """JSON rows -> float32 features with ``spec``; every refusal names the row and column."""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidArgument(
                f"{where(i)}: must be an object of column -> value, got {_json_type(record)}"
            )
        for name, value in record.items():
            if value is not None and not isinstance(value, str | int | float):
                raise InvalidArgument(
                    f"{where(i)}, column {name!r}: must be a number, text, true/false or "
                    f"null, got {_json_type(value)}"
                )
    try:
        return encode_records(records, spec)
    except FeatureError as exc:
        raise InvalidArgument(_relocate(str(exc), where, field)) from None


def _check_count(items: Any, what: str, field: str, max_items: int) -> None:
    if not isinstance(items, list):
        raise InvalidArgument(f"{field}: must be a list of {what}s, got {_json_type(items)}")
    if not items:
        raise InvalidArgument(f"{field}: must hold at least 1 {what}")
    if len(items) > max_items:
        raise InvalidArgument(
            f"{field}: at most {max_items} {what}s per request (package.max_batch_size), "
            f"got {len(items)}"
        )


def encode_rows(rows: Any, spec: dict, max_rows: int, field: str = "rows") -> np.ndarray:
    """A list of ``{column: value}`` rows -> float32 ``(N, F)`` features, or raise.

    Numbers are standardised, a missing one (null) becomes the training mean, categories are
    one-hot encoded (an unseen one is all zeros): the transform of components/features.py.
    """
    _check_count(rows, "row", field, max_rows)
    return _encode(rows, spec, field, lambda i: f"{field}[{i}]")


def encode_row(row: Any, spec: dict, field: str = "row") -> np.ndarray:
    """One ``{column: value}`` row -> float32 ``(1, F)``, or raise."""
    return _encode([row], spec, field, lambda i: field)


def encode_sequences(
    sequences: Any, spec: dict, input_shape: tuple[int, int], max_items: int,
    field: str = "sequences",
) -> np.ndarray:  # fmt: skip
    """A list of sequences, each ``T`` steps (see :func:`encode_window`) -> ``(N, T, F)``."""
    _check_count(sequences, "sequence", field, max_items)
    return _encode_steps(
        sequences, spec, input_shape, [f"{field}[{i}]" for i in range(len(sequences))], field
    )


def encode_window(
    window: Any, spec: dict, input_shape: tuple[int, int], field: str = "window"
) -> np.ndarray:
    """One sequence of exactly ``T`` steps -> float32 ``(1, T, F)``, or raise.

    A step is a list of one value per input column (in the order /info lists them) or an
    object of column -> value; it is encoded like a table row.
    """
    return _encode_steps([window], spec, input_shape, [field], field)


def _encode_steps(
    sequences: list, spec: dict, input_shape: tuple[int, int], names: list[str], field: str
) -> np.ndarray:
    steps = input_shape[0]
    columns = [c["name"] for c in spec["columns"]]
    shape = f"{len(columns)} values (one per column {columns}) or an object of column -> value"
    records: list = []
    for sequence, where in zip(sequences, names, strict=True):
        if not isinstance(sequence, list):
            raise InvalidArgument(
                f"{where}: must be a list of {steps} steps, each {shape}; got "
                f"{_json_type(sequence)}"
            )
        if len(sequence) != steps:
            raise InvalidArgument(
                f"{where}: must hold exactly {steps} steps (the window the model was trained "
                f"on), got {len(sequence)}"
            )
        for t, step in enumerate(sequence):
            if isinstance(step, list):
                if len(step) != len(columns):
                    raise InvalidArgument(
                        f"{where}[{t}]: a step holds {shape}; got {len(step)} values"
                    )
                step = dict(zip(columns, step, strict=True))
            elif not isinstance(step, dict):
                raise InvalidArgument(f"{where}[{t}]: a step holds {shape}; got {_json_type(step)}")
            records.append(step)
    x = _encode(records, spec, field, lambda k: f"{names[k // steps]}[{k % steps}]")
    return x.reshape(len(sequences), steps, x.shape[-1])


def records_limit(spec: dict, max_batch_size: int, steps: int = 1) -> int:
    """Body size (bytes) a full batch of rows (or sequences of ``steps`` rows) fits in, each
    row written as an object of column -> the longest value (a long float or category)."""
    per_row = 2
    for col in spec["columns"]:
        longest = max((len(json.dumps(str(c))) for c in col.get("categories") or ()), default=0)
        per_row += len(json.dumps(str(col["name"]))) + 4 + max(BYTES_PER_PIXEL, longest)
    return max_batch_size * steps * per_row + 64 * 1024


def model_outputs(logits: np.ndarray, regression: bool) -> np.ndarray:
    """The model's raw outputs -> class probabilities (N, K), or values (N,) in target units."""
    if regression:
        return logits.reshape(len(logits), -1)[:, 0].astype(np.float64)
    return softmax(logits)


def class_answer(row: np.ndarray, card: ModelCard) -> Prediction:
    idx = int(row.argmax())
    return Prediction.model_construct(
        label=card.class_names[idx],
        class_index=idx,
        probabilities=dict(zip(card.class_names, row.tolist(), strict=True)),
        model_version=card.model_version,
        model=card.model,
    )


def value_answer(value: float, card: ModelCard) -> ValuePrediction:
    return ValuePrediction.model_construct(
        value=float(value), target=card.target, model_version=card.model_version, model=card.model
    )


# The routes each kind of model is served on (cloud; the edge serves the JSON ones).
ROUTES = {
    "image": ("/predict", "/predict_batch", "/predict_array", "/predict_image"),
    "table": ("/predict_row", "/predict_rows"),
    "sequence": ("/forecast", "/predict_sequences"),
}


def foreign_routes(kind: str, summary: str, own: Sequence[str]) -> dict[str, str]:
    """The other kinds' routes -> why this bento does not serve them (for :class:`RequestGuard`)."""
    return {
        route: (
            f"{route}: this bento serves {summary}, not {other}s; its routes are " + ", ".join(own)
        )
        for other, routes in ROUTES.items()
        if other != kind
        for route in routes
        if route not in own
    }


def bad_request(exc: InvalidArgument, status: int = 400) -> JSONResponse:
    # BentoML 1.4.39 answers an InvalidArgument with the body `[{"error": ...}]` (a stray
    # tuple); we answer `{"error": ...}`, the shape its own schema errors have.
    return JSONResponse({"error": str(exc)}, status_code=status)


def request_limit(image_shape: tuple[int, int, int], max_batch_size: int) -> int:
    """Body size (bytes) that a full batch of the longest-written pixels fits in."""
    return max_batch_size * int(np.prod(image_shape)) * BYTES_PER_PIXEL + 64 * 1024


class RequestGuard:
    """ASGI middleware that answers 415/413/400 before BentoML parses a POST body.

    Without it a multipart body without a boundary answers 500 (BentoML's form parser), a
    form field holding a URL makes BentoML download it, and a huge body is parsed into Python
    objects before any check of ours runs. JSON is the only body accepted, except on the
    routes in ``upload_routes``: there a multipart form with exactly one file, in the field
    the route names, and nothing else. A service subclasses this and fills ``limits`` (bytes
    per route, ``"json"`` for the others) once it knows its model.
    """

    limits: dict[str, int] = {"json": 1 << 20}
    upload_routes: dict[str, str] = {}  # route -> the one file field it takes
    # Routes of another kind of model (a table bento asked for /predict_image) -> a 404 that
    # says what this bento serves instead (:func:`foreign_routes`).
    foreign: dict[str, str] = {}

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.foreign:
            problem = self.foreign.get(scope["path"].rstrip("/"))
            if problem is not None:
                return await self._reject(scope, send, 404, problem)
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"application/json").decode("latin-1")
        media = content_type.split(";")[0].strip().lower()
        route = scope["path"].rstrip("/") or "/"
        upload_field = self.upload_routes.get(route)
        if upload_field is not None:
            if media != "multipart/form-data":
                message = (
                    f"request body: must be a multipart/form-data upload with the file in "
                    f"field {upload_field!r}, got Content-Type {media!r}"
                )
                return await self._reject(scope, send, 415, message)
            limit = self.limits.get(route, self.limits["json"])
        else:
            if media != "application/json":
                message = (
                    f"request body: must be JSON sent as Content-Type: application/json, "
                    f"got {media!r}"
                )
                return await self._reject(scope, send, 415, message)
            limit = self.limits["json"]
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._reject(
                    scope, send, 400, "Content-Length: must be a whole number"
                )
            if int(declared) > limit:
                return await self._reject(scope, send, 413, self._too_large(int(declared), limit))
            if upload_field is None:
                return await self.app(scope, receive, send)
        # Read the body here, within the limit, then replay it: chunked uploads (no declared
        # length) and the multipart forms we check before BentoML sees them.
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self._reject(scope, send, 413, self._too_large(len(body), limit))
        if upload_field is not None:
            problem = await check_upload_form(content_type, bytes(body), upload_field)
            if problem:
                return await self._reject(scope, send, 400, problem)
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
            f"(package.max_request_bytes / max_image_bytes in params.yaml, or {MAX_BYTES_ENV})"
        )

    @staticmethod
    async def _reject(scope: dict, send: Any, status: int, message: str) -> None:
        await JSONResponse({"error": message}, status_code=status)(scope, None, send)


async def check_upload_form(content_type: str, body: bytes, field: str) -> str | None:
    """Why a multipart body is not exactly one file in ``field`` (None when it is)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    if "boundary=" not in content_type.lower():
        return "request body: multipart/form-data needs a boundary in its Content-Type"

    async def stream():
        yield body

    headers = Headers({"content-type": content_type, "content-length": str(len(body))})
    parser = MultiPartParser(headers, stream(), max_files=2, max_fields=2)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        return f"request body: malformed multipart/form-data ({exc.message})"
    except Exception as exc:  # python-multipart raises its own types on garbage
        return f"request body: malformed multipart/form-data ({type(exc).__name__})"
    try:
        names = list(form.keys())
        values = form.getlist(field)
        if not values:
            return f"{field}: missing; send the image file in form field {field!r}"
        if set(names) != {field}:
            others = sorted(set(names) - {field})
            return f"{others[0]}: unknown form field; only {field!r} is accepted"
        if len(values) != 1:
            return f"{field}: exactly one file per request"
        if not isinstance(values[0], UploadFile):
            return f"{field}: must be an uploaded file (a form field with a filename), not text"
        return None
    finally:
        await form.close()


# -- the request fields of the table and sequence routes (cloud and edge alike) ------------

RowField = Annotated[
    dict[str, Any],
    Field(
        description="one row: an object of column -> value (numbers for numeric columns, "
        "text for categorical ones, null for a missing value); see /info for the columns"
    ),
]
RowsField = Annotated[
    list[Any], Field(description="a list of rows, each as for /predict_row; at most max_batch_size")
]
WindowField = Annotated[
    list[Any],
    Field(
        description="one sequence of exactly T steps (the window, see /info), oldest first; "
        "each step a list of one value per column, in the order /info lists them, or an "
        "object of column -> value"
    ),
]
SequencesField = Annotated[
    list[Any],
    Field(description="a list of sequences, each as for /forecast; at most max_batch_size"),
]
