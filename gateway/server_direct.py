"""The client connection with the direct path (gateway/direct.py): the server's hooks.

`DirectHttpTools` is the gateway's server protocol (gateway/server.py) with the app's
`DirectPath` asked at each request head. A request it takes is read (`on_body`) and started
(`on_message_complete`) here; one it gives back, at once or after its upstream failed before
answering, becomes an ordinary uvicorn cycle with its body already read (`direct_fallback`),
so the ASGI app serves it as if the direct path had not looked. While an exchange is in
flight a pipelined request waits in uvicorn's own queue, started when the exchange ends
(`direct_done` -> `on_response_complete`), as after any answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.direct import DirectPath, Exchange
from gateway.server import GuardedHttpTools


class _Busy:
    """Stands for the exchange in flight where uvicorn looks for a cycle in progress (so a
    pipelined request is queued)."""

    response_complete = False


_BUSY: Any = _Busy()


class DirectHttpTools(GuardedHttpTools):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # create_app's, when the lean path is on (the app as given: uvicorn may wrap it)
        path = getattr(self.config.app, "direct", None)
        self.direct_path: DirectPath | None = path if isinstance(path, DirectPath) else None
        self.direct: Exchange | None = None

    def take_head(self) -> bool:
        if self.direct is not None:  # pipelined behind an exchange in flight: queued
            self.cycle = _BUSY
            return False
        path = self.direct_path
        cycle = self.cycle
        if path is None or (cycle is not None and not cycle.response_complete):
            return False  # (pipelined behind an ordinary answer: uvicorn queues it)
        exchange = path.wants(self)
        if exchange is None:
            return False
        # what uvicorn's on_headers_complete adds to the scope, for a fallback (an exact model
        # endpoint: no query, nothing percent-encoded)
        scope = exchange.scope = self.scope
        scope["method"] = "POST"
        scope["path"] = self.root_path + exchange.path
        scope["raw_path"] = self.root_path.encode("ascii") + exchange.path.encode("ascii")
        scope["query_string"] = b""
        scope["extensions"] = self._extensions
        self.direct = exchange
        return True

    def on_body(self, body: bytes) -> None:
        exchange = self.direct
        if exchange is not None and exchange.conn is None:
            exchange.body.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        exchange = self.direct
        if exchange is None or exchange.conn is not None:
            super().on_message_complete()
            return
        self.guard.bodies.pop(self, None)
        self._head_budget = self.guard.limits.max_header_bytes  # the next request's head
        if not exchange.start():
            self.direct_fallback(exchange)

    def direct_fallback(self, exchange: Exchange) -> None:
        """The ordinary path takes `exchange`'s request: a uvicorn cycle, body read."""
        if self.direct is exchange:
            self.direct = None
        if self.transport.is_closing():
            return
        cycle = RequestResponseCycle(
            scope=exchange.scope, transport=self.transport, flow=self.flow,
            logger=self.logger, access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=exchange.keep_alive,
            on_response=self.on_response_complete)
        cycle.body = bytearray(b"".join(exchange.body))
        cycle.more_body = False
        cycle.message_event.set()  # as uvicorn's on_message_complete: the body is all there
        if not self.pipeline:  # else the pipelined request's cycle is the one being read
            self.cycle = cycle
        self._start_asgi_task(cycle, self.app)

    def direct_done(self, exchange: Exchange) -> None:
        """`exchange` answered: the connection takes its next request."""
        if self.direct is exchange:
            self.direct = None
        if self.cycle is _BUSY:
            self.cycle = None  # type: ignore[assignment]
        self.on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        exchange, self.direct = self.direct, None
        if self.cycle is _BUSY:
            self.cycle = None  # type: ignore[assignment]
        super().connection_lost(exc)
        if exchange is not None:
            exchange.client_lost()

    def body_late(self) -> None:
        if self.direct is not None and self.direct.conn is None:
            # the late body is this exchange's: no answer has begun (the cycle uvicorn keeps
            # is the previous request's, answered)
            self.cycle = None  # type: ignore[assignment]
        super().body_late()

    def shutdown(self) -> None:
        exchange = self.direct
        if exchange is not None:
            exchange.keep_alive = False  # the connection closes once the answer is over
            return
        super().shutdown()
