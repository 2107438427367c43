"""A lean HTTP/1.1 load generator: N keep-alive connections, one asyncio task each.

Built on raw asyncio protocols with the `httptools` response parser (C, the parser uvicorn
uses) under uvloop when installed, so that on a 2-core machine the client costs far less
CPU per request than the servers it measures. Per request it records:

- `ttft`: time from writing the request to the first response body byte. For an SSE chat
  stream that is the first event (with vLLM and the simulator: the role chunk, sent as the
  first token is ready); for a non-streamed answer it is the time to the body.
- `e2e`: time from writing the request to the end of the response.
- success: status 200 and, for a stream, a body ending in `data: [DONE]`.

Requests are bounded in count and time (`total`, `deadline_s`); every request has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httptools

DONE_TAIL = b"data: [DONE]\n\n"


class _Conn(asyncio.Protocol):
    """One client connection; answers one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.t_first = 0.0
        self.status = 0
        self.tail = b""
        self.keep_alive = True
        self.lost = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(exc or ConnectionResetError("server closed the connection"))

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.t_first:
            self.t_first = time.perf_counter()
        self.tail = (self.tail + body)[-16:]

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class RunResult:
    """What one load run measured."""

    concurrency: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0


def chat_request(host: str, port: int, model: str, *, stream: bool, max_tokens: int,
                 path: str = "/v1/chat/completions") -> bytes:
    """The raw bytes of one chat completion request."""
    body = json.dumps({"model": model, "stream": stream, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Hello world"}]},
                      separators=(",", ":")).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: */*\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def run_load(host: str, port: int, request: bytes, *, concurrency: int, total: int,
                   stream: bool, deadline_s: float = 60.0, timeout_s: float = 30.0) -> RunResult:
    """Send `total` copies of `request` over `concurrency` keep-alive connections."""
    loop = asyncio.get_running_loop()
    result = RunResult(concurrency)
    issued = 0
    end_by = time.perf_counter() + deadline_s

    def on_timeout(fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_exception(TimeoutError(f"no complete answer within {timeout_s} s"))

    async def worker() -> None:
        nonlocal issued
        conn: _Conn | None = None
        try:
            while issued < total and time.perf_counter() < end_by:
                issued += 1
                try:
                    if conn is None or conn.lost:
                        _, conn = await asyncio.wait_for(
                            loop.create_connection(_Conn, host, port), timeout_s)
                    fut: asyncio.Future[None] = loop.create_future()
                    conn.waiter, conn.t_first, conn.status, conn.tail = fut, 0.0, 0, b""
                    t0 = time.perf_counter()
                    assert conn.transport is not None
                    conn.transport.write(request)
                    timer = loop.call_later(timeout_s, on_timeout, fut)
                    try:
                        await fut
                    finally:
                        timer.cancel()
                    t1 = time.perf_counter()
                except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(repr(exc))
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                ok = conn.status == 200 and (not stream or conn.tail.endswith(DONE_TAIL))
                if ok:
                    result.requests += 1
                    result.ttft.append(conn.t_first - t0)
                    result.e2e.append(t1 - t0)
                else:
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(f"status {conn.status}, tail {conn.tail!r}")
                if not conn.keep_alive:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    return result


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def install_fast_loop() -> str:
    """Use uvloop when it is installed; the name of the loop in use."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
