"""The gateway's ASGI application: `create_app(registry, settings)`.

Request path: find the model (body field, multipart field or /{model}/ prefix) -> resolve
name or alias -> the instance's pooled client -> relay the upstream response as it arrives.
Every failure the gateway itself answers goes through `gateway.errors` (vLLM's error shape).

Around it (one module each): access keys and the per-model allow-list (`gateway.auth`, a
middleware plus one check once the model is known), Prometheus metrics (`gateway.metrics`,
O(1) per request), access lines (`gateway.logs`), the admin endpoints (`gateway.admin`),
hot reload of the registry (`gateway.reload`), and `POST /v1/infer` (`gateway.compat`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Protocol

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send

from fleet.registry import Registry, load_registry_from_env
from gateway import auth, compat, logs
from gateway import body as bodies
from gateway import errors
from gateway.admin import Admin
from gateway.activation import Activator, FleetPort, idle_loop
from gateway.autoscale import Autoscaler
from gateway.balancer import Balancer, Instance
from gateway.limits import Admission
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import GatewayMetrics, MeteredFleet
from gateway.relay import RelayResponse
from gateway.reload import Reloader
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
    """Builds the fleet client, given the gateway's busy(model) and last_used(model).

    A factory may also have `for_registry(registry) -> FleetFactory` (the CLI's does): a
    registry reload then rebuilds the fleet client for the new registry. Without it the fleet
    client built at start is kept across reloads.
    """

    def __call__(self, busy: Callable[[str], bool],
                 last_used: Callable[[str], float]) -> FleetPort: ...


_POST_ONLY = frozenset((*MODEL_ENDPOINTS, "/v1/infer"))

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "content-length", "proxy-connection", "proxy-authorization", "expect"}


class Gateway:
    """Request handlers over one routing table, its replicas, limits and upstream clients."""

    def __init__(self, registry: Registry, settings: GatewaySettings,
                 transport_factory: TransportFactory | None = None,
                 fleet_factory: FleetFactory | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 access: auth.Access | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.access = access or auth.Access(auth.KeyRing(), auth.KeyRing())
        self.metrics = GatewayMetrics(self)
        self.reloader: Reloader | None = None
        self.reload_on_sighup = False
        self.upstreams = Upstreams(settings, transport_factory)
        self.balancer = Balancer(clock)
        self.started = int(time.time())
        self.instances: dict[str, list[Instance]] = {}
        self.admission: dict[str, Admission] = {}
        self.timeouts: dict[str, httpx.Timeout | None] = {}
        self.ttl: dict[str, float] = {}
        self.apply(registry)
        self.activator: Activator | None = None
        self.fleet_factory = fleet_factory
        self._tasks: list[asyncio.Task[None]] = []
        self._idle_task: asyncio.Task[None] | None = None
        self.autoscaler: Autoscaler | None = None
        self._sleep_seen: dict[str, tuple[float, bool]] = {}  # model -> (checked at, asleep)
        self.open_fleet(registry)

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
        autoscaler = getattr(self, "autoscaler", None)
        if autoscaler is not None:
            autoscaler.set_models(registry.models)

    def open_fleet(self, registry: Registry, *, reload: bool = False) -> None:
        """Build (or, on reload, rebuild for `registry`) the fleet client activations use.

        Only once the registry has a managed model: a registry of remote servers never
        touches the fleet. The client is wrapped to meter activations, evictions and sleeps.
        """
        factory = self.fleet_factory
        if factory is None or not self.settings.activation:
            return
        if reload:
            rebuild = getattr(factory, "for_registry", None)
            if rebuild is not None:
                factory = self.fleet_factory = rebuild(registry)
            elif self.activator is not None:
                return  # a factory bound to its registry: keep its client
        if self.activator is None and not any(m.managed for m in registry.models.values()):
            return
        fleet = MeteredFleet(factory(self.busy, self.last_used), self.metrics)
        if self.activator is None:
            self.activator = Activator(fleet, timeout=self.settings.activation_timeout,
                                       retry_after=self.settings.retry_after)
            if self._tasks:  # serving already (a reload added the first managed model)
                self._start_idle_loop()
        else:
            self.activator.fleet = fleet

    def asleep(self) -> set[str]:
        """Models the gateway put to sleep (idle ttl, admin)."""
        return self.activator.asleep if self.activator is not None else set()

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
        self._start_idle_loop()
        self._start_autoscaler()
        sighup = self.reload_on_sighup and self.reloader is not None
        if sighup:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            yield
        finally:
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks, self._idle_task = [], None
            await self.upstreams.aclose()

    def _start_idle_loop(self) -> None:
        """Idle ttl: one loop over the current registry's ttl (reloads included)."""
        if self.activator is None or self._idle_task is not None:
            return
        self._idle_task = asyncio.get_running_loop().create_task(idle_loop(
            self.activator, _CurrentTtl(self), self.idle_for,  # type: ignore[arg-type]
            self.settings.idle_check_interval))
        self._tasks.append(self._idle_task)

    def _start_autoscaler(self) -> None:
        """Replica autoscaling, when a fleet is configured and a model is autoscaled."""
        if self.activator is None or self.autoscaler is not None:
            return
        models = self.table.registry.models
        if not any(m.autoscaled and m.managed for m in models.values()):
            return
        self.autoscaler = Autoscaler(
            self.activator.fleet, models, self.load, lambda m: self.instances.get(m, []),
            clock=self.clock, scale_timeout=self.settings.activation_timeout)
        self._tasks.append(asyncio.get_running_loop().create_task(
            self.autoscaler.run(self.settings.autoscale_interval)))

    def load(self, model: str) -> float:
        """In-flight plus queued requests of `model` (what autoscaling samples)."""
        adm = self.admission.get(model)
        return float(adm.in_flight + adm.waiting) if adm is not None else 0.0

    def _on_sighup(self) -> None:
        assert self.reloader is not None
        log.info("SIGHUP: reloading the registry")
        self._tasks.append(asyncio.get_running_loop().create_task(
            self.reloader.reload_quietly()))

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

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    async def infer(self, request: Request) -> Response:
        request.state.started = time.perf_counter()
        return await compat.infer(self, request)

    async def list_models(self, request: Request) -> Response:
        principal = getattr(request.state, "principal", None)
        table, admission = self.table, self.admission  # a reload may swap them meanwhile
        routes = [r for r in table.routes.values()
                  if principal is None or principal.may_use(r.model, self._aliases(r.model))]
        states = await asyncio.gather(*(self._probe(r) for r in routes))
        data = [self._model_card(r, s, table, admission)
                for r, s in zip(routes, states, strict=True)]
        return _json(request, {"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        requested = request.path_params["model_id"]
        table, admission = self.table, self.admission  # a reload may swap them meanwhile
        route = table.resolve(requested)
        if route is None:
            raise errors.unknown_model(requested, table.names())
        auth.authorize(getattr(request.state, "principal", None), route.model,
                       self._aliases(route.model))
        return _json(request, self._model_card(route, await self._probe(route), table,
                                               admission))

    async def by_body(self, request: Request) -> Response:
        request.state.started = time.perf_counter()
        return await self._forward(request, request.url.path, prefix_route=None)

    async def by_prefix(self, request: Request) -> Response:
        request.state.started = time.perf_counter()
        requested = request.path_params["model"]
        path = "/" + request.path_params["rest"]
        known_path = path in MODEL_ENDPOINTS or path in INSTANCE_GET_ENDPOINTS
        route = self.table.resolve(requested)
        if request.url.path in _POST_ONLY:  # e.g. GET /v1/chat/completions
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
        """Check the key's allow-list, take a slot, dispatch; meter the request once, when
        its response has been sent (or it failed)."""
        state = request.state
        started: float = getattr(state, "started", None) or time.perf_counter()
        state.metered = True
        model = route.model
        release: Callable[[], None] | None = None
        try:
            auth.authorize(getattr(state, "principal", None), model, self._aliases(model))
            if not admit:
                response = await self._dispatch(request, route, method, path, payload,
                                                activate=False)
            else:
                admission = self.admission.get(model)
                if admission is None:  # a reload removed the model while the body was read
                    raise errors.unknown_model(model, self.table.names())
                await admission.acquire()
                try:
                    response = await self._dispatch(request, route, method, path, payload)
                except BaseException:
                    admission.release()
                    raise
                release = admission.release
        except errors.GatewayError as exc:
            self._finished(request, model, exc.status, started)
            raise
        except Exception:
            self._finished(request, model, 500, started)
            raise
        return _Finally(response, functools.partial(
            self._response_sent, request, model, response.status_code, started, release))

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
                "request_id": _request_id(request), "method": request.method,
                "path": request.url.path, "model": model, "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "key": getattr(getattr(request.state, "principal", None), "name", None)})

    def _first_chunk(self, model: str, started: float) -> None:
        self.metrics.first_chunk(model, time.perf_counter() - started)

    def _aliases(self, model: str) -> tuple[str, ...]:
        spec = self.table.registry.models.get(model)
        return spec.aliases if spec is not None else ()

    def rejected(self, scope: Scope, status: int) -> None:
        """A request answered before it reached a model (401, 400, 404...): metered, logged."""
        state = scope.get("state", {})
        if state.get("metered"):
            return
        state["metered"] = True
        self.metrics.rejected_request(status)
        if self.settings.access_log:
            logs.access_line({"request_id": state.get("request_id", "-"),
                              "method": scope.get("method"), "path": scope.get("path"),
                              "model": None, "status": status})

    def logged(self, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """`handler` (a route answering small JSON) with an access line, when they are on."""
        if not self.settings.access_log:
            return handler

        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            started = time.perf_counter()
            response: Response = await handler(request)
            request.state.metered = True
            logs.access_line({"request_id": _request_id(request), "method": request.method,
                              "path": request.url.path, "model": None,
                              "status": response.status_code,
                              "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
            return response

        return wrapper

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
        if can_activate and (route.model in self.activator.asleep  # type: ignore[union-attr]
                             or await self._engine_asleep(route)):
            await self.activator.activate(route.model)  # type: ignore[union-attr]
            self._sleep_seen[route.model] = (self.clock(), False)
        replicas = self.instances.get(route.model)
        if replicas is None:  # a reload removed the model while this request waited
            raise errors.unknown_model(route.model, self.table.names())
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
                self.metrics.upstream_error(route.model, type(exc).__name__)
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
            relay.on_broken = functools.partial(self.metrics.upstream_error, route.model,
                                                "broken_stream")
            started = getattr(request.state, "started", None)
            if relay.is_event_stream and started is not None:  # time to first token
                relay.on_first_chunk = functools.partial(self._first_chunk, route.model, started)
            return _Finally(relay, functools.partial(_decrement, inst))

    async def _engine_asleep(self, route: Route) -> bool:
        """Whether a sleep-mode model's engine sleeps (put to sleep by `fleet switch`, say):
        vLLM would hold the request until woken, so the gateway wakes it first. Asked of
        the first replica's /is_sleeping at most once a second per model."""
        spec = self.table.registry.models.get(route.model)
        if spec is None or not spec.sleep_mode:
            return False
        checked, asleep = self._sleep_seen.get(route.model, (float("-inf"), False))
        now = self.clock()
        if now - checked < self.settings.sleep_check_interval:
            return asleep
        client = self.upstreams.client(route.replicas[0])
        request = client.build_request("GET", "/is_sleeping",
                                       timeout=httpx.Timeout(self.settings.health_timeout))
        try:
            resp = await client.send(request, stream=True)
            try:
                body = await resp.aread()
            finally:
                await resp.aclose()
            asleep = resp.status_code == 200 and json.loads(body).get("is_sleeping") is True
        except (httpx.HTTPError, ValueError, AttributeError):
            asleep = False  # not answering: the request path finds out and reacts
        self._sleep_seen[route.model] = (now, asleep)
        return asleep

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

    def _model_card(self, route: Route, state: str, table: RoutingTable,
                    admission: Mapping[str, Admission]) -> dict[str, Any]:
        spec = table.registry.models[route.model]
        adm = admission[route.model]
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


class _CurrentTtl(Mapping[str, float]):
    """The idle loop's view of the ttl of the registry in force (it changes on reload)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def __getitem__(self, model: str) -> float:
        return self._gateway.ttl[model]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._gateway.ttl))

    def __len__(self) -> int:
        return len(self._gateway.ttl)

    def items(self) -> list[tuple[str, float]]:  # type: ignore[override]
        return list(self._gateway.ttl.items())


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
               fleet_factory: FleetFactory | None = None,
               registry_loader: Callable[[], Registry] | None = None,
               reload_on_sighup: bool = False) -> Starlette:
    """Build the gateway for `registry`.

    `transport_factory(base_url)` swaps the upstream transport (tests); `fleet_factory`
    gives on-demand activation and idle ttl (None: requests for a stopped model get 502).
    `registry_loader()` reads the registry again on reload (default: `settings.registry`,
    else FLEET_REGISTRY_JSON > FLEET_REGISTRY > MODEL_ID > ./models.toml); with
    `reload_on_sighup` (the CLI), SIGHUP reloads too. Raises `auth.AccessConfigError` when a
    key setting is unusable.
    """
    settings = settings or GatewaySettings()
    access = auth.load_access(settings)
    warning = auth.exposure_warning(settings, access)
    if warning:
        log.warning(warning)
    gw = Gateway(registry, settings, transport_factory, fleet_factory, access=access)
    gw.reloader = Reloader(gw, registry_loader or functools.partial(
        load_registry_from_env, settings.registry))
    gw.reload_on_sighup = reload_on_sighup
    plain = gw.logged
    routes = [
        StarletteRoute("/health", plain(gw.health), methods=["GET"]),
        StarletteRoute("/metrics", plain(gw.metrics_endpoint), methods=["GET"]),
        StarletteRoute("/v1/models", plain(gw.list_models), methods=["GET"]),
        StarletteRoute("/v1/models/{model_id:path}", plain(gw.get_model), methods=["GET"]),
        StarletteRoute("/v1/infer", gw.infer, methods=["POST"]),
        *Admin(gw).routes(wrap=plain),
        *(StarletteRoute(p, gw.by_body, methods=["POST"]) for p in MODEL_ENDPOINTS),
        StarletteRoute("/{model}/{rest:path}", gw.by_prefix, methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan, exception_handlers={
        errors.GatewayError: _gateway_error,
        HTTPException: _http_error,
        Exception: _unexpected_error,
    })
    app.router.redirect_slashes = False  # a redirect would expose routes to path tricks
    # Outermost last: CORS (answers preflights, decorates every answer) > request id > keys.
    app.add_middleware(auth.AccessMiddleware, access=access, on_reject=gw.rejected)
    app.add_middleware(_RequestIdMiddleware)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    app.state.gateway = gw
    return app


def _rejected(request: Request, status: int) -> None:
    gw = getattr(request.app.state, "gateway", None)
    if gw is not None:
        gw.rejected(request.scope, status)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.GatewayError)
    _rejected(request, exc.status)
    request_id = _request_id(request)
    return exc.for_request(request_id).response({"x-request-id": request_id})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err = errors.not_found(request.url.path)
    elif exc.status_code == 405:
        err = errors.method_not_allowed(request.method, request.url.path)
    else:
        err = errors.GatewayError(exc.status_code, str(exc.detail))
    _rejected(request, err.status)
    return err.response({"x-request-id": _request_id(request)})


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    request_id = _request_id(request)
    log.error("request %s failed: %r", request_id, exc, exc_info=exc)
    _rejected(request, 500)
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
                    if 0 < len(candidate) <= 128 and candidate.isascii() \
                            and candidate.isprintable():  # echoed unchanged on every path
                        request_id = candidate
                    break
            scope.setdefault("state", {})["request_id"] = request_id or uuid.uuid4().hex
        await self.app(scope, receive, send)
