"""The edge service: the int8 model on a small CPU box, asking the cloud when unsure.

A lean bento: this file, ``common.py`` and the model; it needs ONNX Runtime and numpy (and
BentoML to serve it), no torch, Lightning, Prefect or Pillow. Input is JSON only, checked
exactly as the cloud service checks it.

Hybrid mode: an image whose top probability reaches ``confidence_threshold`` is answered
here; the rest are forwarded to the cloud bento at ``cloud_url`` (``CLOUD_URL`` in the
environment wins over the value baked in from params.yaml). Every answer says who answered
(``answered_by``: ``edge`` or ``cloud``) and, when the edge answered an unsure image itself,
why (``cloud_error``: no cloud configured, cloud unreachable, ...). After a failed call the
cloud is not asked again for ``cloud_retry_s`` seconds, so a dead link costs one timeout, not
one per request.
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


@bentoml.service(traffic={"timeout": 30}, logging={"access": {"enabled": False}})
class EdgeClassifier:
    """Answer confident images locally with the int8 model; forward the rest to the cloud."""

    def __init__(self) -> None:
        model_dir = model_dir_from_env(DEFAULT_MODEL_DIR)
        card = read_card(model_dir)
        edge = card.get("edge") or {}
        self.class_names = [str(n) for n in card["class_names"]]
        self.image_shape: tuple[int, int, int] = tuple(int(d) for d in card["image_shape"])
        self.model_version = str(card["model_version"])
        self.model = str(card.get("model") or "unknown")
        self.max_batch_size = int(card.get("max_batch_size") or 64)
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
        EdgeGuard.limits = {
            "json": int(
                os.environ.get(MAX_BYTES_ENV)
                or card.get("max_request_bytes")
                or request_limit(self.image_shape, self.max_batch_size)
            )
        }
        self.session = open_session(model_dir / MODEL_FILE)
        check_session(self.session, self.image_shape, len(self.class_names))

    @bentoml.on_shutdown
    async def _close_client(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _local(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.session.run(None, {INPUT_NAME: batch})[0])

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

    async def _ask_cloud(self, batch: np.ndarray) -> list[Prediction]:
        """The cloud's answers for checked images, or :class:`CloudUnavailable`."""
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
            for start in range(0, len(batch), self.max_batch_size):
                answers += await self._cloud_batch(batch[start : start + self.max_batch_size])
        except httpx.HTTPError as exc:
            problem = f"cloud unreachable at {self.cloud_url} ({type(exc).__name__})"
        except CloudUnavailable as exc:
            problem = str(exc)
        else:
            return answers
        self._cloud_last_error = problem
        self._cloud_down_until = time.monotonic() + self.cloud_retry_s
        raise CloudUnavailable(problem)

    async def _cloud_batch(self, chunk: np.ndarray) -> list[Prediction]:
        reply = await self._client.post("/predict_batch", json={"images": chunk.tolist()})
        if reply.status_code != 200:
            raise CloudUnavailable(
                f"cloud at {self.cloud_url} answered HTTP {reply.status_code}: {reply.text[:200]}"
            )
        try:
            got = reply.json()["predictions"]
            if not isinstance(got, list) or len(got) != len(chunk):
                raise ValueError("not one prediction per image")
            return [Prediction.model_validate(p) for p in got]
        except (ValueError, KeyError, TypeError):  # ValidationError is a ValueError
            raise CloudUnavailable(f"cloud at {self.cloud_url} sent a malformed answer") from None

    async def _hybrid(self, batch: np.ndarray) -> list[EdgePrediction]:
        probs = self._local(batch)
        confidence = probs.max(axis=1)
        unsure = np.flatnonzero(confidence < self.threshold)
        answers = [self._edge_answer(row, None) for row in probs]
        if len(unsure):
            try:
                cloud = await self._ask_cloud(batch[unsure])
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
