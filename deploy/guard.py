"""The ASGI guard in front of every service: refuses ambiguous headers, bodies of the wrong
type or size (400, 415, 413) and other kinds' routes (404) before BentoML parses anything, and
sheds requests beyond the worker's concurrency bound at once (503 with ``Retry-After``).

Without it a multipart body without a boundary answers 500 (BentoML's form parser), a form
field holding a URL makes BentoML download it, and a huge body is parsed into Python objects
before any check of ours runs. Every refusal is ``{"error": "<field>: <rule>"}``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from bentoml.exceptions import InvalidArgument
from starlette.responses import JSONResponse

from deploy.batching import Overloaded
from deploy.common import MAX_BYTES_ENV, MAX_CONCURRENCY_ENV

# Headers that say where a body starts, ends and what it is. Two of one (or a length and a
# chunked encoding together) can be read two ways: the guard, Starlette and BentoML, or a proxy
# in front, could each check a different body than the one served. Refused outright.
FRAMING_HEADERS = (b"content-type", b"content-length", b"transfer-encoding")
RETRY_AFTER_S = 1  # what a shed client is told to wait: a tiny model frees a slot in ms


@dataclass
class GuardRules:
    """What one service's guard lets through. The service fills it in once it has read its
    model card (the guard exists before the service: Starlette builds it on the first
    event, the lifespan start-up that creates the service)."""

    json_limit: int = 1 << 20  # bytes of a JSON body
    # Requests this worker handles at once (reading, queued, running); more get a 503 at once.
    # 0: no bound (until the service has read its settings).
    max_concurrency: int = 0
    # Routes taking a multipart upload -> (the one file field, bytes of the whole body).
    uploads: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Routes of another kind of model (a table bento asked for /predict_image) -> a 404 that
    # says what this bento serves instead.
    foreign: dict[str, str] = field(default_factory=dict)


def bad_request(exc: InvalidArgument, status: int = 400) -> JSONResponse:
    # BentoML 1.4.39 answers an InvalidArgument with the body `[{"error": ...}]` (a stray
    # tuple); we answer `{"error": ...}`, the shape its own schema errors have.
    return JSONResponse({"error": str(exc)}, status_code=status)


def overloaded(exc: Overloaded) -> JSONResponse:
    # BentoML answers a ServiceUnavailable with "An unexpected error has occurred" and no
    # Retry-After; say what happened and when to come back.
    return JSONResponse(
        {"error": str(exc)},
        status_code=503,
        headers={"Retry-After": str(exc.retry_after_s)},
    )


class RequestGuard:
    """ASGI middleware enforcing one service's :class:`GuardRules`.

    JSON is the only body accepted, except on the upload routes: there a multipart form with
    exactly one file, in the field the route names, and nothing else.
    """

    def __init__(self, app: Any, rules: GuardRules) -> None:
        self.app = app
        self.rules = rules
        self.in_flight = 0  # POSTs admitted and not yet answered, in this worker

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = framing_problem(scope["headers"])
        if problem is not None:
            return await _reject(scope, send, 400, problem)
        route = scope["path"].rstrip("/") or "/"
        problem = self.rules.foreign.get(route)
        if problem is not None:
            return await _reject(scope, send, 404, problem)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        bound = self.rules.max_concurrency
        if bound and self.in_flight >= bound:
            # Before the body is read: an overloaded worker holds no more bodies.
            return await _reject(scope, send, 503, _busy(bound), retry_after=RETRY_AFTER_S)
        self.in_flight += 1
        try:
            return await self._checked(scope, receive, send, route)
        finally:
            self.in_flight -= 1

    async def _checked(self, scope: dict, receive: Any, send: Any, route: str) -> None:
        headers = dict(scope["headers"])  # each framing header is there at most once
        sent_type = headers.get(b"content-type")
        content_type = (sent_type or b"application/json").decode("latin-1")
        media = content_type.split(";")[0].strip().lower()
        declared = headers.get(b"content-length")
        upload_field, limit = self.rules.uploads.get(route, (None, self.rules.json_limit))
        if upload_field is not None and media != "multipart/form-data":
            message = (
                f"request body: must be a multipart/form-data upload with the file in "
                f"field {upload_field!r}; {_what_was_sent(sent_type, media, declared)}"
            )
            return await _reject(scope, send, 415, message)
        if upload_field is None and media != "application/json":
            message = (
                "request body: must be JSON sent as Content-Type: application/json; "
                + _what_was_sent(sent_type, media, declared)
            )
            return await _reject(scope, send, 415, message)
        if declared is not None:
            if not declared.isdigit():
                return await _reject(scope, send, 400, "Content-Length: must be a whole number")
            if int(declared) > limit:
                return await _reject(scope, send, 413, _too_large(int(declared), limit))
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
                return await _reject(scope, send, 413, _too_large(len(body), limit))
        if upload_field is not None:
            problem = await check_upload_form(content_type, bytes(body), upload_field)
            if problem:
                return await _reject(scope, send, 400, problem)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


class RequestTimeout:
    """What BentoML's ``TimeoutMiddleware`` does for ``traffic.timeout``, without its leak: a
    request whose answer has not started after ``timeout`` seconds is cancelled and answered
    ``504 {"error": "Not able to process the request in <timeout> seconds"}``.

    BentoML 1.4.39's starts a timer per request and never cancels it: under uvloop 6 objects
    the garbage collector tracks (the timer, its handle and context, a future, a bound method,
    a tuple) outlive each request by the whole ``timeout`` (30 s); at 2,000 requests/s that
    is 360,000 more for every full collection to walk, which stalled requests by ~80 ms. Here
    the timer is cancelled as soon as the answer starts (or the request ends): none is left,
    and the app runs in the request's own task rather than a second one.
    """

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        task = asyncio.current_task()
        timed_out = started = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout, time_out)

        async def answer_started(message: dict) -> None:
            nonlocal started
            started = True
            timer.cancel()  # from the first message on, the answer is on its way
            await send(message)

        try:
            await self.app(scope, receive, answer_started)
        except asyncio.CancelledError:
            if not timed_out or started:
                raise  # cancelled by someone else (shutdown, client gone), or too late for a 504
            task.uncancel()
            await JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )(scope, receive, send)
        finally:
            timer.cancel()


def framing_problem(raw_headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's framing headers are ambiguous (None when they are not)."""
    names = [name.lower() for name, _ in raw_headers]
    for header in FRAMING_HEADERS:
        count = names.count(header)
        if count > 1:
            title = header.decode().title()
            return f"request headers: {title} sent {count} times; send it once"
    if b"content-length" in names and b"transfer-encoding" in names:
        return (
            "request headers: Content-Length and Transfer-Encoding sent together; send one of them"
        )
    return None


def _what_was_sent(sent_type: bytes | None, media: str, declared: bytes | None) -> str:
    """The real cause, as the client sent it: not a Content-Type the client never named."""
    if sent_type is not None:
        return f"got Content-Type {media!r}"
    if declared == b"0":
        return "the request has no body and no Content-Type header"
    return "the request has no Content-Type header"


def _too_large(size: int, limit: int) -> str:
    return (
        f"request body: {size} bytes is more than the {limit} allowed "
        f"(package.max_request_bytes / max_image_bytes in params.yaml, or {MAX_BYTES_ENV})"
    )


def _busy(bound: int) -> str:
    return (
        f"server busy: this worker is already handling {bound} requests "
        f"({MAX_CONCURRENCY_ENV}); retry after {RETRY_AFTER_S} s"
    )


async def _reject(
    scope: dict, send: Any, status: int, message: str, retry_after: int | None = None
) -> None:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, None, send)


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
            return f"{field}: missing; send the file in form field {field!r}"
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
