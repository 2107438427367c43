"""One upstream HTTP/1.1 connection of gateway/h1.py: an asyncio protocol around llhttp.

`data_received` feeds `httptools`' C parser, whose body callback is `buf`'s own `append` (no
Python frame per body part). Then, once per arrival, it wakes the one reader, or, with a `sink`
set (gateway/splice.py), hands what arrived together to the sink at once, waking nobody.
Reading pauses while more than `HIGH_WATER` bytes (counted as they arrive, framing included)
wait for a slow reader (back-pressure to the upstream, flat memory).
Failures are httpx's types, kept in `error` for the reader: framing llhttp rejects
`RemoteProtocolError` (at once), a close before the head `RemoteProtocolError`, a close
mid-body `ReadError`, no head in time (`head_late`, a timer of `H1Client.send`) `ReadTimeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools
import httpx

HIGH_WATER = 256 * 1024


class Conn(asyncio.Protocol):
    """One upstream connection; one request at a time."""

    __slots__ = ("_drain", "_paused", "buf", "buffered", "complete", "error", "head", "headers",
                 "idle_since", "keep_alive", "loop", "lost", "parser", "sink", "status",
                 "transport", "until_close", "waiter", "watcher")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # made inside the loop (create_connection): kept, as asyncio.get_running_loop() is a
        # getpid() system call each time on Python 3.11
        self.loop = asyncio.get_running_loop()
        self.parser: Any = None
        self.lost = False
        self.idle_since = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.buf: list[bytes] = []
        self.parser = httptools.HttpResponseParser(_Callbacks(self))
        self.buffered = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.head = self.complete = self.keep_alive = self.until_close = False
        self.error: httpx.HTTPError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.sink: Callable[[bytes], None] | None = None
        # Told of every change a reader would be woken for (head, end, failure), in place of
        # a reader (gateway/direct.py)
        self.watcher: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed answer from the upstream: {exc}"))
            assert self.transport is not None
            self.transport.close()
        buf = self.buf
        if not buf:
            return
        if self.sink is not None:
            self.sink(buf[0] if len(buf) == 1 else b"".join(buf))
            buf.clear()
            return
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self.waiter is not None:
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.complete:
            return
        if self.head and self.until_close and exc is None:
            self.complete = True  # a body delimited by the end of the connection
        elif self.head:
            self._fail(httpx.ReadError("the upstream closed the connection mid-body"))
        else:
            self._fail(httpx.RemoteProtocolError("the upstream closed the connection "
                                                 "without answering"))
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.status = parser.get_status_code()
        self.head = True
        self.until_close = not parser.should_keep_alive() and not any(
            k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def head_late(self, limit: float) -> None:
        """No response head within `limit` seconds (a timer set by `H1Client.send`)."""
        if not self.head:
            self._fail(httpx.ReadTimeout(f"no response head within {limit:g} s"))

    def _fail(self, exc: httpx.HTTPError) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self.watcher is not None:
            self.watcher()

    def take(self) -> bytes:
        buf = self.buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain


class _Callbacks:
    """What llhttp calls back, for one answer: the body parts go straight into the
    connection's `buf` (a list's own `append`, no Python frame per part); what they mean is
    worked out once per arrival, in `Conn.data_received`."""

    __slots__ = ("on_body", "on_header", "on_headers_complete", "on_message_complete")

    def __init__(self, conn: Conn) -> None:
        self.on_header = conn.on_header
        self.on_headers_complete = conn.on_headers_complete
        self.on_body = conn.buf.append
        self.on_message_complete = conn.on_message_complete
