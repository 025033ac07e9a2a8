"""The one service behind every bento: a data kind's adapter on top, ONNX Runtime below.

:class:`ModelService` loads the model card and the ONNX model once, fills in its request
guard's rules, and answers every route its data kind's adapter declares (``image.py``,
``table.py``, ``sequence.py``): decode and check the request, queue it for the adaptive
batcher (only checked inputs: a merged batch that fails fails every client in it; why not
BentoML's ``batchable=True``: see ``batching.py``), answer. The edge (``edge_service.py``)
derives from it. BentoML wants one importable class per bento: :func:`service_class` makes
it from a base and an adapter, and ``service.py`` / ``edge_service.py`` decorate it.
"""

from __future__ import annotations

import gc
import inspect
import os
import re
import threading
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin

import attrs
import bentoml
import numpy as np
import orjson
import simdjson
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field, create_model
from starlette.responses import Response

from deploy.batching import AdaptiveBatcher, Overloaded
from deploy.common import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_JSON_BYTES,
    DEFAULT_QUEUED_BATCHES,
    INPUT_NAME,
    MAX_BYTES_ENV,
    MAX_CONCURRENCY_ENV,
    MAX_QUEUED_ROWS_ENV,
    MODEL_FILE,
    Answer,
    DataKind,
    JSONByteArray,
    Predictions,
    Route,
    check_session,
    load_card,
    model_dir_from_env,
    open_session,
    positive_setting,
    tracing_off_unless_asked,
)
from deploy.guard import GuardRules, RequestGuard, RequestTimeout, bad_request, overloaded
from deploy.image import IMAGE
from deploy.sequence import SEQUENCE
from deploy.table import TABLE

tracing_off_unless_asked()

# Every data kind served: a new kind is one adapter module, listed here.
KINDS: tuple[DataKind, ...] = (IMAGE, TABLE, SEQUENCE)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
# A merged batch up to this many examples runs on the event loop: a thread hand-off costs
# more than the ~50 us per image the CNN needs. Bigger batches run in a worker thread so the
# loop keeps reading requests meanwhile (ONNX Runtime releases the GIL).
INLINE_ROWS = 16

_BATCH_HISTOGRAMS: dict = {}  # one per process and name: prometheus refuses a second one


def batch_size_histogram(max_batch_size: int, name: str):
    """Examples per model call, on /metrics as ``name`` (``image_classifier_batch_size``)."""
    if name not in _BATCH_HISTOGRAMS:
        # Imported here, not at module level: BentoML sets PROMETHEUS_MULTIPROC_DIR in the
        # worker after importing this module, and prometheus_client reads it on import.
        from prometheus_client import Histogram

        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch_size})
        _BATCH_HISTOGRAMS[name] = Histogram(
            name,
            "Examples per ONNX Runtime call after adaptive batching",
            buckets=[b for b in buckets if b <= max_batch_size] + [float("inf")],
        )
    return _BATCH_HISTOGRAMS[name]


def foreign_routes(kind: DataKind, summary: str, own: list[str]) -> dict[str, str]:
    """The other kinds' routes -> why this bento does not serve them (a 404 from the guard)."""
    return {
        route.path: (
            f"{route.path}: this bento serves {summary}, not {other.name}s; its routes are "
            + ", ".join(own)
        )
        for other in KINDS
        if other.name != kind.name
        for route in other.routes
        if route.path not in own
    }


class ModelService:
    """Serve the ONNX model in the bento (or in ``MODEL_DIR``) on a data kind's routes.

    This is the cloud service; :class:`deploy.edge_service.EdgeService` derives from it.
    :func:`service_class` fills in the class attributes, once per bento class.
    """

    kind: ClassVar[DataKind]
    service_name: ClassVar[str]  # "module:Class", for messages
    guard_rules: ClassVar[GuardRules]  # this class's guard's: filled in by __init__
    api_examples: ClassVar[dict[str, Any]]  # route path -> its example: filled in by __init__
    info_model: ClassVar[type[BaseModel]]  # the kind's /info answer (+ the info_mixins)
    # @bentoml.service options. One process per core (cgroup-aware): HTTP + JSON, not the
    # model, take the CPU, and one Python process uses one core. Each worker batches its own
    # requests. Override with BENTOML_CONFIG_OPTIONS="services.<Class>.workers=N". One
    # access-log line per request costs ~30 % of the throughput; /metrics counts requests.
    options: ClassVar[dict] = {
        "workers": "cpu_count",
        "traffic": {"timeout": 30},
        "logging": {"access": {"enabled": False}},
    }
    answer_doc: ClassVar[type[BaseModel]] = Answer  # what the OpenAPI page shows
    batch_doc: ClassVar[type[BaseModel]] = Predictions
    info_mixins: ClassVar[tuple[type[BaseModel], ...]] = ()

    @classmethod
    def serves(cls, route: Route) -> bool:
        return True

    def __init__(self) -> None:
        model_dir = model_dir_from_env(DEFAULT_MODEL_DIR)
        card = self.card = load_card(
            model_dir, self.kind.name, self.kind.read_shape, self.service_name
        )
        self.max_request_bytes = int(
            os.environ.get(MAX_BYTES_ENV)
            or card.raw.get("max_request_bytes")
            or min(self.kind.request_limit(card), DEFAULT_MAX_JSON_BYTES)
        )
        self.max_concurrency = positive_setting(MAX_CONCURRENCY_ENV, DEFAULT_MAX_CONCURRENCY)
        self.max_queued_rows = positive_setting(
            MAX_QUEUED_ROWS_ENV, DEFAULT_QUEUED_BATCHES * card.max_batch_size
        )
        if self.max_queued_rows < card.max_batch_size:
            raise ValueError(
                f"{MAX_QUEUED_ROWS_ENV}={self.max_queued_rows} is less than one full batch "
                f"(package.max_batch_size = {card.max_batch_size}): a full request could never run"
            )
        routes = [r for r in self.kind.routes if self.serves(r)]
        self.guard_rules.json_limit = self.max_request_bytes
        self.guard_rules.max_concurrency = self.max_concurrency
        self.guard_rules.uploads = {
            r.path: (r.field, r.upload_limit(card, self.max_request_bytes))
            for r in routes
            if r.upload_limit is not None
        }
        self.guard_rules.foreign = foreign_routes(self.kind, card.summary, [r.path for r in routes])
        # What the OpenAPI page offers: a request this model answers, made by the adapter.
        self.api_examples.update({r.path: r.example(card) for r in routes if r.example is not None})
        self.session = open_session(model_dir / MODEL_FILE)
        check_session(self.session, card)
        # e.g. image_classifier_batch_size for ImageClassifier
        metric = re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower() + "_batch_size"
        self.batch_sizes = batch_size_histogram(card.max_batch_size, metric)
        self.batcher = AdaptiveBatcher(
            self._outputs,
            card.max_batch_size,
            card.max_latency_ms / 1000,
            INLINE_ROWS,
            max_queued_rows=self.max_queued_rows,
        )

    @bentoml.on_startup
    def _freeze_heap(self) -> None:
        # What the worker has loaded (BentoML, pydantic, numpy, ONNX Runtime, the model: ~120k
        # objects the collector tracks) lives as long as it does. A full collection walked them
        # all, 80-90 ms here, stalling every request in flight; frozen, it walks only what the
        # requests made since (well under 1 ms).
        gc.freeze()

    @bentoml.on_shutdown
    def _fail_queued_requests(self) -> None:
        # uvicorn waits for requests in progress before the lifespan ends; any still queued
        # then get a 503 now rather than a dropped connection.
        self.batcher.close()

    def describe(self) -> BaseModel:
        """What /info answers."""
        return self.info_model(**self.info_fields())

    def info_fields(self) -> dict[str, Any]:
        card = self.card
        return {
            "model_version": card.model_version,
            "model": card.model,
            "kind": card.kind,
            "task": card.task.name,
            "target": card.target,
            "class_names": list(card.class_names),
            "input_shape": list(card.input_shape),
            "max_batch_size": card.max_batch_size,
            "max_latency_ms": card.max_latency_ms,
            "max_request_bytes": self.max_request_bytes,
            "max_concurrency": self.max_concurrency,
            "max_queued_rows": self.max_queued_rows,
            "served_variant": card.raw.get("served_variant"),
            "metrics": {k: float(v) for k, v in (card.raw.get("metrics") or {}).items()},
            **self.kind.info_fields(card),
        }

    def _outputs(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.observe(batch.shape[0])
        return self.card.task.outputs(self.session.run(None, {INPUT_NAME: batch})[0])

    async def answer(self, batch: np.ndarray, items: list) -> list[BaseModel]:
        """Checked examples (and the same as the client sent them) -> one answer each."""
        return self.card.task.answers(await self.batcher(batch), self.card)

    async def serve(self, route: Route, value: Any) -> Any:
        """One request to ``route``: its answer, a 400 naming the field and the rule, or a
        503 with ``Retry-After`` when the batcher sheds it."""
        try:
            batch = route.decode(value, self.card)
        except InvalidArgument as exc:
            return bad_request(exc)
        try:
            answers = await self.answer(batch, value if route.many else [value])
        except Overloaded as exc:
            return overloaded(exc)
        return self.batch_doc.model_construct(predictions=answers) if route.many else answers[0]


# -- JSON in and out, with orjson (and simdjson for pixels) --------------------------------

# Digits -> "0", anything else -> " ": a run of 19 zeros then marks a long integer.
_DIGIT_RUNS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_INTEGER = b"0" * 19
# What is left of a JSON array of numbers without them and its whitespace: brackets, commas.
_NUMBERS_AND_SPACE = b"0123456789 \t\r\n"
_PARSERS = threading.local()  # one simdjson parser per thread, reused (it keeps its buffers)


def read_json_field(body: bytes, field: str, json_type: type) -> Any | None:
    """The value of ``field`` in a JSON object ``body`` when orjson reads it as BentoML's own
    parser (pydantic) would, and it has the field's JSON type (``list`` or ``dict``); None
    otherwise: then pydantic reads the body, and words any refusal as it always has.

    orjson refuses what pydantic takes but JSON does not (``NaN``, ``Infinity``: refused by
    the adapters with their own message) and reads an integer beyond 64 bits as a float
    (pydantic keeps it whole): bodies holding 19 digits in a row are left to pydantic.
    """
    if _LONG_INTEGER in body.translate(_DIGIT_RUNS):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict:
        return None
    value = data.get(field)
    return value if type(value) is json_type else None


def read_byte_array(body: bytes, field: str) -> JSONByteArray | None:
    """``body`` = ``{"<field>": <value>}`` -> the value as a :class:`JSONByteArray` when it is
    a rectangular nested JSON array of whole numbers 0-255 and the body holds nothing else;
    None otherwise (then :func:`read_json_field` or pydantic reads the body, and any refusal
    keeps its message: this reading only ever accepts).

    A batch of 64 MNIST images is 50,176 numbers in 1,856 lists: orjson builds them all as
    Python objects and numpy reads them back, ~2 ms of CPU on the (loaded) 2-core machine.
    simdjson validates the body and copies the numbers into one int64 buffer without making an
    object per number: ~0.6 ms with the checks here. The brackets and commas, compared with
    those of the array's shape, prove it rectangular (simdjson flattens ragged lists too).
    """
    parser = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = _PARSERS.parser = simdjson.Parser()
    try:
        doc = parser.parse(body)
    except ValueError:  # not JSON, or a number JSON does not allow: the usual reading words it
        return None
    except RuntimeError:
        # An integer beyond 64 bits; or a document of this parser still referenced (it then
        # refuses to parse again): a new parser for the next body, this one read as usual.
        _PARSERS.parser = simdjson.Parser()
        return None
    if type(doc) is not simdjson.Object or len(doc) != 1 or field not in doc:
        return None
    value = doc[field]
    if type(value) is not simdjson.Array:
        return None
    shape: list[int] = []
    first = value
    while type(first) is simdjson.Array and len(first):
        shape.append(len(first))
        first = first[0]
    if type(first) is not int:  # an empty list, a float, text, true/false, null, an object
        return None
    try:
        numbers = np.frombuffer(value.as_buffer(of_type="i"), dtype=np.int64)
    except (TypeError, ValueError):  # something else than integers somewhere, or a huge one
        return None
    del doc, value, first  # the parser is reused only once no proxy of its document lives
    if numbers.size != int(np.prod(shape)) or numbers.min() < 0 or numbers.max() > 255:
        return None
    expected = b"[" + b"," * (shape[-1] - 1) + b"]"
    for n in reversed(shape[:-1]):
        expected = b"[" + b",".join([expected] * n) + b"]"
    key = (b'"%s"' % field.encode()).translate(None, _NUMBERS_AND_SPACE)
    if body.translate(None, _NUMBERS_AND_SPACE) != b"{%s:%s}" % (key, expected):
        return None  # ragged, or the key written another way (an escape): not sure
    return JSONByteArray(numbers.astype(np.uint8).reshape(shape))


class JSONInput(bentoml.IODescriptor):
    """A JSON route's request, read with orjson instead of the pydantic validation BentoML
    runs (a batch of 64 MNIST images as JSON, 171 kB: ~0.65 ms of CPU instead of ~0.95), or
    for a route of pixels (``Route.byte_arrays``) straight into numpy with simdjson when the
    body is whole numbers 0-255 (:func:`read_byte_array`). The route's one field is taken as
    sent (its decode checks it); a body orjson does not read as pydantic would goes BentoML's
    way, with the same answers and messages. The schema, and so the OpenAPI page and
    BentoML's clients, are the route's, as before."""

    json_field: ClassVar[str] = ""
    json_type: ClassVar[type] = list
    byte_arrays: ClassVar[bool] = False  # the route's Route.byte_arrays

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> Any:
        if serde.media_type == "application/json":
            body = await request.body()
            value = read_byte_array(body, cls.json_field) if cls.byte_arrays else None
            if value is None:
                value = read_json_field(body, cls.json_field, cls.json_type)
            if value is not None:
                return cls.model_construct(**{cls.json_field: value})
        return await super().from_http_request(request, serde)


def _model_fields(obj: Any) -> dict:
    if isinstance(obj, BaseModel):  # answers are built with model_construct: no extras
        return obj.__dict__
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class JSONOutput(bentoml.IODescriptor):
    """An answer written with orjson in one body: 64 answers in ~0.03 ms of CPU (BentoML:
    pydantic, ~0.12 ms, and the body in three ASGI sends)."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Any:
        if isinstance(obj, BaseModel):
            return Response(orjson.dumps(obj, default=_model_fields), media_type=cls.mime_type())
        return await super().to_http_response(obj, serde)


def _input_spec(route: Route, module: str) -> type[bentoml.IODescriptor]:
    """What BentoML would make of the endpoint's signature (same name, field and schema),
    read with :class:`JSONInput`."""
    spec = create_model(
        "Input", __module__=module, __base__=JSONInput, **{route.field: (route.schema, Field())}
    )
    annotation = get_args(route.schema)[0]
    spec.json_field = route.field
    spec.json_type = get_origin(annotation) or annotation
    spec.byte_arrays = route.byte_arrays
    return spec


def _output_spec(answers: type[BaseModel]) -> type[bentoml.IODescriptor]:
    """BentoML's output spec for ``answers`` (same name and schema), written with orjson."""
    return create_model(f"{answers.__name__}IODescriptor", __base__=(JSONOutput, answers))


def _endpoint(route: Route, answers: type[BaseModel]) -> Any:
    """``async def <route.name>(self, <route.field>: <route.schema>) -> answers``, as API."""

    async def endpoint(self: ModelService, **request: Any) -> Any:
        return await self.serve(route, request[route.field])

    endpoint.__name__ = endpoint.__qualname__ = route.name
    endpoint.__doc__ = route.doc
    # BentoML reads the request fields and the answer's schema from the signature.
    endpoint.__signature__ = inspect.Signature(
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter(
                route.field, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=route.schema
            ),
        ],
        return_annotation=answers,
    )
    if route.upload_limit is not None:  # multipart: BentoML's own reading
        return bentoml.api(endpoint, output_spec=_output_spec(answers))
    return bentoml.api(
        endpoint,
        input_spec=_input_spec(route, endpoint.__module__),
        output_spec=_output_spec(answers),
    )


def _info_endpoint(info: type[BaseModel]) -> Any:
    def info_endpoint(self: ModelService) -> Any:
        return self.describe()

    info_endpoint.__name__ = info_endpoint.__qualname__ = "info"
    info_endpoint.__doc__ = (
        "What this service serves: the model and its version, what goes in (shape; columns "
        "and their preprocessing), its limits and test metrics."
    )
    info_endpoint.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)],
        return_annotation=info,
    )
    return bentoml.api(info_endpoint)


# -- the OpenAPI page ------------------------------------------------------------------------

INFO_PATH = "/info"
_REFUSAL = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "string",
                    "description": "what is wrong (<field>: <rule>), or why the request was shed",
                }
            },
        }
    }
}


def answers_of(service: type[ModelService], path: str) -> dict[int, str]:
    """Every status ``path`` of ``service`` can answer -> one line on when (with the live
    limits once the service has read its card). Never a 404 (other kinds' routes are not
    listed) or a 500 (a bad request is a 4xx; tests/test_service_fuzz.py fuzzes for it)."""
    rules = service.guard_rules
    route = next((r for r in service.kind.routes if r.path == path), None)
    upload = rules.uploads.get(path)
    limit = upload[1] if upload else rules.json_limit
    size = f"{limit} bytes" if rules.max_concurrency else "the limit /info shows"
    json_only = "the body is not sent as Content-Type: application/json"
    if route is None:  # /info
        ok, bad, wrong_type = "what this service serves", "the body is not JSON", json_only
    elif upload:
        ok = "the answer, one per example in the file's order" if route.many else "the answer"
        bad = (
            f'the upload is not exactly one file in form field "{upload[0]}", or not one the '
            "model takes; the error names the rule"
        )
        wrong_type = "the body is not a multipart/form-data upload"
    else:
        ok = "one answer per example, in the request's order" if route.many else "the answer"
        bad = (
            "a value breaks a rule (shape, type, range, count, a missing or unknown field) or "
            'the JSON is malformed: {"error": "<field>: <rule>"}'
        )
        wrong_type = json_only
    return {
        200: ok,
        400: f"{bad}; or the request's framing headers are ambiguous (two Content-Type, ...)",
        413: f"the body is larger than {size} (package.max_request_bytes / max_image_bytes, "
        "MAX_REQUEST_BYTES)",
        415: f"{wrong_type}; the error says what was sent",
        503: "the server sheds load (busy: MAX_CONCURRENT_REQUESTS; overloaded: MAX_QUEUED_ROWS, "
        "max_latency_ms; or stopping): retry after the Retry-After header's seconds",
    }


def document(service: type[ModelService], spec: Any) -> Any:
    """``spec`` (BentoML's OpenAPI for ``service``) with, on every route of the service: the
    statuses it can answer (:func:`answers_of`), and a request its model answers with a 200
    as the example ("Try it out"): the body for a JSON route, a command that writes the file
    in an upload route's description."""
    for route in service.kind.routes:
        if not service.serves(route):
            continue
        operation = spec.paths[route.path].post
        _list_answers(operation, answers_of(service, route.path))
        example = service.api_examples.get(route.path)
        if example is None:
            continue
        if route.upload_limit is not None:
            operation["description"] += f"\n\nA file this model takes: `{example}`"
            continue
        content = operation["requestBody"]["content"]
        media = content["application/json"]  # BentoML's spec objects are frozen
        media.schema.properties[route.field]["examples"] = [example]
        content["application/json"] = attrs.evolve(media, example={route.field: example})
    _list_answers(spec.paths[INFO_PATH].post, answers_of(service, INFO_PATH))
    return spec


def _list_answers(operation: dict, answers: dict[int, str]) -> None:
    """Replace BentoML's list (200, 400, 404, 500) with ``answers``; 200 keeps its schema."""
    ok = {**operation["responses"][200], "description": answers[200]}
    refusals = {code: {"description": text, "content": _REFUSAL} for code, text in answers.items()}
    operation["responses"] = {**refusals, 200: ok}


class DocumentedService(bentoml.Service):
    """A BentoML service whose OpenAPI page (``/docs.json``, the Swagger page at ``/``) shows
    its own model's examples and every status each route answers (:func:`document`), and
    whose request timeout (``traffic.timeout``) is :class:`deploy.guard.RequestTimeout`."""

    @property
    def openapi_spec(self) -> Any:
        return document(self.inner, super().openapi_spec)

    def to_asgi(self, is_main: bool = True) -> Any:
        """BentoML's app (what each worker serves), with BentoML's timeout middleware, whose
        timers outlive the requests, replaced by ours (same timeout, same 504)."""
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
        from starlette.middleware import Middleware

        app = super().to_asgi(is_main)
        app.user_middleware = [
            Middleware(RequestTimeout, *m.args, **m.kwargs) if m.cls is TimeoutMiddleware else m
            for m in app.user_middleware
        ]
        return app


def service_class(base: type[ModelService], kind: DataKind, name: str, module: str) -> type:
    """The class ``module:name``: ``base`` answering ``kind``'s routes (those it serves),
    and /info. Decorate it with ``@bentoml.service`` in ``module``, then :func:`with_guard`."""
    info = create_model(f"{name}Info", __base__=(*base.info_mixins, kind.info))
    namespace: dict[str, Any] = {
        "__module__": module,
        "__qualname__": name,
        "__doc__": f"{base.__doc__.splitlines()[0]} ({kind.name} data)",
        "kind": kind,
        "service_name": f"{module}:{name}",
        "guard_rules": GuardRules(),
        "api_examples": {},
        "info_model": info,
        "info": _info_endpoint(info),
    }
    for route in kind.routes:
        if base.serves(route):
            answers = base.batch_doc if route.many else base.answer_doc
            namespace[route.name] = _endpoint(route, answers)
    return type(name, (base,), namespace)


def with_guard(service: bentoml.Service) -> bentoml.Service:
    """Put the service's request guard in front of it, with the rules its class fills in."""
    service.add_asgi_middleware(RequestGuard, rules=service.inner.guard_rules)
    return service
