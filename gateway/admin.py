"""The admin endpoints, behind the admin key (see gateway/auth.py: without a configured admin
key they answer 403).

- `GET /admin/status`: per model the gateway's in-flight and queued requests, limits, and
  replicas (outstanding requests, ejected or not, last error); whether the gateway put it to
  sleep or is activating it; the registry's source; and the fleet's own status (containers,
  health) when a fleet is configured (`?fleet=false` skips that probe).
- `POST /admin/switch/{model}`: make a managed model serve, evicting what is in the way (the
  same path, lock and planner as `fleet switch` and on-demand activation).
- `POST /admin/wake/{model}`: bring a model back without evicting anything when the fleet
  client offers `wake` (409 when it does not fit); otherwise the same as switch.
- `POST /admin/sleep/{model}`: put a managed model to sleep (vLLM sleep, or stop); 409 while
  it has requests in flight unless `?force=true`.
- `POST /admin/reload`: re-read the registry (see gateway/reload.py); 400 naming every problem
  when it is invalid, and the previous registry stays.
Every answer is JSON; errors in vLLM's shape. Each action is logged at info.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.routing import Route as StarletteRoute

from fleet.errors import PlacementRefused
from fleet.registry import RegistryError
from gateway import errors
from gateway.activation import Activator
from gateway.middleware import json_response
from gateway.ports import AdminTarget
from gateway.routing import Route

log = logging.getLogger("gateway.admin")

Handler = Callable[[Request], Awaitable[Response]]
FLEET_STATUS_TIMEOUT = 15.0  # seconds: the fleet probes Docker and every model's /health


class Admin:
    """Handlers of the /admin routes over one gateway."""

    def __init__(self, target: AdminTarget) -> None:
        self.gw = target

    def routes(self, wrap: Callable[[Handler], Handler] = lambda h: h) -> list[StarletteRoute]:
        """The admin routes (each handler passed through `wrap`), then a catch-all for the
        rest of /admin/ (404, or 405 for a wrong method): no /admin/ path falls through to
        the per-model prefix route."""
        return [*self._actions(wrap), StarletteRoute("/admin/{rest:path}", self.fallback)]

    def _actions(self, wrap: Callable[[Handler], Handler] = lambda h: h) -> list[StarletteRoute]:
        return [
            StarletteRoute("/admin/status", wrap(self.status), methods=["GET"]),
            StarletteRoute("/admin/reload", wrap(self.reload), methods=["POST"]),
            StarletteRoute("/admin/switch/{model:path}", wrap(self.switch), methods=["POST"]),
            StarletteRoute("/admin/wake/{model:path}", wrap(self.wake), methods=["POST"]),
            StarletteRoute("/admin/sleep/{model:path}", wrap(self.sleep), methods=["POST"]),
        ]

    async def fallback(self, request: Request) -> Response:
        if any(r.matches(request.scope)[0] == Match.PARTIAL for r in self._actions()):
            raise errors.method_not_allowed(request.method, request.url.path)
        raise errors.not_found(request.url.path)

    # -- status ---------------------------------------------------------------------------
    async def status(self, request: Request) -> Response:
        gw, state = self.gw, self.gw.state
        activator = gw.activator
        asleep = activator.asleep if activator is not None else set()
        models: dict[str, Any] = {}
        for name, route in state.table.routes.items():
            adm = state.admission[name]
            spec = state.registry.models[name]
            models[name] = {
                "managed": route.managed,
                "aliases": list(spec.aliases),
                "in_flight": adm.in_flight,
                "queued": adm.waiting,
                "max_concurrency": adm.max_concurrency,
                "max_queue": adm.max_queue,
                "asleep": name in asleep,
                "activating": activator is not None and activator.pending(name),
                "ttl": state.ttl.get(name),
                "replicas": [{
                    "index": inst.index,
                    "url": inst.base_url,
                    "outstanding": inst.outstanding,
                    "ejected": not gw.balancer.available(inst),
                    "failures": inst.failures,
                    "last_error": inst.last_error or None,
                } for inst in state.instances[name]],
            }
        view = gw.scheduler_view()
        if view is not None:  # each model's place in the time-sharing, beside its figures
            for name, entry in models.items():
                entry["scheduler"] = view["models"].get(name)
        body: dict[str, Any] = {
            "registry": {"source": state.registry.source, "models": len(models)},
            "activation": activator is not None,
            "models": models,
            "scheduler": view and {k: v for k, v in view.items() if k != "models"},
            "fleet": None,
        }
        if activator is not None and request.query_params.get("fleet", "true") != "false":
            body["fleet"] = await self._fleet_status(activator)
        return json_response(request, body)

    async def _fleet_status(self, activator: Activator) -> Any:
        status = getattr(activator.fleet, "status", None)
        if status is None:
            return None
        try:
            with anyio.fail_after(FLEET_STATUS_TIMEOUT):
                rows = await anyio.to_thread.run_sync(status, abandon_on_cancel=True)
        except TimeoutError:
            return {"error": f"the fleet did not answer within {FLEET_STATUS_TIMEOUT:g} s"}
        except Exception as exc:  # Docker unreachable, etc.: the gateway's figures still count
            return {"error": _reason(exc)}
        return [row.as_dict() if hasattr(row, "as_dict") else row for row in rows]

    # -- actions --------------------------------------------------------------------------
    async def switch(self, request: Request) -> Response:
        route, activator = self._managed(request)
        started = time.perf_counter()
        await activator.activate(route.model)  # 503 with the reason when it cannot
        await self.gw.refresh()
        return self._done(request, "switch", route.model, started)

    async def wake(self, request: Request) -> Response:
        route, activator = self._managed(request)
        started = time.perf_counter()
        wake = getattr(activator.fleet, "wake", None)
        if wake is None:
            await activator.activate(route.model)
        else:
            await self._fleet_call(wake, route.model, "wake")
            activator.asleep.discard(route.model)
        await self.gw.refresh()
        return self._done(request, "wake", route.model, started)

    async def sleep(self, request: Request) -> Response:
        route, activator = self._managed(request)
        adm = self.gw.state.admission[route.model]
        force = request.query_params.get("force", "").lower() in ("1", "true", "yes")
        if (adm.in_flight or adm.waiting) and not force:
            raise errors.GatewayError(
                409, f"Model `{route.model}` has {adm.in_flight} request(s) in flight and "
                     f"{adm.waiting} queued; retry when it is idle, or add ?force=true to cut "
                     f"them off.", err_type="ConflictError")
        started = time.perf_counter()
        try:
            await activator.put_to_sleep(route.model)
        except Exception as exc:
            raise _fleet_error(route.model, "sleep", exc) from None
        await self.gw.refresh()
        return self._done(request, "sleep", route.model, started)

    async def reload(self, request: Request) -> Response:
        reloader = self.gw.reloader
        if reloader is None:
            raise errors.GatewayError(409, "This gateway was started without a way to reload "
                                           "its registry.", err_type="ConflictError")
        try:
            result = await reloader.reload()
        except RegistryError as exc:
            raise errors.GatewayError(
                400, f"The registry from {exc.source} is invalid, so the gateway keeps routing "
                     f"by the previous one. Problems: " + "; ".join(exc.problems),
                param="registry") from None
        return json_response(request, result.as_dict())

    # -- helpers --------------------------------------------------------------------------
    def _managed(self, request: Request) -> tuple[Route, Activator]:
        requested = request.path_params["model"]
        state = self.gw.state
        route = state.table.resolve(requested)
        if route is None:
            raise errors.unknown_model(requested, state.table.names())
        if not route.managed:
            raise errors.GatewayError(
                400, f"Model `{route.model}` is a remote server (`url` in the registry): the "
                     f"fleet does not run it, so it cannot be switched, woken or put to sleep.",
                param="model")
        activator = self.gw.activator
        if activator is None:
            raise errors.GatewayError(
                409, "This gateway has no fleet to act through: start it with activation on "
                     "(GATEWAY_ACTIVATION=true, the default) and Docker reachable, or use the "
                     "`fleet` CLI.", err_type="ConflictError")
        return route, activator

    async def _fleet_call(self, fn: Any, model: str, action: str) -> None:
        try:
            await anyio.to_thread.run_sync(fn, model)
        except Exception as exc:
            raise _fleet_error(model, action, exc) from None

    def _done(self, request: Request, action: str, model: str, started: float) -> Response:
        seconds = round(time.perf_counter() - started, 3)
        log.info("admin %s %s done in %.2f s", action, model, seconds, extra={"fields": {
            "request_id": getattr(request.state, "request_id", "-"), "action": action,
            "model": model, "seconds": seconds}})
        return json_response(request, {"model": model, "action": action, "seconds": seconds})


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def _fleet_error(model: str, action: str, exc: Exception) -> errors.GatewayError:
    if isinstance(exc, errors.GatewayError):
        return exc
    if isinstance(exc, PlacementRefused):
        return errors.GatewayError(409, f"The fleet refused to {action} `{model}`: "
                                        f"{_reason(exc)}", err_type="ConflictError")
    return errors.GatewayError(503, f"The fleet could not {action} `{model}`: {_reason(exc)}")

