"""The request path: read the body, resolve the model, authorize, admit, dispatch (failover
across replicas, activation), relay the upstream's answer as it arrives, meter.

Routes: `by_body` for the model endpoints (`MODEL_ENDPOINTS`, the model named in the body,
or a multipart field), `by_prefix` for `/{model}/...` (a model endpoint, or one of the
read-only instance endpoints, which skip admission), and `infer` (`POST /v1/infer`, through
gateway/compat.py). All of them end in `send`, which meters each request once, when its
response has been sent (or it failed).

The routing state is read once the body is in (a reload landing while a body is read gives
404 for a model it removed); the request then uses that snapshot only. Admission is the
`Admitter`'s (gateway/ports.py): a slot, and the model awake. A failure before any response
byte moves to the next replica (ejecting the one that failed); when none is left the admitter
may revive the model once (activation through the fleet) and the replicas are tried again.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import auth, compat, errors, logs
from gateway import body as bodies
from gateway.balancer import Instance
from gateway.middleware import request_id
from gateway.ports import Admitter, Ticket
from gateway.relay import RelayResponse
from gateway.routing import Route
from gateway.runtime import Runtime
from gateway.splice import on_client_lost
from gateway.state import RoutingState
from gateway.upstream import map_failure

# Endpoints that carry a `model` in their body, routed by it (or by a /{model}/ prefix).
MODEL_ENDPOINTS: tuple[str, ...] = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/audio/transcriptions", "/v1/audio/translations",
    "/tokenize", "/detokenize",
    "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
)
# Read-only instance endpoints reachable only through a /{model}/ prefix.
INSTANCE_GET_ENDPOINTS: tuple[str, ...] = ("/health", "/v1/models", "/version", "/load")

_POST_ONLY = frozenset((*MODEL_ENDPOINTS, "/v1/infer"))
# Not passed on to the upstream (names as the server gives them: lower-case bytes); the
# request id is set anew.
NOT_FORWARDED = frozenset((b"connection", b"keep-alive", b"transfer-encoding", b"te",
                            b"trailer", b"upgrade", b"host", b"content-length",
                            b"proxy-connection", b"proxy-authorization", b"expect",
                            b"x-request-id"))
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class Proxy:
    """The model routes over one runtime; admission through `admitter`."""

    def __init__(self, runtime: Runtime, admitter: Admitter) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.metrics = runtime.metrics
        self.admitter = admitter
        self.budget = bodies.BodyBudget(self.settings.max_buffered_bytes,
                                        self.settings.retry_after)

    @property
    def state(self) -> RoutingState:
        return self.runtime.state

    # -- routes ---------------------------------------------------------------------------
    async def by_body(self, request: Request) -> Response:
        _state(request)["started"] = time.perf_counter()
        return await self._forward(request, request.scope["path"], prefix=None)

    async def by_prefix(self, request: Request) -> Response:
        _state(request)["started"] = time.perf_counter()
        requested = request.path_params["model"]
        path = "/" + request.path_params["rest"]
        known_path = path in MODEL_ENDPOINTS or path in INSTANCE_GET_ENDPOINTS
        state = self.runtime.state
        route = state.table.resolve(requested)
        if request.url.path in _POST_ONLY:  # e.g. GET /v1/chat/completions
            raise errors.method_not_allowed(request.method, request.url.path)
        if route is None:
            if not known_path or requested in ("v1", "v2"):
                raise errors.not_found(request.url.path)
            raise unknown_model(request, state, requested)
        if request.method == "POST" and path in MODEL_ENDPOINTS:
            return await self._forward(request, path, prefix=requested)
        if request.method == "GET" and path in INSTANCE_GET_ENDPOINTS:
            return await self.send(request, state, route, "GET", path, b"", admit=False)
        if known_path:
            raise errors.method_not_allowed(request.method, request.url.path)
        raise errors.not_found(request.url.path)

    async def infer(self, request: Request) -> Response:
        _state(request)["started"] = time.perf_counter()
        return await compat.infer(self, request)

    # -- the request path -----------------------------------------------------------------
    async def read_body(self, request: Request, hold: bodies.Hold | None = None) -> bytes:
        """The whole body: 413 past `max_body_bytes` (declared or read); 503 when the bytes
        all requests hold would pass `max_buffered_bytes` (`hold`, from `self.budget`, keeps
        this body's share until it is given back); 499 when the client leaves mid-upload."""
        return await bodies.read_body(request, self.settings.max_body_bytes, hold)

    async def _forward(self, request: Request, path: str, prefix: str | None) -> Response:
        """A model endpoint: the model from the body and/or the /{prefix}/ (they must agree);
        the body's `model` rewritten to what the upstream expects."""
        with self.budget.hold() as hold:  # the body's bytes count until it has been sent
            payload = await self.read_body(request, hold)
            state, route, payload = self._resolve(request, prefix, payload)
            return await self.send(request, state, route, request.method, path, payload)

    def _resolve(self, request: Request, prefix: str | None,
                 payload: bytes) -> tuple[RoutingState, Route, bytes]:
        """The routing state, the route and the body to send (its `model` rewritten when the
        upstream expects another name)."""
        parsed = bodies.parse(payload, request.headers.get("content-type", ""))
        state = self.runtime.state
        route = None
        if prefix is not None:
            route = state.table.resolve(prefix)
            if route is None:  # a reload removed it while the body was read
                raise unknown_model(request, state, prefix)
        if parsed.model is not None:
            by_body = state.table.resolve(parsed.model)
            if by_body is None:
                raise unknown_model(request, state, parsed.model)
            if route is None:
                route = by_body
            elif by_body is not route:
                raise errors.GatewayError(
                    400, f"The route names model `{route.model}` but the body names "
                         f"`{parsed.model}` (model `{by_body.model}`); make them agree or drop "
                         f"the body's `model`.", param="model")
        if route is None:
            raise errors.missing_model(state.table.names())
        if parsed.model is None or parsed.model not in route.served_names:
            payload = bodies.with_model(parsed, payload, route.upstream_model)
        return state, route, payload

    async def send(self, request: Request, state: RoutingState, route: Route, method: str,
                   path: str, payload: bytes, *, admit: bool = True) -> Response:
        """Authorize, admit (unless not `admit`: read-only instance endpoints), dispatch and
        meter `payload` to `route` of `state`."""
        rstate = _state(request)
        started: float = rstate.get("started") or time.perf_counter()
        rstate["metered"] = True
        model = route.model
        ticket: list[Ticket] = []  # the request's hold on its model (revive may renew it)
        watch: _Watch | None = None
        try:
            auth.authorize(rstate.get("principal"), model, state.aliases(model))
            if not admit:
                response = await self._dispatch(request, state, route, method, path, payload,
                                                None)
            else:
                # From here until the response starts, a client that goes away cancels the
                # wait (its queue place, the upstream request: vLLM aborts the generation).
                watch = _Watch(request.scope, request.receive)
                try:
                    ticket.append(await self.admitter.admit(state, route))
                    response = await self._dispatch(request, state, route, method, path,
                                                    payload, ticket)
                except BaseException:
                    if ticket:
                        ticket[0].release()
                    raise
                finally:
                    watch.stop()
        except asyncio.CancelledError:
            if watch is None or not watch.gone():
                raise
            self._finished(request, model, 499, started)  # abandoned, not an error
            raise errors.client_gone(model) from None
        except errors.GatewayError as exc:
            self._finished(request, model, exc.status, started)
            raise
        except Exception:
            self._finished(request, model, 500, started)
            raise
        release = ticket[0].release if ticket else None
        response.dones.append(functools.partial(  # after the replica's own (outstanding - 1)
            self._response_sent, request, model, response.status_code, started, release))
        return response

    async def _dispatch(self, request: Request, state: RoutingState, route: Route, method: str,
                        path: str, payload: bytes, revive: list[Ticket] | None) -> _Finally:
        """Send to the best replica; on a failure before any response byte, try the next
        replica, then (with the request's ticket in `revive`) let the admitter revive the
        model once."""
        rid = _state(request)["request_id"]
        headers = [(k, v) for k, v in request.scope["headers"] if k not in NOT_FORWARDED]
        headers.append((b"x-request-id", rid.encode()))
        params = request.scope.get("query_string", b"").decode() or None  # as Starlette's URL
        timeout = state.timeouts.get(route.model)
        extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        replicas = state.instances[route.model]
        balancer = self.runtime.balancer
        tried: list[Instance] = []
        failure: errors.GatewayError | None = None
        revived = False
        while True:
            inst = balancer.pick(replicas, exclude=tried)
            if inst is None:
                if revive and not revived:
                    renewed = await self.admitter.revive(route, revive[0])
                    if renewed is not None:
                        revive[0] = renewed
                        revived, tried = True, []
                        continue
                assert failure is not None
                raise failure
            client = self.runtime.upstreams.client(inst.base_url)
            upstream_request = client.build_request(method, path, content=payload,
                                                    headers=headers, params=params, **extra)
            inst.outstanding += 1
            try:
                upstream = await client.send(upstream_request, stream=True)
            except httpx.HTTPError as exc:
                inst.outstanding -= 1
                self.metrics.upstream_error(route.model, type(exc).__name__)
                failure = map_failure(exc, route.model, inst.base_url, self.settings, timeout)
                if not isinstance(exc, _RETRYABLE):
                    raise failure from None
                balancer.eject(inst, failure.message)
                tried.append(inst)
                continue
            except BaseException:
                inst.outstanding -= 1
                raise
            if inst.failures:
                balancer.restore(inst)
            relay = RelayResponse(upstream, route.model, rid, self.settings.retry_after)
            relay.on_broken = functools.partial(self.metrics.upstream_error, route.model,
                                                "broken_stream")
            started = _state(request).get("started")
            if relay.is_event_stream and started is not None:  # time to first token
                relay.on_first_chunk = functools.partial(self._first_chunk, route.model, started)
            return _Finally(relay, functools.partial(_decrement, inst))

    # -- metering -------------------------------------------------------------------------
    def _response_sent(self, request: Request, model: str, status: int, started: float,
                       release: Callable[[], None] | None) -> None:
        if release is not None:
            release()
        self._finished(request, model, status, started)

    def _finished(self, request: Request, model: str, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.request_done(model, status, seconds)
        if self.settings.access_log:
            logs.access_line({
                "request_id": request_id(request), "method": request.method,
                "path": request.url.path, "model": model, "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "key": getattr(_state(request).get("principal"), "name", None)})

    def _first_chunk(self, model: str, started: float) -> None:
        self.metrics.first_chunk(model, time.perf_counter() - started)


def unknown_model(request: Request, state: RoutingState, requested: str) -> errors.GatewayError:
    """404 for `requested`, listing only the names the caller's key may use."""
    principal = _state(request).get("principal")
    return errors.unknown_model(requested, auth.visible_names(principal, state.registry))


def _state(request: Request) -> dict[str, Any]:
    """The request's state as the dict under `request.state` (read directly: Starlette's
    `State` costs a method call per attribute and two exceptions per missing one)."""
    return request.scope.setdefault("state", {})  # type: ignore[no-any-return]


def _decrement(inst: Instance) -> None:
    inst.outstanding -= 1


class _Finally(Response):
    """Runs `dones`, in order, once the wrapped response has been sent (or the client went
    away). One wrapper with a list rather than one per callback: each wrapper is a coroutine
    level that the relay's every suspension passes through."""

    def __init__(self, inner: Response, done: Callable[[], None]) -> None:
        self.inner = inner
        self.dones = [done]
        self.status_code = inner.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            for done in self.dones:
                done()


class _Watch:
    """Watches the client while a request waits (queue, activation, upstream headers): a
    disconnect cancels the waiting task. One task; stopped before the response starts (the
    relay watches from there on)."""

    __slots__ = ("_gone", "_waiter", "stop")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._gone = False
        waiter = asyncio.current_task()
        assert waiter is not None
        self._waiter = waiter
        stop: Callable[[], object] | None = on_client_lost(scope, receive, self._lost)
        if stop is None:  # not the gateway's server: a task watches `receive`
            stop = asyncio.get_running_loop().create_task(self._watch(receive)).cancel
        self.stop = stop

    def _lost(self) -> None:
        self._gone = True
        self._waiter.cancel()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._lost()
                return

    def gone(self) -> bool:
        """The client left (and the cancellation was this watch's): uncancel the task."""
        if not self._gone:
            return False
        task = asyncio.current_task()
        return task is None or task.uncancel() == 0
