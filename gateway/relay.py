"""Relaying an upstream response to the client, chunk by chunk, as it arrives.

No buffering, no re-encoding: raw bytes from the upstream socket go straight to the client,
as soon as they arrive; what arrived together (a burst of SSE events) goes out in one write.
A client that disconnects while the pump runs cancels it (the gateway's server says so from
its `connection_lost`, gateway/splice.py's `on_client_lost`; under another server a watcher
task waits for `http.disconnect`), and the upstream response is closed at once either way, so
vLLM aborts a generation nobody is reading.

Deadlines the gateway owns (an HTTP client's parser may wait forever: aiohttp's C parser never
raises on a broken chunk size): when the upstream response carries `read_timeout`, one timer
per response checks that a read arrived within that many seconds of the previous one, and
`total_deadline` (loop time) bounds the whole body. Per chunk the pump only stores the loop's
clock; the timer is re-armed once per `read_timeout`, not per chunk. A deadline that passes
cancels the pump, closes the upstream, and ends the answer like a broken upstream: an error
event on an event stream, a dropped connection otherwise (a truncated body must not look
complete).

Per chunk: with the `h1` client behind the gateway's own server, a chunked answer is spliced
(gateway/splice.py: the upstream connection writes each arrival to the client's transport,
this task sleeps until the body ends); with another upstream that offers `readany()` (h1
otherwise, aiohttp): one read, one `send`, one clock read; other clients: `aiter_raw()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway import errors
from gateway.splice import on_client_lost, splice
from gateway.upstream import UpstreamResponse

# Hop-by-hop headers (RFC 9110 7.6.1) and those the ASGI server sets itself.
_DROP = frozenset((b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
                   b"upgrade", b"proxy-authenticate", b"proxy-authorization",
                   b"proxy-connection", b"date", b"server"))
_EVENT_STREAM_EXTRA = ((b"x-accel-buffering", b"no"),)
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}


def relay_headers(raw: Iterable[tuple[bytes, bytes]], status: int, request_id: str,
                  retry_after: int) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The headers the client gets for an upstream answer's `raw` headers (hop-by-hop ones
    dropped, names lower-cased, no buffering by intermediaries for an event stream, a
    Retry-After on a 503, the request id), and whether the answer is an event stream."""
    headers = []
    content_type = b""
    present_cache = present_retry = False
    for k, v in raw:
        k = k.lower()
        if k in _DROP:
            continue
        if k == b"content-type":
            content_type = v
        elif k == b"cache-control":
            present_cache = True
        elif k == b"retry-after":
            present_retry = True
        headers.append((k, v))
    is_event_stream = content_type.startswith(b"text/event-stream")
    if is_event_stream:
        # Stop intermediaries (nginx, CDNs) from buffering the stream.
        if not present_cache:
            headers.append((b"cache-control", b"no-cache"))
        headers.extend(_EVENT_STREAM_EXTRA)
    if status == 503 and not present_retry:
        headers.append((b"retry-after", str(retry_after).encode()))
    headers.append((b"x-request-id", request_id.encode()))
    return headers, is_event_stream


def broken_event(model: str, request_id: str, exc: httpx.HTTPError, tail: bytes) -> bytes:
    """The error event that ends an event stream whose upstream failed mid-answer (after
    `tail`, the last bytes sent: the event starts on a fresh line)."""
    detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
    event = errors.upstream_broken_stream(model, detail, request_id)
    return (b"" if tail.endswith(b"\n\n") else b"\n\n") + event


class RelayResponse(Response):
    """An ASGI response that streams an already opened upstream response (httpx's,
    `gateway.upstream.AiohttpResponse` or `gateway.h1.H1Response`)."""

    def __init__(self, upstream: UpstreamResponse, model: str, request_id: str,
                 retry_after: int) -> None:
        self.upstream = upstream
        self.model = model
        self.request_id = request_id
        self.status_code = upstream.status_code
        self.raw_headers, self.is_event_stream = relay_headers(
            upstream.headers.raw, upstream.status_code, request_id, retry_after)
        self.background = None
        # Set by the app (metrics): called once after the first body chunk was sent, and
        # when the upstream fails mid-response. Nothing is checked per chunk.
        self.on_first_chunk: Callable[[], None] | None = None
        self.on_broken: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.current_task()
        assert pump is not None
        loop = pump.get_loop()
        state = _WatchState(loop)
        state.pump = pump
        stop_watch: Callable[[], object] | None = on_client_lost(scope, receive,
                                                                 state.client_lost)
        if stop_watch is None:
            stop_watch = loop.create_task(_watch(receive, state)).cancel
        read_timeout: float | None = getattr(self.upstream, "read_timeout", None)
        total: float | None = getattr(self.upstream, "total_deadline", None)
        if read_timeout is not None or total is not None:
            state.arm(pump, read_timeout, total)
        try:
            try:
                await self._pump(scope, send, state)
            finally:
                state.done = True  # from here on neither a disconnect nor a deadline cancels
                state.disarm()
        except asyncio.CancelledError:
            if state.disconnected and pump.uncancel() == 0:
                return  # the client went away: nobody to answer
            if state.expired is not None and pump.uncancel() == 0:
                await self._broken(send, state, httpx.ReadTimeout(state.expired))
                return
            raise
        finally:
            stop_watch()
            await self.upstream.aclose()

    async def _pump(self, scope: Scope, send: Send, state: _WatchState) -> None:
        start: Message = {"type": "http.response.start", "status": self.status_code,
                          "headers": self.raw_headers}
        spliced = splice(scope, send, self.upstream, state, self.on_first_chunk)
        if spliced is None:
            await send(start)
        elif not await spliced.start(send, start):
            spliced = None
        readany: Callable[[], Awaitable[bytes]] | None = getattr(self.upstream, "readany", None)
        try:
            if spliced is not None:
                await spliced.run()
            elif readany is not None:
                await self._pump_reads(send, readany, state)
            else:
                await self._pump_iter(send, state)
        except httpx.HTTPError as exc:
            await self._broken(send, state, exc)
            return
        except Exception as exc:
            map_error: Callable[[BaseException], httpx.HTTPError | None] | None = getattr(
                self.upstream, "map_error", None)
            mapped = map_error(exc) if map_error is not None else None
            if mapped is None:
                raise
            await self._broken(send, state, mapped)
            return
        await send(_END)

    async def _pump_reads(self, send: Send, readany: Callable[[], Awaitable[bytes]],
                          state: _WatchState) -> None:
        clock = state.clock
        first = self.on_first_chunk
        if first is not None:
            chunk = await readany()
            if not chunk:
                return
            state.last_read = clock()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state.tail = chunk
            first()
        while True:
            chunk = await readany()
            if not chunk:
                return
            state.last_read = clock()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state.tail = chunk

    async def _pump_iter(self, send: Send, state: _WatchState) -> None:
        clock = state.clock
        first = self.on_first_chunk
        async for chunk in self.upstream.aiter_raw():
            if chunk:
                state.last_read = clock()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                state.tail = chunk
                if first is not None:
                    first()
                    first = None

    async def _broken(self, send: Send, state: _WatchState, exc: httpx.HTTPError) -> None:
        """The upstream failed (or missed a deadline) after the response started."""
        if self.on_broken is not None:
            self.on_broken()
        if not self.is_event_stream:
            # Break the connection: a truncated body must not look complete.
            raise UpstreamBroken(self.model, exc) from exc
        event = broken_event(self.model, self.request_id, exc, state.tail)
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send(_END)


class _WatchState:
    """What the pump, the disconnect watcher and the deadline timer share."""

    __slots__ = (
        "clock",
        "disconnected",
        "done",
        "expired",
        "last_read",
        "loop",
        "pump",
        "read_timeout",
        "tail",
        "timer",
        "total",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.clock = loop.time
        self.done = False
        self.disconnected = False
        self.expired: str | None = None
        self.tail = b"\n\n"
        self.last_read = 0.0
        self.read_timeout: float | None = None
        self.total: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.pump: asyncio.Task[Any] | None = None

    def arm(self, pump: asyncio.Task[Any], read_timeout: float | None,
            total: float | None) -> None:
        self.pump, self.read_timeout, self.total = pump, read_timeout, total
        self.last_read = self.clock()
        self.timer = self.loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        due = self.last_read + self.read_timeout if self.read_timeout is not None else None
        if self.total is not None and (due is None or self.total < due):
            return self.total
        assert due is not None
        return due

    def _check(self) -> None:
        self.timer = None
        if self.done:
            return
        now = self.clock()
        if self.total is not None and now >= self.total:
            self.expired = "the answer did not end within its total deadline"
        elif self.read_timeout is not None and now - self.last_read >= self.read_timeout:
            self.expired = f"no bytes from the model within {self.read_timeout:g} s"
        else:
            self.timer = self.loop.call_at(self._due(), self._check)
            return
        assert self.pump is not None
        self.pump.cancel()

    def client_lost(self) -> None:
        if not self.done:
            self.disconnected = True
            assert self.pump is not None
            self.pump.cancel()

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def _watch(receive: Receive, state: _WatchState) -> None:
    """Cancel the pump when the client disconnects before the response is over (where the
    server cannot tell: gateway/splice.py's on_client_lost)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            state.client_lost()
            return


class UpstreamBroken(Exception):
    """The upstream failed after the response started; the client connection is dropped."""

    def __init__(self, model: str, exc: Exception) -> None:
        super().__init__(f"upstream of model {model!r} failed mid-response: {exc!r}")
