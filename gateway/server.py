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
- a body-read deadline: a request's body must arrive within `body_timeout` seconds of the
  end of its head, else 408 and the connection is closed (a client trickling its body, or
  declaring one it never sends, would otherwise hold a connection and a request forever:
  such connections are not idle, so the cap below cannot reclaim them);
- a cap on open client connections: at `max_client_connections` a new connection closes
  the oldest idle one (waiting for a request head, or kept alive between requests), and
  when none is idle it gets 503 with Retry-After. Requests in progress are never closed.

What it costs per request: four short Python methods (no timer: one sweep per server every
quarter of the shorter timeout, at most 1 s, checks the waiting connections) and four dict
operations; `benchmarks/limits_cost.py` measures it. Per body chunk it costs one `is None`
check.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway import errors
from gateway.settings import GatewaySettings, env_name
from gateway.splice import EXTENSION, Paused, Splice

log = logging.getLogger("gateway.server")

# Descriptors kept for everything but client connections: the upstream pools, the log, the
# registry file, the event loop's own.
_RESERVED_FDS = 64
# A refused head's connection reads and drops this much more, for at most this long, before
# it closes (see GuardedHttpTools._refuse_head).
_LINGER_BYTES = 4 * 1024 * 1024
_LINGER_SECONDS = 1.0
_GC_YOUNG = 20_000


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    header_timeout: float = 10.0
    max_client_connections: int = 4096
    retry_after: int = 5
    body_timeout: float = 60.0

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ConnectionLimits:
        return cls(settings.max_header_bytes, settings.max_header_count, settings.header_timeout,
                   settings.max_client_connections, settings.retry_after,
                   settings.body_timeout)


class _Guard:
    """What the connections of one server share: the limits, the connections waiting for a
    request head (fresh, or kept alive between requests), oldest first (a dict keeps
    insertion order: the oldest is the first item), the connections whose request body is
    still to come (with when its head ended), and one sweep that closes those whose head or
    body is late. A sweep every `interval` seconds over the waiting connections costs less
    than a timer armed and cancelled per request."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.idle: dict[GuardedHttpTools, None] = {}
        self.bodies: dict[GuardedHttpTools, float] = {}
        self.interval = max(0.05, min(1.0, limits.header_timeout / 4,
                                      limits.body_timeout / 4))
        self._sweep: asyncio.TimerHandle | None = None
        self.evicted = 0
        self.refused = 0
        self.late = 0

    def waiting(self, conn: GuardedHttpTools) -> None:
        """`conn` waits for a request head from now on (the newest idle connection)."""
        self.idle[conn] = None
        self.watch(conn.loop)

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """A connection has a deadline to keep: make sure the sweep runs."""
        if self._sweep is None:
            self._sweep = loop.call_later(self.interval, self.sweep, loop)

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        now = loop.time()
        deadline = now - self.limits.header_timeout
        for conn in [c for c in self.idle if c.head_since is not None
                     and c.head_since <= deadline]:
            self.late += 1
            conn.head_late()
        deadline = now - self.limits.body_timeout
        for conn in [c for c, since in self.bodies.items() if since <= deadline]:
            self.late += 1
            conn.body_late()
        if self.idle or self.bodies:
            self._sweep = loop.call_later(self.interval, self.sweep, loop)

    def evict_oldest_idle(self) -> bool:
        conn = next(iter(self.idle), None)
        if conn is None:
            return False
        del self.idle[conn]
        self.evicted += 1
        if not conn.transport.is_closing():
            conn.transport.close()
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
    connection cap (see the module's docstring). `guard` is set by `protocol_class`.

    Per request it adds four short methods and no timer: `data_received` (the head budget;
    the time the head began), `on_headers_complete` (the field count; no longer waiting),
    `on_message_complete` (the next head's budget) and `on_response_complete` (waiting
    again)."""

    guard: ClassVar[_Guard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_budget: int | None = self.guard.limits.max_header_bytes
        # When the wait for the current head began (loop time); None: not waiting, or kept
        # alive with no byte of a next request yet (uvicorn's keep-alive timeout rules then).
        self.head_since: float | None = None
        self._refused = False
        self._lingering = False
        # gateway/splice.py: a relayed body written straight to this connection (or
        # gateway/direct.py's exchange): what the client's back-pressure pauses
        self.splice: Splice | Paused | None = None
        self.on_lost: Callable[[], None] | None = None  # splice.on_client_lost
        self._extensions: dict[str, dict[object, object]] = {EXTENSION: {"connection": self}}

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
        self.head_since = self.loop.time()  # a fresh connection owes a head from its start
        guard.waiting(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.idle.pop(self, None)
        self.guard.bodies.pop(self, None)
        if self._refused:
            self.parser = None  # type: ignore[assignment]
            return
        super().connection_lost(exc)
        lost, self.on_lost = self.on_lost, None
        if lost is not None:
            lost()

    # -- the request head ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        budget = self._head_budget
        if budget is not None:
            if self.head_since is None:  # the first byte of a kept-alive connection's next head
                self.head_since = self.loop.time()
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
        if self in self.guard.bodies:  # its body did not all come with this read
            self.guard.watch(self.loop)

    def on_headers_complete(self) -> None:
        self._head_budget = None
        self.head_since = None
        guard = self.guard
        guard.idle.pop(self, None)
        limit = guard.limits.max_header_count
        if len(self.headers) > limit:
            app = self.app
            self.app = _too_many_headers(len(self.headers), limit)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        if not self.take_head():
            super().on_headers_complete()
            self.scope["extensions"] = self._extensions
        # until on_message_complete (at once, in this same read, when no body follows)
        guard.bodies[self] = self.loop.time()

    def take_head(self) -> bool:
        """True when a subclass serves this request itself (gateway/server_direct.py)."""
        return False

    def on_message_complete(self) -> None:
        self.guard.bodies.pop(self, None)
        super().on_message_complete()
        self._head_budget = self.guard.limits.max_header_bytes  # the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline and not self.transport.is_closing():
            if self._head_budget == self.guard.limits.max_header_bytes:
                self.head_since = None  # idle: uvicorn's keep-alive timeout applies
            self.guard.waiting(self)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.splice is not None:
            self.splice.pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.splice is not None:
            self.splice.resume()

    def head_late(self) -> None:
        """The head did not complete within the header timeout: 408 if part of one came,
        else close without a word."""
        self.guard.idle.pop(self, None)
        self.head_since = None
        transport = self.transport
        if transport.is_closing():
            return
        budget = self._head_budget
        if budget is not None and budget < self.guard.limits.max_header_bytes:
            transport.write(_response(
                408, f"The request line and headers did not arrive within "
                     f"{self.guard.limits.header_timeout:g} s ({env_name('header_timeout')})."))
        transport.close()

    def body_late(self) -> None:
        """The body did not complete within the body timeout: 408 (unless the answer has
        begun), and the connection closes. The request sees the client as gone; the scope
        says why (`gateway.body_late`), so its log line and metrics say 408."""
        self.guard.bodies.pop(self, None)
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        if cycle is not None:
            cycle.scope["gateway.body_late"] = self.guard.limits.body_timeout  # type: ignore[typeddict-unknown-key]
            cycle.disconnected = True  # what the app sends now goes nowhere
            cycle.message_event.set()
        if not started:
            transport.write(_response(408, errors.body_late(
                self.guard.limits.body_timeout).message))
        transport.close()

    def _refuse_head(self, status: int, message: str) -> None:
        """Answer and close. The close lingers (up to _LINGER_SECONDS or _LINGER_BYTES
        more): closing a socket with unread input sends a reset, which can destroy the
        answer before a client still sending its head has read it."""
        self.guard.idle.pop(self, None)
        self.head_since = None
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


def protocol_class(limits: ConnectionLimits,
                   base: type[GuardedHttpTools] = GuardedHttpTools) -> type[GuardedHttpTools]:
    """A protocol class for one server (its connections share one guard); `base`: this
    module's, or one with the direct path (gateway/server_direct.py)."""
    return type(base.__name__, (base,), {"guard": _Guard(limits)})


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


def tune_gc() -> None:
    """Fewer, cheaper cyclic collections for a server whose garbage is almost all freed by
    reference counting: what exists at start-up (modules, the app, the registry) is frozen out
    of every collection, and the youngest generation is collected every `_GC_YOUNG`
    allocations, not 700 (at 700 the collector ran several times per proxied request and took
    4-8 % of the gateway's CPU under load; see benchmarks/RESULTS.md)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, older, oldest)


def serve(app: Any, settings: GatewaySettings, *, graceful_shutdown: int = 30,
          protocol: type[GuardedHttpTools] = GuardedHttpTools) -> None:
    """Run `app` with uvicorn (uvloop when installed) behind the connection limits, with
    `protocol` (a subclass of GuardedHttpTools) for its connections."""
    import uvicorn

    limits = ConnectionLimits.from_settings(settings)
    fits = fit_descriptors(limits.max_client_connections)
    if fits < limits.max_client_connections:
        limits = ConnectionLimits(limits.max_header_bytes, limits.max_header_count,
                                  limits.header_timeout, fits, limits.retry_after,
                                  limits.body_timeout)
    tune_gc()
    # GATEWAY_ACCESS_LOG: the gateway writes its own lines (with the request id and model).
    # No proxy-headers middleware: the gateway never reads the client's address or scheme,
    # and uvicorn's walks every request's headers for X-Forwarded-* (about 1.5 % of its CPU).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, loop="auto", http=protocol_class(limits, protocol),
                proxy_headers=False,
                timeout_graceful_shutdown=graceful_shutdown)
