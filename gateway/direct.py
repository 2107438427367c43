"""The direct path: a proxied request served in the server's own callbacks.

The ordinary path (gateway/proxy.py under uvicorn's ASGI cycle) runs every request in a task:
about 190 Python calls per request, and two waits behind the event loop's other work (the
task's first step, and its wake-up when the upstream's head arrives), each as long as one
poll's worth of the other streams' events. For the common request this module does the same
work in the callbacks that already run: when the request body is complete (the client
connection's `on_message_complete`), and when the upstream connection parses a head, a body
part or its end (`Conn.watcher`, `Conn.sink`). No task, no ASGI messages, no Starlette request.
benchmarks/RESULTS.md (issue 11) has the figures.

Which requests. At the head (`DirectPath.wants`): `POST` to a model endpoint over HTTP/1.1,
no query, no `Expect` or upgrade, a declared length within the body limits, not multipart.
When the body is complete (`Exchange.start`), every decision is made before anything is done:
the body budget, the JSON and its model, the keys and the model's allow-list, no timeouts of the
model's own, the scheduler's admission at once, a replica, and an idle pooled connection to
it. Any "no" hands the request, body read, to uvicorn's cycle: the ordinary path answers it
as it always has (errors, queueing, activation, failover), as if this module had not looked.

Then the exchange owns the request to its end, and every outcome has one place here:
- the upstream fails before its head: undone, and handed to the ordinary path (a retry on a
  pooled connection the upstream had closed, as the ordinary path's failover would), except a
  head that did not come within the read timeout: 504 in vLLM's shape;
- the head: the client's head as the relay makes it (gateway/relay.py `relay_headers`); the
  body chunked (or with the upstream's length), each arrival one write;
- a body that breaks or goes silent past the read timeout: an error event on an event
  stream, else the connection is dropped (a truncated body must not look complete);
- the client leaves: the upstream connection is closed (vLLM aborts the generation), 499
  before the head;
- back-pressure: a client that does not read pauses the upstream connection;
- the end: the connection back to the pool, the slot released, the request metered once,
  the client connection ready for its next request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httptools
import httpx

from gateway import auth, errors, logs
from gateway import body as bodies
from gateway.h1 import H1Client
from gateway.middleware import request_id_of
from gateway.proxy import MODEL_ENDPOINTS, NOT_FORWARDED
from gateway.relay import broken_event, relay_headers
from gateway.splice import answer_head
from gateway.upstream import map_failure

if TYPE_CHECKING:
    from gateway.h1_conn import Conn
    from gateway.runtime import Runtime

log = logging.getLogger("gateway")

_NO_BODY = (204, 304)
_SMALL_BODY = 64 * 1024  # a larger body takes the ordinary path (the upstream's write window)


class DirectPath:
    """What the direct path needs of one gateway (made by create_app)."""

    def __init__(self, runtime: Runtime, access: auth.Access, budget: bodies.BodyBudget,
                 paths: Iterable[str] = MODEL_ENDPOINTS) -> None:
        self.runtime = runtime
        self.access = access
        self.budget = budget
        self.paths = frozenset(p.encode() for p in paths)
        self.max_body = min(runtime.settings.max_body_bytes, _SMALL_BODY)

    def wants(self, proto: Any) -> Exchange | None:
        """An exchange for the request whose head `proto` (the client connection) has just
        parsed, or None: the ordinary path takes it."""
        parser = proto.parser
        if (parser.get_method() != b"POST" or parser.get_http_version() != "1.1"
                or proto.expect_100_continue or parser.should_upgrade()):
            return None
        url = httptools.parse_url(proto.url)
        if url.query or url.path not in self.paths:
            return None
        length = -1
        content_type = b""
        for name, value in proto.headers:
            if name == b"content-length":
                if length >= 0 or not value.isdigit():
                    return None
                length = int(value)
            elif name == b"transfer-encoding":
                return None
            elif name == b"content-type":
                content_type = value
        if not 0 <= length <= self.max_body or content_type[:19].lower() == b"multipart/form-data":
            return None
        return Exchange(self, proto, url.path.decode("ascii"), content_type.decode("latin-1"),
                        parser.should_keep_alive())


class Exchange:
    """One request on the direct path, from its complete head to its end."""

    __slots__ = ("body", "chunked", "client", "conn", "content_type", "direct", "first",
                 "head_sent", "held", "inst", "keep_alive", "last_read", "model", "over",
                 "path", "paused", "principal", "proto", "rid", "scope", "started", "status",
                 "stream", "tail", "ticket", "timer")

    def __init__(self, direct: DirectPath, proto: Any, path: str, content_type: str,
                 keep_alive: bool) -> None:
        self.direct = direct
        self.proto = proto
        self.path = path
        self.content_type = content_type
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.over = self.head_sent = self.paused = False
        self.conn: Conn | None = None
        self.timer: Any = None
        self.status = 0
        self.scope: Any = None  # the ASGI scope, should the ordinary path take it

    # -- deciding -------------------------------------------------------------------------
    def start(self) -> bool:
        """The body is complete: serve it here (True), or leave it to the ordinary path
        (False, with nothing done)."""
        d = self.direct
        rt = d.runtime
        body = self.body
        payload = body[0] if len(body) == 1 else b"".join(body)
        budget = d.budget
        if budget.held + len(payload) > budget.limit:
            return False
        try:
            parsed = bodies.parse(payload, self.content_type)
        except errors.GatewayError:
            return False
        state = rt.state
        route = state.table.resolve(parsed.model) if parsed.model is not None else None
        if route is None or state.timeouts.get(route.model) is not None:
            return False
        headers = self.proto.headers
        access = d.access
        principal = None
        level = access.classify(self.path)
        if not (level == auth.PUBLIC or (level == auth.API and access.open)):
            outcome = access.check(level, auth.presented_key(headers))
            if isinstance(outcome, errors.GatewayError):
                return False
            principal = outcome
        model = route.model
        try:
            auth.authorize(principal, model, state.aliases(model))
            if parsed.model not in route.served_names:
                payload = bodies.with_model(parsed, payload, route.upstream_model)
        except errors.GatewayError:
            return False
        scheduler = rt.scheduler
        inst = rt.balancer.pick(state.instances[model], exclude=())
        if scheduler is None or inst is None:
            return False
        client = rt.upstreams.client(inst.base_url)
        if not isinstance(client, H1Client) or not scheduler.can_admit_now(model):
            return False
        loop = self.proto.loop
        conn = client.take_idle(loop.time())
        if conn is None:
            return False
        # -- committed: from here on this exchange answers
        ticket = scheduler.admit_now(route)
        self.started = time.perf_counter()
        self.ticket, self.inst, self.client, self.conn = ticket, inst, client, conn
        self.model, self.principal = model, principal
        self.held = len(payload)
        budget.held += self.held  # given back once the upstream's head arrived
        inst.outstanding += 1
        self.rid = rid = request_id_of(headers)
        forwarded = [(k, v) for k, v in headers if k not in NOT_FORWARDED
                     and (access.open or k not in auth.CREDENTIAL_HEADERS)]
        forwarded.append((b"x-request-id", rid.encode()))
        request = client.build_request("POST", self.path, content=payload, headers=forwarded)
        conn.watcher = self._changed
        self.proto.splice = self  # the client connection's back-pressure reaches pause()
        assert conn.transport is not None
        conn.transport.write(request.head + request.content)
        read = client.timeout.read
        if read is not None:
            self.last_read = loop.time()
            self.timer = loop.call_at(self.last_read + read, self._check, read)
        return True

    # -- the upstream's answer ------------------------------------------------------------
    def _changed(self) -> None:
        """The upstream connection parsed a head or an end, or failed."""
        conn = self.conn
        if self.over or conn is None:
            return
        if not self.head_sent:
            if conn.error is not None and not conn.head:
                self._failed_before_head(conn.error)
                return
            if conn.head:
                self._head()
        if conn.error is not None:
            self._broken(conn.error)
        elif conn.complete and not conn.buf:  # else the sink is about to write the last part
            self._end(b"0\r\n\r\n" if self.chunked else b"")

    def _head(self) -> None:
        conn = self.conn
        assert conn is not None
        d = self.direct
        self.head_sent = True
        d.budget.held -= self.held
        self.held = 0
        if self.inst.failures:
            d.runtime.balancer.restore(self.inst)
        self.status = status = conn.status
        headers, self.stream = relay_headers(conn.headers, status, self.rid,
                                             d.runtime.settings.retry_after)
        self.chunked = status not in _NO_BODY and all(
            name != b"content-length" for name, _ in headers)
        self.first = self.stream
        self.tail = b"\n\n"
        self.proto.transport.write(answer_head(
            status, (*self.proto.server_state.default_headers, *headers), self.keep_alive,
            self.chunked))
        conn.sink = self._write

    def _write(self, data: bytes) -> None:
        """The upstream connection's sink: what arrived, to the client, as it is."""
        conn = self.conn
        if self.over or conn is None:
            return
        complete = conn.complete
        if self.chunked:
            out = b"%x\r\n%b\r\n%b" % (len(data), data, b"0\r\n\r\n" if complete else b"")
        else:
            out = data
        self.last_read = conn.loop.time()
        self.tail = data
        if complete:
            self._end(out)
        else:
            self.proto.transport.write(out)
        if self.first:
            self.first = False
            self.direct.runtime.metrics.first_chunk(self.model,
                                                    time.perf_counter() - self.started)

    def _check(self, read: float) -> None:
        """The read timer: the head, then each read, within `read` seconds of the last."""
        self.timer = None
        if self.over or self.conn is None:
            return
        loop = self.conn.loop
        due = self.last_read + read
        if loop.time() < due:
            self.timer = loop.call_at(due, self._check, read)
            return
        if self.head_sent:
            self._broken(httpx.ReadTimeout(f"no bytes from the model within {read:g} s"))
            return
        exc = httpx.ReadTimeout(f"no response head within {read:g} s")
        self._release(False)
        self.direct.runtime.metrics.upstream_error(self.model, type(exc).__name__)
        settings = self.direct.runtime.settings
        err = map_failure(exc, self.model, self.inst.base_url, settings).for_request(self.rid)
        self._answer(err)

    # -- endings --------------------------------------------------------------------------
    def _failed_before_head(self, exc: httpx.HTTPError) -> None:
        """No answer on this connection (the upstream had closed it, or sent no valid head):
        undone, and the ordinary path takes the request (with its failover)."""
        self.direct.runtime.metrics.upstream_error(self.model, type(exc).__name__)
        self._release(False)
        self.over = True
        self.proto.direct_fallback(self)

    def _broken(self, exc: httpx.HTTPError) -> None:
        """The upstream failed (or went silent) after the answer began."""
        self.direct.runtime.metrics.upstream_error(self.model, "broken_stream")
        if self.stream and self.chunked:
            event = broken_event(self.model, self.rid, exc, self.tail)
            self._end(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event), reusable=False)
            return
        log.error("request %s failed: upstream of model %r failed mid-response: %r",
                  self.rid, self.model, exc)
        self._end(b"", reusable=False, close=True)

    def client_lost(self) -> None:
        """The client connection closed: the upstream connection is closed too."""
        if self.over or self.conn is None:
            return
        self._release(False)
        self._meter(self.status if self.head_sent else 499)

    def _answer(self, err: errors.GatewayError) -> None:
        """An error in vLLM's shape, before any byte of an answer was sent."""
        response = err.response({"x-request-id": self.rid})
        self.head_sent = True
        self.status = err.status
        self._finish(answer_head(
            err.status, (*self.proto.server_state.default_headers, *response.raw_headers),
            self.keep_alive, chunked=False) + bytes(response.body))

    def _end(self, last: bytes, reusable: bool = True, close: bool = False) -> None:
        conn = self.conn
        assert conn is not None
        # (what is in `buf` now is what the sink was just given: the connection clears it)
        self._release(reusable and conn.complete and conn.keep_alive and conn.error is None)
        if close:
            self.keep_alive = False
        self._finish(last)

    def _finish(self, last: bytes) -> None:
        """The answer's last bytes written; metered; the client connection ready again."""
        proto = self.proto
        transport = proto.transport
        if last:
            transport.write(last)
        self._meter(self.status)
        if not self.keep_alive:
            transport.close()
        proto.direct_done(self)

    def _release(self, reusable: bool) -> None:
        """Give back what the request held: the upstream connection (closed unless
        `reusable`), the timer, the body's budget, the replica's count, the slot."""
        self.over = True
        conn = self.conn
        assert conn is not None
        conn.watcher = None
        conn.sink = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.paused and conn.transport is not None and reusable:
            conn.transport.resume_reading()
        self.client._release(conn, reusable)
        self.direct.budget.held -= self.held
        self.held = 0
        self.inst.outstanding -= 1
        self.ticket.release()
        if self.proto.splice is self:
            self.proto.splice = None

    def _meter(self, status: int) -> None:
        seconds = time.perf_counter() - self.started
        self.direct.runtime.metrics.request_done(self.model, status, seconds)
        if self.direct.runtime.settings.access_log:
            logs.access_line({
                "request_id": self.rid, "method": "POST", "path": self.path,
                "model": self.model, "status": status, "duration_ms": round(seconds * 1000, 1),
                "key": getattr(self.principal, "name", None)})

    # -- back-pressure (the client connection calls these) --------------------------------
    def pause(self) -> None:
        conn = self.conn
        if not self.paused and conn is not None and conn.transport is not None:
            self.paused = True
            conn.transport.pause_reading()

    def resume(self) -> None:
        conn = self.conn
        if self.paused and conn is not None and conn.transport is not None:
            self.paused = False
            conn.transport.resume_reading()


__all__ = ["DirectPath", "Exchange"]
