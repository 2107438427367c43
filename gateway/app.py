"""The gateway's ASGI application: `create_app(registry, settings)` wires the parts.

- `gateway.runtime`: what the parts share (settings, the routing state of `gateway.state`,
  upstream clients, balancer, metrics, the fleet activator);
- `gateway.proxy`: the model routes (read, resolve, authorize, admit through
  `gateway.admit`, failover, relay, meter) and `POST /v1/infer` (`gateway.compat`);
- `gateway.direct`: the common model request served in the server's own callbacks (under the
  CLI's server, `gateway.server_direct`), handing anything else to `gateway.proxy`;
- `gateway.listing`: `/health`, `/metrics`, `/v1/models`, `/v1/models/{id}`;
- `gateway.admin`: the admin endpoints; `gateway.reload`: hot reload of the registry;
- `gateway.background`: the probe loop, idle ttl, autoscaling, SIGHUP;
- `gateway.ui`: the dashboard at /ui (its page, its data from the runtime, switch history);
- `gateway.middleware`: request ids, metering of rejected requests, access lines, errors in
  vLLM's shape (`gateway.errors`); `gateway.auth`: access keys and per-model allow-lists.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route as StarletteRoute

from fleet.registry import Registry, load_registry_from_env
from gateway import auth, ui
from gateway.admin import Admin
from gateway.admit import FleetAdmitter
from gateway.background import Background
from gateway.direct import DirectPath
from gateway.fastpath import GatewayApp
from gateway.listing import Listing
from gateway.middleware import (
    AccessMeter,
    RequestIdMiddleware,
    assign_request_id,
    error_handlers,
)
from gateway.ports import Admitter, FleetOpener
from gateway.proxy import MODEL_ENDPOINTS, Proxy
from gateway.reload import Reloader
from gateway.runtime import Runtime
from gateway.scheduler.metrics import SchedulerMetrics
from gateway.scheduler.runtime import Scheduler
from gateway.settings import GatewaySettings
from gateway.sleepcheck import SleepCheck
from gateway.ui import GatewaySource, RecordingOpener, SwitchHistory
from gateway.upstream import TransportFactory

__all__ = ["MODEL_ENDPOINTS", "create_app"]

log = logging.getLogger("gateway")


def create_app(registry: Registry, settings: GatewaySettings | None = None, *,
               transport_factory: TransportFactory | None = None,
               fleet_opener: FleetOpener | None = None,
               registry_loader: Callable[[], Registry] | None = None,
               reload_on_sighup: bool = False) -> Starlette:
    """Build the gateway for `registry`.

    `transport_factory(base_url)` swaps the upstream transport (tests); `fleet_opener`
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
    switches = SwitchHistory()  # the dashboard's record of the fleet's switches
    if fleet_opener is not None and settings.ui != "off":
        fleet_opener = RecordingOpener(fleet_opener, switches)
    runtime = Runtime(registry, settings, transport_factory, fleet_opener, access=access)
    runtime.reloader = Reloader(runtime, registry_loader or functools.partial(
        load_registry_from_env, settings.registry))
    listing = Listing(runtime)
    admitter: Admitter
    if settings.scheduler == "fair":
        scheduler = Scheduler(settings, runtime.state, lambda: runtime.activator, runtime.clock)
        runtime.use_scheduler(scheduler)
        scheduler.sleep_check = SleepCheck(runtime.upstreams, settings, runtime.clock)
        scheduler.on_action = SchedulerMetrics(runtime.metrics.registry, lambda: scheduler.core,
                                               runtime.clock).on_action
        admitter = scheduler
    else:
        admitter = FleetAdmitter(runtime)
    proxy = Proxy(runtime, admitter)
    background = Background(runtime, listing.healthy, reload_on_sighup=reload_on_sighup)
    meter = AccessMeter(runtime.metrics, settings.access_log)
    plain = meter.logged
    routes = [
        StarletteRoute("/health", plain(listing.health), methods=["GET"]),
        StarletteRoute("/metrics", plain(listing.metrics), methods=["GET"]),
        StarletteRoute("/v1/models", plain(listing.list_models), methods=["GET"]),
        StarletteRoute("/v1/models/{model_id:path}", plain(listing.get_model), methods=["GET"]),
        StarletteRoute("/v1/infer", proxy.infer, methods=["POST"]),
        *Admin(runtime).routes(wrap=plain),
        *ui.routes(GatewaySource(runtime, switches), access, settings, wrap=plain),
        *(StarletteRoute(p, proxy.by_body, methods=["POST"]) for p in MODEL_ENDPOINTS),
        StarletteRoute("/{model}/{rest:path}", proxy.by_prefix, methods=["GET", "POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with background.running():
                yield
        finally:
            await runtime.upstreams.aclose()

    app = GatewayApp(routes=routes, lifespan=lifespan, exception_handlers=error_handlers(meter))
    app.router.redirect_slashes = False  # a redirect would expose routes to path tricks
    # Outermost last: CORS (answers preflights, decorates every answer) > request id > keys.
    app.add_middleware(auth.AccessMiddleware, access=access, on_reject=meter.rejected)
    app.add_middleware(RequestIdMiddleware)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    else:  # POST to a model endpoint: the same middlewares, without Starlette's stack
        app.lean(MODEL_ENDPOINTS, proxy.by_body,
                 [assign_request_id, auth.AccessGuard(access, on_reject=meter.rejected)])
        if settings.direct_path:  # under the CLI's server (gateway/server_direct.py)
            app.direct = DirectPath(runtime, access, proxy.budget)
    app.state.gateway = runtime
    return app
