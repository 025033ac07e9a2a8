"""A lean closed-loop HTTP/1.1 load generator: N clients, each one request at a time.

Every client holds one keep-alive connection and sends a pre-encoded request again and again,
so the client costs little CPU next to the server it measures (httpx would cost more than
the servers under test on 2 cores). Latency is measured per request, from the first byte
written to the last byte of the answer read.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    clients: int
    seconds: float
    requests: int
    errors: int
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "requests_per_s": round(self.rps, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p90_ms": round(self.percentile(90), 3),
            "p99_ms": round(self.percentile(99), 3),
        }


def encode_post(url: str, body: bytes, content_type: str = "application/json") -> bytes:
    parts = urlsplit(url)
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _client(host, port, request, stop_at, warm_until, result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            writer.write(request)
            try:
                status, _ = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                result.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            end = time.perf_counter()
            if start >= warm_until:
                result.requests += 1
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status != 200:
                    result.errors += 1
                result.latencies_ms.append((end - start) * 1000)
    finally:
        writer.close()


# Clients connect one after another, this far apart (within the warm-up), as clients arriving
# over time do. The bento's worker processes share one listening socket, and a worker that
# wakes up accepts every connection waiting: connections opened in one burst often all went to
# one worker of two (measured: 0.1 s and 1.6 s of CPU in the two workers), and a keep-alive
# connection stays where it was accepted. 20 ms apart, a busy worker leaves the next one to an
# idle one (1.2 s and 1.3 s).
CONNECT_GAP_S = 0.02


async def run_load(
    url: str, request: bytes, clients: int, seconds: float, warmup: float = 1.0
) -> LoadResult:
    """Run ``clients`` closed-loop clients for ``warmup + seconds``; count only after warm-up.
    They connect :data:`CONNECT_GAP_S` apart during the warm-up."""
    parts = urlsplit(url)
    result = LoadResult(clients=clients, seconds=seconds, requests=0, errors=0)
    now = time.perf_counter()
    warm_until, stop_at = now + warmup, now + warmup + seconds
    gap = min(CONNECT_GAP_S, warmup / (2 * clients))
    tasks = []
    for _ in range(clients):
        client = _client(parts.hostname, parts.port, request, stop_at, warm_until, result)
        tasks.append(asyncio.ensure_future(client))
        await asyncio.sleep(gap)
    await asyncio.gather(*tasks)
    return result
