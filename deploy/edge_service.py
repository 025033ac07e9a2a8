"""The edge service: the int8 model on a small CPU box, asking the cloud when unsure.

A lean bento: this file, ``common.py``, ``components/features.py`` and the model; it needs
ONNX Runtime and numpy (and BentoML to serve it), no torch, Lightning, Prefect, pandas or
Pillow. Input is JSON only, checked exactly as the cloud service checks it. One service per
kind of data, like the cloud's: :class:`EdgeClassifier` (images: ``/predict``,
``/predict_batch``), :class:`EdgeTablePredictor` (``/predict_row``, ``/predict_rows``) and
:class:`EdgeSequencePredictor` (``/forecast``, ``/predict_sequences``), the last two applying
the model's preprocessing spec like the cloud does.

Hybrid mode (classification): an example whose top probability reaches
``confidence_threshold`` is answered here; the rest are forwarded, as the client sent them, to
the cloud bento at ``cloud_url`` (``CLOUD_URL`` in the environment wins over the value baked in
from params.yaml). Every answer says who answered (``answered_by``: ``edge`` or ``cloud``)
and, when the edge answered an unsure example itself, why (``cloud_error``: no cloud
configured, cloud unreachable, ...). After a failed call the cloud is not asked again for
``cloud_retry_s`` seconds, so a dead link costs one timeout, not one per request.

Regression has no confidence to hand off on (one value, no class probabilities): a regression
model's edge bento always answers locally (``answered_by: edge``) and never calls the cloud.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field

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
    to_batch,
    to_chw,
    tracing_off_unless_asked,
)

tracing_off_unless_asked()

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
CLOUD_URL_ENV = "CLOUD_URL"
THRESHOLD_ENV = "EDGE_CONFIDENCE_THRESHOLD"
DEFAULT_THRESHOLD = 0.9
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_RETRY_S = 10.0
# The routes each kind is served on at the edge: the cloud's JSON routes.
EDGE_ROUTES = {
    "image": ("/predict", "/predict_batch"),
    **{k: ROUTES[k] for k in ("table", "sequence")},
}


class EdgePrediction(Prediction):
    answered_by: Literal["edge", "cloud"] = Field(description="which model gave this answer")
    edge_confidence: float = Field(description="the edge model's top probability")
    cloud_error: str | None = Field(
        None, description="why an unsure image was answered here and not by the cloud"
    )


class EdgeBatchPrediction(BaseModel):
    predictions: list[EdgePrediction]


class EdgeInfo(BaseModel):
    model_version: str
    model: str
    class_names: list[str]
    image_shape: list[int]
    max_batch_size: int
    confidence_threshold: float
    cloud_url: str | None
    cloud_timeout_s: float


class EdgeGuard(RequestGuard):
    limits = {"json": 1 << 20}
    upload_routes: dict[str, str] = {}


ImageField = Annotated[
    list[Any],
    Field(description="one image of raw pixel values 0-255 as nested lists (see /info)"),
]
ImagesField = Annotated[
    list[Any], Field(description="a list of images, each as for /predict; at most max_batch_size")
]


def cloud_url(url: str) -> str | None:
    """The cloud's base URL without a trailing slash; None when empty; ValueError when bad."""
    url = url.strip().rstrip("/")
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest:
        raise ValueError(f"cloud URL {url!r} must look like http://host:port ({CLOUD_URL_ENV})")
    return url


def _setting(section: dict, key: str, default: float) -> float:
    value = section.get(key)
    return default if value is None else value


class CloudUnavailable(Exception):
    """The cloud could not answer; the message says why, for the client."""


class _Hybrid:
    """The edge's side of the hand-off, for every kind: the settings, the cloud client, and
    answering each example here or forwarding the unsure ones. Not a service itself."""

    class_names: list[str]
    model_version: str
    model: str
    max_batch_size: int

    def _hybrid_settings(self, card: dict) -> None:
        edge = card.get("edge") or {}
        threshold = os.environ.get(THRESHOLD_ENV) or edge.get("confidence_threshold")
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"confidence threshold {self.threshold} must lie in [0, 1]")
        self.cloud_url = cloud_url(os.environ.get(CLOUD_URL_ENV, edge.get("cloud_url") or ""))
        self.cloud_timeout_s = float(_setting(edge, "cloud_timeout_s", DEFAULT_TIMEOUT_S))
        self.cloud_retry_s = float(_setting(edge, "cloud_retry_s", DEFAULT_RETRY_S))
        self._cloud_down_until = 0.0
        self._cloud_last_error = ""
        self._client = None  # an httpx.AsyncClient, made in the server's event loop

    @bentoml.on_shutdown
    async def _close_client(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _edge_answer(self, row: np.ndarray, cloud_error: str | None) -> EdgePrediction:
        idx = int(row.argmax())
        return EdgePrediction(
            label=self.class_names[idx],
            class_index=idx,
            probabilities=dict(zip(self.class_names, row.tolist(), strict=True)),
            model_version=self.model_version,
            model=self.model,
            answered_by="edge",
            edge_confidence=float(row[idx]),
            cloud_error=cloud_error,
        )

    async def _ask_cloud(self, items: Any, route: str, key: str) -> list[Prediction]:
        """The cloud's answers for checked examples (an array of images, or the rows or
        sequences as the client sent them), from its ``route`` taking ``{key: [...]}``; or
        :class:`CloudUnavailable`."""
        import httpx

        if self.cloud_url is None:
            raise CloudUnavailable("no cloud configured (package.edge.cloud_url / CLOUD_URL)")
        now = time.monotonic()
        if now < self._cloud_down_until:
            raise CloudUnavailable(
                f"{self._cloud_last_error}; cloud not asked again for another "
                f"{self._cloud_down_until - now:.0f} s"
            )
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.cloud_url, timeout=self.cloud_timeout_s)
        answers: list[Prediction] = []
        try:
            for start in range(0, len(items), self.max_batch_size):
                chunk = items[start : start + self.max_batch_size]
                answers += await self._cloud_batch(chunk, route, key)
        except httpx.HTTPError as exc:
            problem = f"cloud unreachable at {self.cloud_url} ({type(exc).__name__})"
        except CloudUnavailable as exc:
            problem = str(exc)
        else:
            return answers
        self._cloud_last_error = problem
        self._cloud_down_until = time.monotonic() + self.cloud_retry_s
        raise CloudUnavailable(problem)

    async def _cloud_batch(self, chunk: Any, route: str, key: str) -> list[Prediction]:
        payload = chunk.tolist() if isinstance(chunk, np.ndarray) else list(chunk)
        reply = await self._client.post(route, json={key: payload})
        if reply.status_code != 200:
            raise CloudUnavailable(
                f"cloud at {self.cloud_url} answered HTTP {reply.status_code}: {reply.text[:200]}"
            )
        try:
            got = reply.json()["predictions"]
            if not isinstance(got, list) or len(got) != len(chunk):
                raise ValueError("not one prediction per example")
            return [Prediction.model_validate(p) for p in got]
        except (ValueError, KeyError, TypeError):  # ValidationError is a ValueError
            raise CloudUnavailable(f"cloud at {self.cloud_url} sent a malformed answer") from None

    async def _hybrid_answers(
        self, probs: np.ndarray, items: Any, route: str, key: str
    ) -> list[EdgePrediction]:
        """Class probabilities of the edge model -> answers, the unsure ones the cloud's."""
        confidence = probs.max(axis=1)
        unsure = np.flatnonzero(confidence < self.threshold)
        answers = [self._edge_answer(row, None) for row in probs]
        if len(unsure):
            if isinstance(items, np.ndarray):
                forwarded = items[unsure]
            else:
                forwarded = [items[i] for i in unsure]
            try:
                cloud = await self._ask_cloud(forwarded, route, key)
            except CloudUnavailable as exc:
                for i in unsure:
                    answers[i] = self._edge_answer(probs[i], f"{exc}; answered by the edge")
            else:
                for i, answer in zip(unsure, cloud, strict=True):
                    answers[i] = EdgePrediction(
                        **answer.model_dump(),
                        answered_by="cloud",
                        edge_confidence=float(confidence[i]),
                    )
        return answers


@bentoml.service(traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class EdgeClassifier(_Hybrid):
    """Answer confident images locally with the int8 model; forward the rest to the cloud."""

    def __init__(self) -> None:
        model_dir = model_dir_from_env(DEFAULT_MODEL_DIR)
        card = read_card(model_dir)
        require_kind(card, "image", "deploy.edge_service:EdgeClassifier", model_dir / CARD_FILE)
        self.class_names = [str(n) for n in card["class_names"]]
        self.image_shape: tuple[int, int, int] = tuple(int(d) for d in card["image_shape"])
        self.model_version = str(card["model_version"])
        self.model = str(card.get("model") or "unknown")
        self.max_batch_size = int(card.get("max_batch_size") or 64)
        self._hybrid_settings(card)
        EdgeGuard.limits = {
            "json": int(
                os.environ.get(MAX_BYTES_ENV)
                or card.get("max_request_bytes")
                or request_limit(self.image_shape, self.max_batch_size)
            )
        }
        EdgeGuard.foreign = foreign_routes(
            "image",
            f"an image classification model of {len(self.class_names)} classes",
            EDGE_ROUTES["image"],
        )
        self.session = open_session(model_dir / MODEL_FILE)
        check_session(self.session, self.image_shape, len(self.class_names))

    def _local(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.session.run(None, {INPUT_NAME: batch})[0])

    async def _hybrid(self, batch: np.ndarray) -> list[EdgePrediction]:
        return await self._hybrid_answers(self._local(batch), batch, "/predict_batch", "images")

    @bentoml.api
    async def predict(self, image: ImageField) -> EdgePrediction:
        """Classify one image; unsure ones are forwarded to the cloud when one is set."""
        try:
            arr = to_chw(image, self.image_shape, "image")
        except InvalidArgument as exc:
            return bad_request(exc)
        return (await self._hybrid(arr[None]))[0]

    @bentoml.api
    async def predict_batch(self, images: ImagesField) -> EdgeBatchPrediction:
        """Classify up to ``max_batch_size`` images; the unsure ones go to the cloud together."""
        try:
            batch = to_batch(images, self.image_shape, self.max_batch_size)
        except InvalidArgument as exc:
            return bad_request(exc)
        return EdgeBatchPrediction(predictions=await self._hybrid(batch))

    @bentoml.api
    def info(self) -> EdgeInfo:
        """The edge model, its limits and its hybrid settings."""
        return EdgeInfo(
            model_version=self.model_version,
            model=self.model,
            class_names=self.class_names,
            image_shape=list(self.image_shape),
            max_batch_size=self.max_batch_size,
            confidence_threshold=self.threshold,
            cloud_url=self.cloud_url,
            cloud_timeout_s=self.cloud_timeout_s,
        )


EdgeClassifier.add_asgi_middleware(EdgeGuard)


# -- tables and sequences -------------------------------------------------------------------


class EdgeValuePrediction(ValuePrediction):
    answered_by: Literal["edge"] = Field(
        "edge", description="always the edge: regression is never handed to the cloud"
    )


class EdgeAnswer(Answer):
    """One answer of the edge's table or sequence service, as its OpenAPI page documents it:
    an :class:`EdgePrediction` (classification) or an :class:`EdgeValuePrediction`."""

    answered_by: Literal["edge", "cloud"] = Field(description="which model gave this answer")
    edge_confidence: float | None = Field(
        None, description="classification: the edge model's top probability"
    )
    cloud_error: str | None = Field(
        None, description="why an unsure example was answered here and not by the cloud"
    )


class EdgePredictions(BaseModel):
    predictions: list[EdgePrediction | EdgeValuePrediction]


class EdgePredictorInfo(BaseModel):
    model_version: str
    model: str
    kind: str
    task: str
    target: str
    class_names: list[str]
    input_shape: list[int]
    columns: list[str] = Field(description="the input columns, in order")
    window: int | None = Field(None, description="sequences: the steps each one must hold")
    preprocess: dict[str, Any] = Field(description="the transform applied before the model")
    max_batch_size: int
    hybrid: bool = Field(
        description="whether unsure answers may go to the cloud (not for regression)"
    )
    confidence_threshold: float | None = Field(description="None for regression")
    cloud_url: str | None
    cloud_timeout_s: float


class EdgeTableGuard(RequestGuard):
    limits = {"json": 1 << 20}
    upload_routes: dict[str, str] = {}


class EdgeSequenceGuard(RequestGuard):
    limits = {"json": 1 << 20}
    upload_routes: dict[str, str] = {}


class _EdgeRecords(_Hybrid):
    """What the edge's table and sequence services share. Not a service itself."""

    kind = ""
    cloud_route, cloud_key = "", ""  # where unsure examples go, as the client sent them

    def _load(self, guard: type[RequestGuard]) -> None:
        model_dir = model_dir_from_env(DEFAULT_MODEL_DIR)
        card = self.card = load_card(
            model_dir, self.kind, f"deploy.edge_service:{type(self).__name__}"
        )
        self.class_names = list(card.class_names)
        self.model_version, self.model = card.model_version, card.model
        self.max_batch_size = card.max_batch_size
        self.spec = card.preprocess
        self._hybrid_settings(card.raw)
        steps = card.input_shape[0] if self.kind == "sequence" else 1
        guard.limits = {
            "json": int(
                os.environ.get(MAX_BYTES_ENV)
                or card.raw.get("max_request_bytes")
                or records_limit(self.spec, self.max_batch_size, steps)
            )
        }
        guard.foreign = foreign_routes(self.kind, card.summary, EDGE_ROUTES[self.kind])
        self.session = open_session(model_dir / MODEL_FILE)
        check_session(self.session, card.input_shape, card.num_outputs, card.task)
        self.window = steps if self.kind == "sequence" else None

    async def answer(self, batch: np.ndarray, items: list) -> list:
        """Encoded examples (and the same as the client sent them, for the cloud) -> answers."""
        out = model_outputs(self.session.run(None, {INPUT_NAME: batch})[0], self.card.regression)
        if self.card.regression:  # answered here, always: see the module's docstring
            return [
                EdgeValuePrediction(
                    value=float(v),
                    target=self.card.target,
                    model_version=self.model_version,
                    model=self.model,
                )
                for v in out
            ]
        return await self._hybrid_answers(out, items, self.cloud_route, self.cloud_key)

    def _info(self) -> EdgePredictorInfo:
        card: ModelCard = self.card
        return EdgePredictorInfo(
            model_version=self.model_version,
            model=self.model,
            kind=card.kind,
            task=card.task,
            target=card.target,
            class_names=self.class_names,
            input_shape=list(card.input_shape),
            columns=card.columns,
            window=self.window,
            preprocess=self.spec,
            max_batch_size=self.max_batch_size,
            hybrid=not card.regression,
            confidence_threshold=None if card.regression else self.threshold,
            cloud_url=self.cloud_url,
            cloud_timeout_s=self.cloud_timeout_s,
        )


@bentoml.service(traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class EdgeTablePredictor(_EdgeRecords):
    """Table rows: answered by the int8 model, unsure classifications by the cloud."""

    kind = "table"
    cloud_route, cloud_key = "/predict_rows", "rows"

    def __init__(self) -> None:
        self._load(EdgeTableGuard)

    @bentoml.api
    async def predict_row(self, row: RowField) -> EdgeAnswer:
        """One row of column -> value: its class or value."""
        try:
            x = encode_row(row, self.spec)
        except InvalidArgument as exc:
            return bad_request(exc)
        return (await self.answer(x, [row]))[0]

    @bentoml.api
    async def predict_rows(self, rows: RowsField) -> EdgePredictions:
        """Up to ``max_batch_size`` rows; the unsure ones go to the cloud together."""
        try:
            x = encode_rows(rows, self.spec, self.max_batch_size)
        except InvalidArgument as exc:
            return bad_request(exc)
        return EdgePredictions(predictions=await self.answer(x, rows))

    @bentoml.api
    def info(self) -> EdgePredictorInfo:
        """The edge model, its columns and preprocessing, limits and hybrid settings."""
        return self._info()


@bentoml.service(traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class EdgeSequencePredictor(_EdgeRecords):
    """Sequences: forecasts answered here; unsure classifications by the cloud."""

    kind = "sequence"
    cloud_route, cloud_key = "/predict_sequences", "sequences"

    def __init__(self) -> None:
        self._load(EdgeSequenceGuard)

    @bentoml.api
    async def forecast(self, window: WindowField) -> EdgeAnswer:
        """One sequence of T steps: the forecast value (regression) or its class."""
        try:
            x = encode_window(window, self.spec, self.card.input_shape)
        except InvalidArgument as exc:
            return bad_request(exc)
        return (await self.answer(x, [window]))[0]

    @bentoml.api
    async def predict_sequences(self, sequences: SequencesField) -> EdgePredictions:
        """Up to ``max_batch_size`` sequences; the unsure ones go to the cloud together."""
        try:
            x = encode_sequences(sequences, self.spec, self.card.input_shape, self.max_batch_size)
        except InvalidArgument as exc:
            return bad_request(exc)
        return EdgePredictions(predictions=await self.answer(x, sequences))

    @bentoml.api
    def info(self) -> EdgePredictorInfo:
        """The edge model, its window, columns and preprocessing, limits and hybrid settings."""
        return self._info()


EdgeTablePredictor.add_asgi_middleware(EdgeTableGuard)
EdgeSequencePredictor.add_asgi_middleware(EdgeSequenceGuard)
