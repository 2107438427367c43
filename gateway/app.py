"""The gateway's ASGI application: `create_app(registry, settings)`.

Request path: find the model (body field, multipart field or /{model}/ prefix) -> resolve
name or alias -> the instance's pooled client -> relay the upstream response as it arrives.
Every failure the gateway itself answers goes through `gateway.errors` (vLLM's error shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send

from fleet.registry import Registry
from gateway import body as bodies
from gateway import errors
from gateway.activation import Activator, FleetPort, idle_loop
from gateway.balancer import Balancer, Instance
from gateway.limits import Admission
from gateway.relay import RelayResponse
from gateway.routing import Route, RoutingTable
from gateway.settings import GatewaySettings
from gateway.upstream import TransportFactory, Upstreams, map_failure

log = logging.getLogger("gateway")

# Endpoints that carry a `model` in their body, routed by it (or by a /{model}/ prefix).
MODEL_ENDPOINTS: tuple[str, ...] = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/audio/transcriptions", "/v1/audio/translations",
    "/tokenize", "/detokenize",
    "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
)
# Read-only instance endpoints reachable only through a /{model}/ prefix.
INSTANCE_GET_ENDPOINTS: tuple[str, ...] = ("/health", "/v1/models", "/version", "/load")

class FleetFactory(Protocol):
    """Builds the fleet client, given the gateway's busy(model) and last_used(model)."""

    def __call__(self, busy: Callable[[str], bool],
                 last_used: Callable[[str], float]) -> FleetPort: ...


_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "content-length", "proxy-connection", "proxy-authorization", "expect"}


class Gateway:
    """Request handlers over one routing table, its replicas, limits and upstream clients."""

    def __init__(self, registry: Registry, settings: GatewaySettings,
                 transport_factory: TransportFactory | None = None,
                 fleet_factory: FleetFactory | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.upstreams = Upstreams(settings, transport_factory)
        self.balancer = Balancer(clock)
        self.started = int(time.time())
        self.instances: dict[str, list[Instance]] = {}
        self.admission: dict[str, Admission] = {}
        self.timeouts: dict[str, httpx.Timeout | None] = {}
        self.ttl: dict[str, float] = {}
        self.apply(registry)
        self.activator: Activator | None = None
        if fleet_factory is not None and settings.activation:
            fleet = fleet_factory(self.busy, self.last_used)
            self.activator = Activator(fleet, timeout=settings.activation_timeout,
                                       retry_after=settings.retry_after)
        self._tasks: list[asyncio.Task[None]] = []

    def apply(self, registry: Registry) -> None:
        """Route by `registry` from now on; replicas and counters of kept models carry over."""
        table = RoutingTable(registry, self.settings.upstream_host)
        instances: dict[str, list[Instance]] = {}
        admission: dict[str, Admission] = {}
        timeouts: dict[str, httpx.Timeout | None] = {}
        for name, route in table.routes.items():
            spec = registry.models[name]
            old = {i.base_url: i for i in self.instances.get(name, [])}
            instances[name] = [old.get(url) or Instance(name, idx, url)
                               for idx, url in enumerate(route.replicas)]
            adm = self.admission.get(name) or Admission(name, None, 0, 1.0, self.clock)
            adm.max_concurrency, adm.max_queue = spec.max_concurrency, spec.max_queue
            adm.queue_timeout = spec.queue_timeout
            admission[name] = adm
            timeouts[name] = None
            if spec.connect_timeout or spec.read_timeout:
                base = self.upstreams.timeout
                timeouts[name] = httpx.Timeout(connect=spec.connect_timeout or base.connect,
                                               read=spec.read_timeout or base.read,
                                               write=base.write, pool=base.pool)
        self.upstreams.open(table.base_urls())
        self.table, self.instances, self.admission, self.timeouts = (
            table, instances, admission, timeouts)
        self.ttl = {n: m.ttl for n, m in registry.models.items() if m.ttl and m.managed}

    # -- figures the fleet and the idle loop read (from worker threads too) ----------------
    def busy(self, model: str) -> bool:
        adm = self.admission.get(model)
        return adm is not None and (adm.in_flight > 0 or adm.waiting > 0)

    def last_used(self, model: str) -> float:
        adm = self.admission.get(model)
        return adm.last_used if adm is not None else 0.0

    def idle_for(self, model: str) -> float | None:
        adm = self.admission.get(model)
        if adm is None or adm.in_flight or adm.waiting:
            return None
        return self.clock() - adm.last_used

    # -- lifecycle ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._probe_loop())]
        if self.activator is not None and self.ttl:
            self._tasks.append(loop.create_task(idle_loop(
                self.activator, self.ttl, self.idle_for, self.settings.idle_check_interval)))
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.upstreams.aclose()

    async def _probe_loop(self) -> None:
        """Bring ejected replicas back once their /health answers 200."""
        while True:
            await asyncio.sleep(self.settings.probe_interval)
            for replicas in list(self.instances.values()):
                for inst in replicas:
                    if inst.failures and await self._healthy(inst.base_url):
                        self.balancer.restore(inst)

    # -- handlers -------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return _json(request, {"status": "ok", "models": len(self.table.routes)})

    async def list_models(self, request: Request) -> Response:
        routes = list(self.table.routes.values())
        states = await asyncio.gather(*(self._probe(r) for r in routes))
        data = [self._model_card(r, s) for r, s in zip(routes, states, strict=True)]
        return _json(request, {"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        requested = request.path_params["model_id"]
        route = self.table.resolve(requested)
        if route is None:
            raise errors.unknown_model(requested, self.table.names())
        return _json(request, self._model_card(route, await self._probe(route)))

    async def by_body(self, request: Request) -> Response:
        return await self._forward(request, request.url.path, prefix_route=None)

    async def by_prefix(self, request: Request) -> Response:
        requested = request.path_params["model"]
        path = "/" + request.path_params["rest"]
        known_path = path in MODEL_ENDPOINTS or path in INSTANCE_GET_ENDPOINTS
        route = self.table.resolve(requested)
        if request.url.path in MODEL_ENDPOINTS:  # e.g. GET /v1/chat/completions
            raise errors.method_not_allowed(request.method, request.url.path)
        if route is None:
            if not known_path or requested in ("v1", "v2"):
                raise errors.not_found(request.url.path)
            raise errors.unknown_model(requested, self.table.names())
        if request.method == "POST" and path in MODEL_ENDPOINTS:
            return await self._forward(request, path, prefix_route=route)
        if request.method == "GET" and path in INSTANCE_GET_ENDPOINTS:
            return await self._send(request, route, "GET", path, b"", admit=False)
        if known_path:
            raise errors.method_not_allowed(request.method, request.url.path)
        raise errors.not_found(request.url.path)

    # -- the request path -----------------------------------------------------------------
    async def _forward(self, request: Request, path: str, prefix_route: Route | None) -> Response:
        payload = await self._read_body(request)
        parsed = bodies.parse(payload, request.headers.get("content-type", ""))
        route = prefix_route
        if parsed.model is not None:
            by_body = self.table.resolve(parsed.model)
            if by_body is None:
                raise errors.unknown_model(parsed.model, self.table.names())
            if route is None:
                route = by_body
            elif by_body is not route:
                raise errors.GatewayError(
                    400, f"The route names model `{route.model}` but the body names "
                         f"`{parsed.model}` (model `{by_body.model}`); make them agree or drop "
                         f"the body's `model`.", param="model")
        if route is None:
            raise errors.missing_model(self.table.names())
        if parsed.model is None or parsed.model not in route.served_names:
            payload = bodies.with_model(parsed, payload, route.upstream_model)
        return await self._send(request, route, request.method, path, payload)

    async def _send(self, request: Request, route: Route, method: str, path: str,
                    payload: bytes, *, admit: bool = True) -> Response:
        admission = self.admission[route.model]
        if not admit:
            return await self._dispatch(request, route, method, path, payload, activate=False)
        await admission.acquire()
        try:
            response = await self._dispatch(request, route, method, path, payload)
        except BaseException:
            admission.release()
            raise
        return _Finally(response, admission.release)

    async def _dispatch(self, request: Request, route: Route, method: str, path: str,
                        payload: bytes, *, activate: bool = True) -> Response:
        """Send to the best replica; on a failure before any response byte, try the next
        replica, then (managed models) activate the model through the fleet once."""
        request_id = request.state.request_id
        headers = [(k, v) for k, v in request.headers.raw
                   if k.decode("latin-1") not in _HOP and k != b"x-request-id"]
        headers.append((b"x-request-id", request_id.encode()))
        params = request.url.query or None
        timeout = self.timeouts.get(route.model)
        extra = {"timeout": timeout} if timeout is not None else {}
        can_activate = activate and self.activator is not None and route.managed
        if can_activate and route.model in self.activator.asleep:  # type: ignore[union-attr]
            await self.activator.activate(route.model)  # type: ignore[union-attr]
        replicas = self.instances[route.model]
        tried: list[Instance] = []
        failure: errors.GatewayError | None = None
        activated = False
        while True:
            inst = self.balancer.pick(replicas, exclude=tried)
            if inst is None:
                if can_activate and not activated:
                    await self.activator.activate(route.model)  # type: ignore[union-attr]
                    activated, tried = True, []
                    continue
                assert failure is not None
                raise failure
            client = self.upstreams.client(inst.base_url)
            upstream_request = client.build_request(method, path, content=payload,
                                                    headers=headers, params=params, **extra)
            inst.outstanding += 1
            try:
                upstream = await client.send(upstream_request, stream=True)
            except httpx.HTTPError as exc:
                inst.outstanding -= 1
                failure = map_failure(exc, route.model, inst.base_url, self.settings)
                if not isinstance(exc, _RETRYABLE):
                    raise failure from None
                self.balancer.eject(inst, failure.message)
                tried.append(inst)
                continue
            except BaseException:
                inst.outstanding -= 1
                raise
            if inst.failures:
                self.balancer.restore(inst)
            relay = RelayResponse(upstream, route.model, request_id, self.settings.retry_after)
            return _Finally(relay, functools.partial(_decrement, inst))

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise errors.body_too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    # -- listings -------------------------------------------------------------------------
    async def _healthy(self, base_url: str) -> bool:
        client = self.upstreams.client(base_url)
        try:
            resp = await client.get("/health", timeout=self.settings.health_timeout)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _probe(self, route: Route) -> str:
        """`ready` (a replica's /health is 200), `unhealthy` (answers, not 200), `unreachable`."""
        results = []
        for url in route.replicas:
            client = self.upstreams.client(url)
            try:
                resp = await client.get("/health", timeout=self.settings.health_timeout)
            except httpx.HTTPError:
                results.append("unreachable")
                continue
            if resp.status_code == 200:
                return "ready"
            results.append("unhealthy")
        return "unhealthy" if "unhealthy" in results else "unreachable"

    def _model_card(self, route: Route, state: str) -> dict[str, Any]:
        spec = self.table.registry.models[route.model]
        adm = self.admission[route.model]
        return {
            "id": route.model,
            "object": "model",
            "created": self.started,
            "owned_by": "vllm-fleet",
            "root": spec.source or spec.served_model_name or route.model,
            "parent": None,
            "max_model_len": spec.max_model_len,
            "aliases": list(spec.aliases),
            "description": spec.description,
            "tags": list(spec.tags),
            "managed": spec.managed,
            "replicas": len(route.replicas),
            "state": state,
            "in_flight": adm.in_flight,
            "queued": adm.waiting,
        }


_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def _decrement(inst: Instance) -> None:
    inst.outstanding -= 1


class _Finally(Response):
    """Runs `done` once the wrapped response has been sent (or the client went away)."""

    def __init__(self, inner: Response, done: Callable[[], None]) -> None:
        self.inner = inner
        self.done = done
        self.status_code = inner.status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.done()


# -- app factory ------------------------------------------------------------------------------


def create_app(registry: Registry, settings: GatewaySettings | None = None, *,
               transport_factory: TransportFactory | None = None,
               fleet_factory: FleetFactory | None = None) -> Starlette:
    """Build the gateway for `registry`.

    `transport_factory(base_url)` swaps the upstream transport (tests); `fleet_factory`
    gives on-demand activation and idle ttl (None: requests for a stopped model get 502).
    """
    settings = settings or GatewaySettings()
    gw = Gateway(registry, settings, transport_factory, fleet_factory)
    routes = [
        StarletteRoute("/health", gw.health, methods=["GET"]),
        StarletteRoute("/v1/models", gw.list_models, methods=["GET"]),
        StarletteRoute("/v1/models/{model_id:path}", gw.get_model, methods=["GET"]),
        *(StarletteRoute(p, gw.by_body, methods=["POST"]) for p in MODEL_ENDPOINTS),
        StarletteRoute("/{model}/{rest:path}", gw.by_prefix, methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan, exception_handlers={
        errors.GatewayError: _gateway_error,
        HTTPException: _http_error,
        Exception: _unexpected_error,
    })
    app.router.redirect_slashes = False  # a redirect would expose routes to path tricks
    app.add_middleware(_RequestIdMiddleware)
    app.state.gateway = gw
    return app


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.GatewayError)
    return exc.response({"x-request-id": _request_id(request)})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err = errors.not_found(request.url.path)
    elif exc.status_code == 405:
        err = errors.method_not_allowed(request.method, request.url.path)
    else:
        err = errors.GatewayError(exc.status_code, str(exc.detail))
    return err.response({"x-request-id": _request_id(request)})


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    request_id = _request_id(request)
    log.error("request %s failed: %r", request_id, exc, exc_info=exc)
    return errors.internal_error(request_id).response({"x-request-id": request_id})


def _json(request: Request, content: Any) -> Response:
    return JSONResponse(content, headers={"x-request-id": _request_id(request)})


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "-"


class _RequestIdMiddleware:
    """Keeps the client's X-Request-Id (or makes one) and puts it in `request.state`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            request_id = None
            for key, value in scope["headers"]:
                if key == b"x-request-id":
                    candidate = value.decode("latin-1")
                    if 0 < len(candidate) <= 128 and candidate.isprintable():
                        request_id = candidate
                    break
            scope.setdefault("state", {})["request_id"] = request_id or uuid.uuid4().hex
        await self.app(scope, receive, send)
