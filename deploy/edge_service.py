"""The edge services: the int8 model on a small CPU box, asking the cloud when unsure.

A lean bento: deploy/ minus ``service.py``, ``components/features.py`` and the model; it
needs ONNX Runtime and numpy (and BentoML to serve it), no torch, Lightning, Prefect, pandas
or Pillow. The cloud's JSON routes, checked exactly as the cloud checks them:
:data:`EdgeImageClassifier`, :data:`EdgeTablePredictor`, :data:`EdgeSequencePredictor`.

Hybrid mode (classification): an example whose top probability reaches
``confidence_threshold`` is answered here; the rest are forwarded, as the client sent them, to
the cloud bento at ``cloud_url`` (``CLOUD_URL`` in the environment wins over the value baked in
from params.yaml). Every answer says who answered (``answered_by``: ``edge`` or ``cloud``)
and, when the edge answered an unsure example itself, why (``cloud_error``: no cloud
configured, cloud unreachable, ...). After a failed call the cloud is not asked again for
``cloud_retry_s`` seconds, so a dead link costs one timeout, not one per request.

Credentials for the link come from the environment, never from what the edge answers:
``user:password@`` in ``CLOUD_URL`` (sent as HTTP basic auth) or a bearer token in
``CLOUD_TOKEN``. ``/info`` and ``cloud_error`` name the cloud without them, and what the cloud
answered goes to the edge's log, not to its clients.

Regression has no confidence to hand off on (one value, no class probabilities): a regression
model's edge bento always answers locally (``answered_by: edge``) and never calls the cloud.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

import bentoml
import numpy as np
from pydantic import BaseModel, Field

from deploy.base import (
    IMAGE,
    SEQUENCE,
    TABLE,
    DocumentedService,
    ModelService,
    service_class,
    with_guard,
)
from deploy.common import Answer, DataKind, JSONByteArray, Prediction, Route, ValuePrediction

CLOUD_URL_ENV = "CLOUD_URL"
CLOUD_TOKEN_ENV = "CLOUD_TOKEN"  # sent as "Authorization: Bearer <token>" to the cloud
THRESHOLD_ENV = "EDGE_CONFIDENCE_THRESHOLD"
DEFAULT_THRESHOLD = 0.9
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_RETRY_S = 10.0
# BentoML configures the "bentoml" logger in every worker: its children reach the server log.
log = logging.getLogger("bentoml.edge")


class EdgePrediction(Prediction):
    answered_by: Literal["edge", "cloud"] = Field(description="which model gave this answer")
    edge_confidence: float = Field(description="the edge model's top probability")
    cloud_error: str | None = Field(
        None, description="why an unsure example was answered here and not by the cloud"
    )


class EdgeValuePrediction(ValuePrediction):
    answered_by: Literal["edge"] = Field(
        "edge", description="always the edge: regression is never handed to the cloud"
    )


class EdgeAnswer(Answer):
    """One answer of an edge service, as its OpenAPI page documents it: an
    :class:`EdgePrediction` (classification) or an :class:`EdgeValuePrediction`."""

    answered_by: Literal["edge", "cloud"] = Field(description="which model gave this answer")
    edge_confidence: float | None = Field(
        None, description="classification: the edge model's top probability"
    )
    cloud_error: str | None = Field(
        None, description="why an unsure example was answered here and not by the cloud"
    )


class EdgePredictions(BaseModel):
    predictions: list[EdgePrediction | EdgeValuePrediction]


class HandOffInfo(BaseModel):
    """What /info adds at the edge: the hand-off settings."""

    hybrid: bool = Field(
        description="whether unsure answers may go to the cloud (not for regression)"
    )
    confidence_threshold: float | None = Field(description="None for regression")
    cloud_url: str | None = Field(description="the cloud bento, without any credentials")
    cloud_timeout_s: float


def cloud_url(url: str) -> str | None:
    """The cloud's base URL without a trailing slash; None when empty; ValueError when bad."""
    url = url.strip().rstrip("/")
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest:
        shown = without_credentials(url) if sep else url
        raise ValueError(f"cloud URL {shown!r} must look like http://host:port ({CLOUD_URL_ENV})")
    return url


def without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` taken out: what may be shown or logged."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


class CloudUnavailable(Exception):
    """The cloud could not answer; the message says why, for the client."""


class EdgeService(ModelService):
    """Answer confident examples with the edge model; forward the unsure ones to the cloud."""

    # One worker: an edge box is small (no "cpu_count" as in the cloud).
    options: ClassVar[dict] = {
        "traffic": {"timeout": 30},
        "logging": {"access": {"enabled": False}},
    }
    answer_doc = EdgeAnswer
    batch_doc = EdgePredictions
    info_mixins = (HandOffInfo,)

    @classmethod
    def serves(cls, route: Route) -> bool:
        return route.upload_limit is None  # JSON only: no Pillow, no multipart at the edge

    def __init__(self) -> None:
        super().__init__()
        edge = self.card.raw.get("edge") or {}
        threshold = os.environ.get(THRESHOLD_ENV) or edge.get("confidence_threshold")
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"confidence threshold {self.threshold} must lie in [0, 1]")
        # The URL with its credentials is used only to build the HTTP client; every message
        # and /info show the other one.
        self._cloud_url_secret = cloud_url(
            os.environ.get(CLOUD_URL_ENV, edge.get("cloud_url") or "")
        )
        self.cloud_url = self._cloud_url_secret and without_credentials(self._cloud_url_secret)
        self.cloud_timeout_s = float(_setting(edge, "cloud_timeout_s", DEFAULT_TIMEOUT_S))
        self.cloud_retry_s = float(_setting(edge, "cloud_retry_s", DEFAULT_RETRY_S))
        self._cloud_down_until = 0.0
        self._cloud_last_error = ""
        self._client = None  # an httpx.AsyncClient, made in the server's event loop

    def info_fields(self) -> dict[str, Any]:
        hybrid = self.card.task.hands_off
        return {
            **super().info_fields(),
            "hybrid": hybrid,
            "confidence_threshold": self.threshold if hybrid else None,
            "cloud_url": self.cloud_url,
            "cloud_timeout_s": self.cloud_timeout_s,
        }

    @bentoml.on_shutdown
    async def _close_client(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def answer(self, batch: np.ndarray, items: list) -> list[BaseModel]:
        """Checked examples (and the same as the client sent them, for the cloud) -> one
        answer each: the edge model's, or the cloud's for those it is unsure about."""
        outputs = await self.batcher(batch)
        answers = self.card.task.answers(outputs, self.card)
        if not self.card.task.hands_off:  # regression: answered here, always
            return [EdgeValuePrediction.model_construct(**dict(a)) for a in answers]
        confidence = self.card.task.confidence(outputs)
        mine = [
            EdgePrediction.model_construct(
                **dict(a), answered_by="edge", edge_confidence=float(c), cloud_error=None
            )
            for a, c in zip(answers, confidence, strict=True)
        ]
        unsure = np.flatnonzero(confidence < self.threshold)
        if len(unsure) == 0:
            return mine
        try:
            theirs = await self._ask_cloud([_as_sent(items[i]) for i in unsure])
        except CloudUnavailable as exc:
            for i in unsure:
                mine[i].cloud_error = f"{exc}; answered by the edge"
            return mine
        for i, answer in zip(unsure, theirs, strict=True):
            mine[i] = EdgePrediction.model_construct(
                **dict(answer), answered_by="cloud", edge_confidence=float(confidence[i])
            )
        return mine

    async def _ask_cloud(self, items: list) -> list[Prediction]:
        """The cloud's answers for checked examples, as the client sent them, from the kind's
        batch route (``/predict_batch {"images": [...]}``, ...); or :class:`CloudUnavailable`."""
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
            token = os.environ.get(CLOUD_TOKEN_ENV)
            headers = {"Authorization": f"Bearer {token}"} if token else None
            self._client = httpx.AsyncClient(
                base_url=self._cloud_url_secret, timeout=self.cloud_timeout_s, headers=headers
            )
        answers: list[Prediction] = []
        try:
            for start in range(0, len(items), self.card.max_batch_size):
                answers += await self._cloud_batch(items[start : start + self.card.max_batch_size])
        except httpx.HTTPError as exc:
            problem = f"cloud unreachable at {self.cloud_url} ({type(exc).__name__})"
        except CloudUnavailable as exc:
            problem = str(exc)
        else:
            return answers
        self._cloud_last_error = problem
        self._cloud_down_until = time.monotonic() + self.cloud_retry_s
        raise CloudUnavailable(problem)

    async def _cloud_batch(self, chunk: list) -> list[Prediction]:
        route = self.kind.batch_route
        reply = await self._client.post(route.path, json={route.field: chunk})
        if reply.status_code != 200:
            # The reply may hold anything (a proxy's page, another tenant's error): logged here,
            # only its status told to the client.
            log.warning(
                "cloud at %s answered HTTP %s to %s: %.500s",
                self.cloud_url, reply.status_code, route.path, reply.text,
            )  # fmt: skip
            raise CloudUnavailable(
                f"cloud at {self.cloud_url} answered HTTP {reply.status_code} (see the edge's log)"
            )
        try:
            got = reply.json()["predictions"]
            if not isinstance(got, list) or len(got) != len(chunk):
                raise ValueError("not one prediction per example")
            return [Prediction.model_validate(p) for p in got]
        except (ValueError, KeyError, TypeError):  # ValidationError is a ValueError
            log.warning("cloud at %s sent a malformed answer: %.500s", self.cloud_url, reply.text)
            raise CloudUnavailable(f"cloud at {self.cloud_url} sent a malformed answer") from None


def _as_sent(item: Any) -> Any:
    """An example as the client sent it (nested lists), also when it was read as pixels."""
    return item.tolist() if type(item) is JSONByteArray else item


def _setting(section: dict, key: str, default: float) -> float:
    value = section.get(key)
    return default if value is None else value


def _edge(kind: DataKind, name: str) -> bentoml.Service:
    return with_guard(
        bentoml.service(service_class=DocumentedService, **EdgeService.options)(
            service_class(EdgeService, kind, name, __name__)
        )
    )


EdgeImageClassifier = _edge(IMAGE, "EdgeImageClassifier")
EdgeTablePredictor = _edge(TABLE, "EdgeTablePredictor")
EdgeSequencePredictor = _edge(SEQUENCE, "EdgeSequencePredictor")
