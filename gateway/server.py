"""Serving the gateway: uvicorn with the connection-level limits its HTTP parser lacks.

uvicorn's httptools protocol accepts a request head of any size (httptools joins a header's
pieces with `bytes +=`, so a 96 MB header costs seconds of CPU), any number of header
fields, connections that never send a byte, and as many connections as the kernel gives it.
`GuardedHttpTools` (a small subclass, one per server, made by `protocol_class`) adds:

- a byte budget for the request line and headers, checked *before* the parser sees the
  bytes: beyond `max_header_bytes` the answer is 431 and the connection is closed;
- a field count checked once the head is parsed (bounded by the byte budget): beyond
  `max_header_count`, 431;
- a header-read deadline: a connection gets `header_timeout` seconds from its start (or,
  on a kept-alive connection, from the next request's first byte) to complete the head;
  then it is closed (with 408 when part of a head had arrived);
- a cap on open client connections: at `max_client_connections` a new connection closes
  the oldest idle one (waiting for a request head, or kept alive between requests), and
  when none is idle it gets 503 with Retry-After. Requests in progress are never closed.

What it costs per request: one integer check per `data_received`, one timer armed and
cancelled, and two dict operations (the idle set); about 2 us (see the module's tests and
benchmarks/RESULTS.md). Nothing here runs per body chunk once the head is complete.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway import errors
from gateway.settings import GatewaySettings, env_name

log = logging.getLogger("gateway.server")

# Descriptors kept for everything but client connections: the upstream pools, the log, the
# registry file, the event loop's own.
_RESERVED_FDS = 64
# A refused head's connection reads and drops this much more, for at most this long, before
# it closes (see GuardedHttpTools._refuse_head).
_LINGER_BYTES = 4 * 1024 * 1024
_LINGER_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    header_timeout: float = 10.0
    max_client_connections: int = 4096
    retry_after: int = 5

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ConnectionLimits:
        return cls(settings.max_header_bytes, settings.max_header_count, settings.header_timeout,
                   settings.max_client_connections, settings.retry_after)


class _Guard:
    """What the connections of one server share: the limits and the idle connections, oldest
    first (a dict keeps insertion order: popping the first item is O(1))."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.idle: dict[GuardedHttpTools, None] = {}
        self.evicted = 0
        self.refused = 0

    def evict_oldest_idle(self) -> bool:
        conn = next(iter(self.idle), None)
        if conn is None:
            return False
        del self.idle[conn]
        conn.close_idle()
        self.evicted += 1
        return True


def _response(status: int, message: str, extra: bytes = b"") -> bytes:
    """A complete HTTP/1.1 answer in vLLM's error shape that closes the connection."""
    body = errors.error_body(status, message)
    reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large",
              503: b"Service Unavailable"}[status]
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\nx-request-id: %s\r\n%s\r\n"
            % (status, reason, len(body), uuid.uuid4().hex.encode(), extra)) + body


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size, field count, head deadline and
    connection cap (see the module's docstring). `guard` is set by `protocol_class`."""

    guard: ClassVar[_Guard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_budget: int | None = self.guard.limits.max_header_bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False
        self._refused = False
        self._lingering = False

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if len(self.connections) >= guard.limits.max_client_connections \
                and not guard.evict_oldest_idle():
            self._refused = True
            self.transport = transport
            guard.refused += 1
            transport.write(_response(
                503, "The gateway has as many open connections as it accepts "
                     f"({env_name('max_client_connections')}); retry shortly.",
                b"retry-after: %d\r\n" % guard.limits.retry_after))
            transport.close()
            return
        super().connection_made(transport)
        guard.idle[self] = None
        self._head_timer = self.loop.call_later(guard.limits.header_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.idle.pop(self, None)
        self._cancel_head_timer()
        if self._refused:
            self.parser = None  # type: ignore[assignment]
            return
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Closed to make room for a new connection (it had no request in progress)."""
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.close()

    # -- the request head ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        budget = self._head_budget
        if budget is not None:
            budget -= len(data)
            self._head_budget = budget
            if budget < 0:
                if self._lingering:  # refused: what else arrives is read and dropped
                    if budget < -_LINGER_BYTES:
                        self.transport.close()
                    return
                if not _head_ends_within(data, len(data) + budget):
                    self._refuse_head(431, "The request line and headers exceed the gateway's "
                                           f"limit of {self.guard.limits.max_header_bytes} "
                                           f"bytes ({env_name('max_header_bytes')}). Send "
                                           f"fewer or smaller headers.")
                    return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if self._head_timer is None:  # a kept-alive connection's next request
            self._head_timer = self.loop.call_later(self.guard.limits.header_timeout,
                                                    self._head_late)

    def on_headers_complete(self) -> None:
        self._head_budget = None
        self._head_begun = False
        self._cancel_head_timer()
        self.guard.idle.pop(self, None)
        limit = self.guard.limits.max_header_count
        if len(self.headers) > limit:
            app = self.app
            self.app = _too_many_headers(len(self.headers), limit)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_budget = self.guard.limits.max_header_bytes  # the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self.guard.idle[self] = None  # kept alive, waiting: the newest idle connection

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_begun:
            self.transport.write(_response(
                408, f"The request line and headers did not arrive within "
                     f"{self.guard.limits.header_timeout:g} s ({env_name('header_timeout')})."))
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse_head(self, status: int, message: str) -> None:
        """Answer and close. The close lingers (up to _LINGER_SECONDS or _LINGER_BYTES
        more): closing a socket with unread input sends a reset, which can destroy the
        answer before a client still sending its head has read it."""
        self._cancel_head_timer()
        self.guard.idle.pop(self, None)
        log.info("refused a request head from %s: %s", _peer(self.client), message)
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(_response(status, message))
        self._lingering = True
        self._head_budget = 0
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(_LINGER_SECONDS, transport.close)


def _head_ends_within(data: bytes, allowed: int) -> bool:
    """Whether the head ends (CRLF CRLF) within the first `allowed` bytes of `data` (the
    rest is body: a head that fits may arrive with its body in one read)."""
    end = data.find(b"\r\n\r\n", 0, max(allowed, 0))
    return end != -1


def _too_many_headers(count: int, limit: int) -> Any:
    message = (f"The request has {count} header fields; the gateway accepts {limit} "
               f"({env_name('max_header_count')}). Send fewer headers.")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        log.info("refused a request with %d header fields", count)
        await errors.GatewayError(431, message).response(
            {"connection": "close", "x-request-id": uuid.uuid4().hex})(scope, receive, send)

    return app


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def protocol_class(limits: ConnectionLimits) -> type[GuardedHttpTools]:
    """A protocol class for one server (its connections share one guard)."""
    return type("GuardedHttpTools", (GuardedHttpTools,), {"guard": _Guard(limits)})


def fit_descriptors(wanted_connections: int) -> int:
    """Raise the soft open-file limit toward what `wanted_connections` needs (each proxied
    request holds a client and an upstream socket); return how many client connections fit
    in the limit there is (the cap is lowered to that, with a warning, never silently
    exceeded)."""
    needed = 2 * wanted_connections + _RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted_connections
    fits = max(1, (soft - _RESERVED_FDS) // 2)
    log.warning("open-file limit %d fits %d client connections, not %d "
                "(GATEWAY_MAX_CLIENT_CONNECTIONS): the cap is lowered to %d; raise the limit "
                "(ulimit -n) to allow more", soft, fits, wanted_connections, fits)
    return fits


def serve(app: Any, settings: GatewaySettings, *, graceful_shutdown: int = 30) -> None:
    """Run `app` with uvicorn (uvloop when installed) behind the connection limits."""
    import uvicorn

    limits = ConnectionLimits.from_settings(settings)
    fits = fit_descriptors(limits.max_client_connections)
    if fits < limits.max_client_connections:
        limits = ConnectionLimits(limits.max_header_bytes, limits.max_header_count,
                                  limits.header_timeout, fits, limits.retry_after)
    # GATEWAY_ACCESS_LOG: the gateway writes its own lines (with the request id and model).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, loop="auto", http=protocol_class(limits),
                timeout_graceful_shutdown=graceful_shutdown)
