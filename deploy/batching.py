"""Adaptive batching for the cloud service: one model call for every request waiting.

Whenever the model is free, every request queued meanwhile (up to ``max_batch_size``
examples: images, encoded table rows or sequences) goes into the next call. Under load the
batches grow by themselves; a lone request runs at once, with no timer to wait out. Only
checked inputs are queued (a merged batch that fails would fail every client in it).

Why not BentoML's own dispatcher (``CorkDispatcher``, behind ``@bentoml.api(batchable=True)``):
it learns how long to hold requests from how long they waited before. Measured here with
BentoML 1.4.39, after 32 concurrent clients a lone client then waited ~10 ms per request
(p50 0.9 -> 10-12 ms, ~900 -> ~90 requests/s) and had not recovered 400 requests later;
a 64-image request took 17-22 ms instead of 7. BentoML's maintainers describe that wait
estimate ballooning in bentoml/BentoML#3664. And a batchable API called from another API of
the same service goes through BentoML's self-proxy, an HTTP client over the app with JSON
both ways: measured ~4x slower, and 500s under concurrent load.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from bentoml.exceptions import ServiceUnavailable


@dataclass
class _Waiting:
    images: np.ndarray  # (n, ...) checked examples: images (n, C, H, W), rows, sequences
    future: asyncio.Future
    since: float  # loop time it was queued


class Overloaded(ServiceUnavailable):
    """The server sheds this request (503); ``retry_after_s`` is what to tell the client."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdaptiveBatcher:
    """``await batcher(images)`` -> the model's output rows for those examples.

    ``run`` maps an (N, ...) batch to N output rows. Batches of at most ``inline_rows``
    examples run on the event loop (a thread hand-off costs more than a small batch); bigger
    ones in a thread, so the loop goes on reading requests. A request that would make more
    than ``max_queued_rows`` examples wait is refused at once, and one still queued after
    ``max_wait_s`` is answered: both with :class:`Overloaded` (503), the server is
    overloaded. :meth:`close` fails every request still queued (shutdown).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_wait_s: float,
        inline_rows: int = 16,
        max_queued_rows: int | None = None,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.inline_rows = inline_rows
        self.max_queued_rows = max_queued_rows or 8 * max_batch_size
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._queued_rows = 0
        # The drain task, kept: the event loop holds only a weak reference to a task, and
        # one collected mid-batch would leave its clients waiting for ever.
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        if not 1 <= len(images) <= self.max_batch_size:
            raise ValueError(f"a request holds 1 to {self.max_batch_size} examples")
        if self._closed:
            raise Overloaded("server shutting down; retry on another instance")
        if self._queued_rows + len(images) > self.max_queued_rows:
            raise Overloaded(
                f"server overloaded: {self._queued_rows} examples already wait for the model "
                f"(at most {self.max_queued_rows}, MAX_QUEUED_ROWS); retry later"
            )
        loop = asyncio.get_running_loop()
        waiting = _Waiting(images, loop.create_future(), loop.time())
        self._queue.append(waiting)
        self._queued_rows += len(images)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await waiting.future

    def close(self) -> None:
        """Fail every request still queued (the server is stopping) and take no more."""
        self._closed = True
        while self._queue:
            waiting = self._pop()
            if not waiting.future.done():
                waiting.future.set_exception(
                    Overloaded("server shutting down before the model ran; retry")
                )

    def _pop(self) -> _Waiting:
        waiting = self._queue.popleft()
        self._queued_rows -= len(waiting.images)
        return waiting

    def _next_batch(self, now: float) -> list[_Waiting]:
        taken: list[_Waiting] = []
        rows = 0
        while self._queue and rows + len(self._queue[0].images) <= self.max_batch_size:
            waiting = self._pop()
            if waiting.future.done():  # the client went away
                continue
            if now - waiting.since > self.max_wait_s:
                waiting.future.set_exception(
                    Overloaded(
                        f"server overloaded: the request waited more than {self.max_wait_s:g} s "
                        "for the model (package.max_latency_ms); retry later"
                    )
                )
                continue
            taken.append(waiting)
            rows += len(waiting.images)
        return taken

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            taken = self._next_batch(loop.time())
            if taken:
                await self._run_batch(taken)
            # Let the handlers that were waiting for the loop queue their images.
            await asyncio.sleep(0)

    async def _run_batch(self, taken: list[_Waiting]) -> None:
        # Everything that can fail is inside the try: a batch that cannot be merged or run
        # fails its own clients at once, and the drain goes on with the next one.
        try:
            parts = [w.images for w in taken]
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if len(batch) <= self.inline_rows:
                out = self._run(batch)
            else:
                out = await asyncio.to_thread(self._run, batch)
            if len(out) != len(batch):
                raise RuntimeError(f"the model answered {len(out)} rows for {len(batch)}")
        except Exception as exc:  # the model failed: tell this batch's clients, go on
            for waiting in taken:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        start = 0
        for waiting in taken:
            end = start + len(waiting.images)
            if not waiting.future.done():
                waiting.future.set_result(out[start:end])
            start = end
