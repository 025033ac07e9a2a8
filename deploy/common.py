"""What every service shares, whatever it serves: the model card, the tasks, the answers.

One card loader (:func:`load_card`) for every kind and role; the data kind's adapter
(``image.py``, ``table.py``, ``sequence.py``) checks what only its kind has. What differs
between classification and regression (outputs, answers, the check of the model's outputs)
lives in :data:`TASKS`. Imports only numpy, pydantic and bentoml: the edge bento stays lean.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

MODEL_DIR_ENV = "MODEL_DIR"
# Request bodies larger than a full batch could need are refused before JSON parsing (a big
# nested list costs ~30x its size in Python objects). Override with this variable.
MAX_BYTES_ENV = "MAX_REQUEST_BYTES"
# ... and never more than this by default, whatever the input size: a full batch of 64
# 3x224x224 images written as long JSON floats would be 231 MB, ~7 GB parsed, per request and
# worker. Big batches go as .npy uploads; package.max_request_bytes (or the variable) raises it.
DEFAULT_MAX_JSON_BYTES = 4 << 20
# Admission control, per worker process. Requests handled at once (reading, queued, running):
# more get a 503 at once, with Retry-After, instead of waiting with their body parsed.
MAX_CONCURRENCY_ENV = "MAX_CONCURRENT_REQUESTS"
DEFAULT_MAX_CONCURRENCY = 64
# Examples waiting for the model: a request that would queue more is shed at once (503) rather
# than waiting behind many full batches. Default: this many full batches.
MAX_QUEUED_ROWS_ENV = "MAX_QUEUED_ROWS"
DEFAULT_QUEUED_BATCHES = 8
# One ONNX Runtime thread per worker: the models are tiny, HTTP + JSON dominate the latency,
# and more threads only contend with the server's own. Raise it for bigger models.
THREADS_ENV = "ORT_INTRA_OP_THREADS"
MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
INPUT_NAME = "inputs"  # the ONNX input of every model the pipeline exports, whatever its kind
OLD_INPUT_NAME = "images"  # its name in models exported before it was renamed
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_LATENCY_MS = 10_000
BYTES_PER_NUMBER = 24  # the longest JSON float, e.g. "254.99999999999997, ", plus brackets


def tracing_off_unless_asked() -> None:
    """Switch OpenTelemetry off unless the environment says otherwise.

    BentoML wraps every request in OpenTelemetry spans, exported nowhere unless tracing is
    configured; measured here they cost ~30 % of the CPU a small-model request takes. Set
    ``OTEL_SDK_DISABLED=false`` (and BentoML's ``tracing`` config) to trace. Called when a
    service module is imported: BentoML builds its tracer after importing the service.
    """
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")


# -- answers ---------------------------------------------------------------------------------


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
    """One answer, as the OpenAPI page documents it: a classification answer is a
    :class:`Prediction`, a regression answer a :class:`ValuePrediction` (only the fields of
    the model's task are sent). BentoML gives no OpenAPI for a top-level union."""

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


class Predictions(BaseModel):
    predictions: list[Prediction | ValuePrediction] = Field(
        description="one answer per example, in the request's order: "
        "{label, class_index, probabilities, ...} for classification, {value, target, ...} "
        "for regression"
    )


def constructor(model: type[BaseModel]) -> Callable[..., BaseModel]:
    """``model.model_construct`` for calls that name every field of ``model``, ~3x cheaper (64
    answers: ~0.1 ms of CPU instead of ~0.3): what ``model_construct`` leaves in the instance,
    without its per-field search for aliases and defaults. For a model that has aliases, a root,
    extra fields or a post-init, ``model_construct`` itself."""
    fields = model.model_fields
    if (
        model.__pydantic_root_model__
        or model.__pydantic_post_init__
        or model.model_config.get("extra") == "allow"
        or any(f.alias or f.validation_alias for f in fields.values())
    ):
        return model.model_construct
    names, new, set_attribute = frozenset(fields), object.__new__, object.__setattr__

    def construct(**values: Any) -> BaseModel:
        instance = new(model)
        set_attribute(instance, "__dict__", values)
        set_attribute(instance, "__pydantic_fields_set__", set(names))
        set_attribute(instance, "__pydantic_extra__", None)
        set_attribute(instance, "__pydantic_private__", None)
        return instance

    return construct


_construct_prediction = constructor(Prediction)
_construct_value_prediction = constructor(ValuePrediction)


# -- tasks -----------------------------------------------------------------------------------


class Classification:
    """Softmax probabilities over the card's classes; answers ``{label, probabilities}``."""

    name = "classification"
    hands_off = True  # the edge forwards the examples it is unsure about

    def check_classes(self, names: Any, where: Path) -> tuple[str, ...]:
        if not isinstance(names, list) or not names or len(set(names)) != len(names):
            raise ValueError(f"{where}: class_names must be a non-empty list of unique names")
        return tuple(str(n) for n in names)

    def num_outputs(self, card: ModelCard) -> int:
        return len(card.class_names)

    def wrong_outputs(self, shape: tuple[int, ...], card: ModelCard) -> str:
        return (
            f"model answers logits of shape {shape} for one example, but model.json lists "
            f"{len(card.class_names)} classes"
        )

    def outputs(self, logits: np.ndarray) -> np.ndarray:
        z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def answers(self, outputs: np.ndarray, card: ModelCard) -> list[Prediction]:
        """One answer per row of probabilities (the rows read out of numpy at once)."""
        names, construct = card.class_names, _construct_prediction
        # Built from our own checked values: construct, don't validate.
        return [
            construct(
                label=names[idx],
                class_index=idx,
                probabilities=dict(zip(names, row, strict=True)),
                model_version=card.model_version,
                model=card.model,
            )
            for idx, row in zip(outputs.argmax(axis=1).tolist(), outputs.tolist(), strict=True)
        ]

    def confidence(self, outputs: np.ndarray) -> np.ndarray:
        """The top probability of each example (what the edge hands off on)."""
        return outputs.max(axis=1)

    def describe(self, card: ModelCard) -> str:
        return f"of {len(card.class_names)} classes"


class Regression:
    """One value per example, in the target's own units; answers ``{value, target}``."""

    name = "regression"
    hands_off = False  # one value, no class probabilities: nothing to be unsure about

    def check_classes(self, names: Any, where: Path) -> tuple[str, ...]:
        if names:
            raise ValueError(f"{where}: a regression model has no class_names")
        return ()

    def num_outputs(self, card: ModelCard) -> int:
        return 1

    def wrong_outputs(self, shape: tuple[int, ...], card: ModelCard) -> str:
        return (
            f"model answers outputs of shape {shape} for one example; a regression model "
            "answers (1, 1)"
        )

    def outputs(self, logits: np.ndarray) -> np.ndarray:
        return logits.reshape(len(logits), -1)[:, 0].astype(np.float64)

    def answers(self, outputs: np.ndarray, card: ModelCard) -> list[ValuePrediction]:
        """One answer per predicted value."""
        construct = _construct_value_prediction
        return [
            construct(
                value=value, target=card.target, model_version=card.model_version, model=card.model
            )
            for value in outputs.tolist()
        ]

    def describe(self, card: ModelCard) -> str:
        return f"predicting {card.target!r}" if card.target else "predicting a value"


Task = Classification | Regression
TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Regression())}


# -- the model card --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """A checked ``model.json``: what the model takes and gives, and the serving limits."""

    kind: str
    task: Task
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]  # of one example: (C, H, W), (F,) or (T, F)
    target: str
    model_version: str
    model: str
    max_batch_size: int
    max_latency_ms: int
    raw: dict  # the whole card, for what one kind or role reads (preprocess, edge, ...)

    @property
    def num_outputs(self) -> int:
        return self.task.num_outputs(self)

    @property
    def summary(self) -> str:
        """E.g. "a table regression model predicting 'price'"."""
        article = "an" if self.kind[0] in "aeiou" else "a"
        return f"{article} {self.kind} {self.task.name} model {self.task.describe(self)}"


def load_card(
    model_dir: Path,
    kind: str,
    read_shape: Callable[[dict, Path], tuple[int, ...]],
    service: str,
) -> ModelCard:
    """Read and check ``model.json`` in ``model_dir``, which must describe a ``kind`` model
    (``service`` names who asks, for the message); ``read_shape`` is the kind adapter's check
    of its input shape. A card without ``kind`` describes an image classifier."""
    model_dir = Path(model_dir)
    card_file = model_dir / CARD_FILE
    if not (model_dir / MODEL_FILE).is_file() or not card_file.is_file():
        raise FileNotFoundError(
            f"{model_dir} must hold {MODEL_FILE} and {CARD_FILE} (set {MODEL_DIR_ENV} or "
            "serve the bento built by components/package.py)"
        )
    raw = json.loads(card_file.read_text())
    found = raw.get("kind", "image")
    if found != kind:
        raise ValueError(
            f"{card_file} describes a {found} model, but {service} serves {kind} models; serve "
            f"the bento the package stage built (it picks the service for the model's kind)"
        )
    task_name = raw.get("task", "classification")
    if task_name not in TASKS:
        raise ValueError(f"{card_file}: task must be one of {list(TASKS)}, got {task_name!r}")
    task = TASKS[task_name]
    class_names = task.check_classes(raw.get("class_names"), card_file)
    input_shape = read_shape(raw, card_file)
    if not raw.get("model_version"):
        raise ValueError(f"{card_file}: model_version is missing")
    return ModelCard(
        kind=kind,
        task=task,
        class_names=class_names,
        input_shape=input_shape,
        target=str(raw.get("target") or ""),
        model_version=str(raw["model_version"]),
        model=str(raw.get("model") or "unknown"),
        max_batch_size=int(raw.get("max_batch_size") or DEFAULT_MAX_BATCH_SIZE),
        max_latency_ms=int(raw.get("max_latency_ms") or DEFAULT_MAX_LATENCY_MS),
        raw=raw,
    )


def model_dir_from_env(default: Path) -> Path:
    return Path(os.environ.get(MODEL_DIR_ENV) or default)


def positive_setting(name: str, default: int) -> int:
    """A whole number >= 1 from the environment variable ``name``, else ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {raw!r}")
    return int(raw)


def open_session(model_file: Path):
    """An ONNX Runtime CPU session with ``ORT_INTRA_OP_THREADS`` threads (default 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get(THREADS_ENV, "1"))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
    )


def check_session(session: Any, card: ModelCard) -> None:
    """Fail at start-up, not on the first request, when the model and its card disagree."""
    names = [i.name for i in session.get_inputs()]
    if names == [OLD_INPUT_NAME]:
        raise ValueError(
            f"{MODEL_FILE} names its input {OLD_INPUT_NAME!r}, as models exported before it was "
            f"renamed {INPUT_NAME!r} do: package the model again with this version of the "
            "pipeline (`make pipeline`), or serve the bento it was packaged in"
        )
    if names != [INPUT_NAME]:
        raise ValueError(f"{MODEL_FILE} takes inputs {names}; the service feeds {INPUT_NAME!r}")
    probe = np.zeros((1, *card.input_shape), dtype=np.float32)
    logits = session.run(None, {INPUT_NAME: probe})[0]
    if logits.shape != (1, card.num_outputs):
        raise ValueError(card.task.wrong_outputs(logits.shape, card))


# -- JSON arrays of pixels ---------------------------------------------------------------------


class JSONByteArray:
    """A request field's value that the services' JSON reading (``base.py``) found to be a
    rectangular nested JSON array of whole numbers 0-255, read straight into ``array`` (uint8,
    the shape of the nested lists) without building Python lists. Made only for the routes
    that ask for it (``Route.byte_arrays``); their decode reads ``array``. ``tolist()`` and
    indexing give the value as the client sent it (for the edge's call to the cloud)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> Any:
        return self.array[index].tolist()

    def tolist(self) -> list:
        return self.array.tolist()


# -- what a data kind's adapter declares ------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One API of a data kind: ``POST /<name>`` taking the one field ``field``.

    ``decode`` turns the field's value into the model's checked float32 input ``(N, ...)``
    or raises ``InvalidArgument`` naming the field and the rule. A route answers one answer,
    or ``{"predictions": [...]}`` when ``many``. An upload route takes a multipart file
    (``upload_limit(card, json_limit)`` is its byte limit); the edge serves JSON routes only.
    ``example(card)`` is what the OpenAPI page offers for the card's model: a JSON route's
    field value that the route answers with a 200, or for an upload route a shell command
    that writes such a file.
    """

    name: str
    field: str
    schema: Any  # the field's type, Annotated with its description and (illustrative) examples
    decode: Callable[[Any, ModelCard], np.ndarray]
    many: bool
    doc: str
    upload_limit: Callable[[ModelCard, int], int] | None = None
    example: Callable[[ModelCard], Any] | None = None
    # The field is usually nested lists of whole numbers 0-255 (pixels): the JSON reading may
    # hand ``decode`` a :class:`JSONByteArray` instead of the lists.
    byte_arrays: bool = False

    @property
    def path(self) -> str:
        return f"/{self.name}"


@dataclass(frozen=True)
class DataKind:
    """How one kind of data is served: its routes, what its card must hold, its limits."""

    name: str
    routes: tuple[Route, ...]
    read_shape: Callable[[dict, Path], tuple[int, ...]]  # the card's input shape, checked
    request_limit: Callable[[ModelCard], int]  # JSON bytes a full batch fits in
    info: type[BaseModel]  # the /info answer: ServiceInfo and this kind's fields
    info_fields: Callable[[ModelCard], dict[str, Any]]

    @property
    def batch_route(self) -> Route:
        """The JSON route taking a list of examples (where the edge forwards unsure ones)."""
        return next(r for r in self.routes if r.many and r.upload_limit is None)


class ServiceInfo(BaseModel):
    """What /info answers for every kind; each kind's adapter adds its own fields."""

    model_version: str = Field(description="the version of the bento serving it")
    model: str = Field(description="name:variant-hash of the ONNX model")
    kind: str = Field(description="image | table | sequence")
    task: str = Field(description="classification | regression")
    target: str = Field(description="regression: what the model predicts (may be empty)")
    class_names: list[str] = Field(description="classification: the classes; empty otherwise")
    input_shape: list[int] = Field(description="the shape of one example the model takes")
    max_batch_size: int = Field(description="most examples per request")
    max_latency_ms: int = Field(description="adaptive batching's latency budget")
    max_request_bytes: int = Field(description="largest JSON body accepted")
    max_concurrency: int = Field(
        description="requests one worker handles at once; more get 503 with Retry-After"
    )
    max_queued_rows: int = Field(
        description="examples one worker queues for the model; more get 503 with Retry-After"
    )
    served_variant: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
