"""The dashboard's routes: the page, its static files, and two JSON endpoints.

- `GET /ui/` the page (`/ui` redirects there), `GET /ui/static/{name}` its script, style and
  icon: public (no key), they hold no data;
- `GET /ui/api/snapshot`: the fleet as the caller's key may see it (`DashboardSource`), plus
  who the caller is (`viewer`: key name, admin or not). With API keys configured the access
  middleware answers 401 before it without a key, like every other non-public path;
- `GET /ui/api/logs/{model}?n=200&replica=0`: a model's last log lines, admin key only.

The page acts through the admin API (`/admin/switch/...`), not through routes of its own.

Exposure (`GatewaySettings.ui`): `loopback` (default) serves these routes only to clients
connecting from a loopback address and addressing the gateway by a loopback name (a page on
another site cannot reach it through DNS rebinding); others get 403 saying how to turn it on.
`on` serves everyone (data still behind the keys); `off` adds no route at all.

Every answer carries a strict Content-Security-Policy (scripts, styles and fetches from this
origin only; no inline script or style; no framing), `nosniff` and `no-referrer`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Literal, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway import errors
from gateway.auth import ADMIN, Access, Principal, presented_key
from gateway.ui.source import DashboardSource

UiMode = Literal["loopback", "on", "off"]
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
MAX_LOG_LINES = 1000
Handler = Callable[[Request], Awaitable[Response]]


class UiSettings(Protocol):
    """The one setting the dashboard reads (GatewaySettings has it)."""

    @property
    def ui(self) -> UiMode: ...


def routes(source: DashboardSource, access: Access, settings: UiSettings,
           wrap: Callable[[Handler], Handler] = lambda h: h) -> list[Route]:
    """The dashboard's routes ([] when `settings.ui` is "off"); `wrap` decorates each handler
    (e.g. the gateway's access log) but the snapshot's: each open page asks for one every
    second, which would drown the access log."""
    if settings.ui == "off":
        return []
    ui = Dashboard(source, access, loopback_only=settings.ui == "loopback")
    return [
        Route("/ui", wrap(ui.redirect), methods=["GET"]),
        Route("/ui/", wrap(ui.page), methods=["GET"]),
        Route("/ui/static/{name}", wrap(ui.asset), methods=["GET"]),
        Route("/ui/api/snapshot", ui.snapshot, methods=["GET"]),
        Route("/ui/api/logs/{model:path}", wrap(ui.logs), methods=["GET"]),
    ]


def load_assets() -> dict[str, bytes]:
    """The page's files, read once from the package data (gateway/ui/static/)."""
    folder = resources.files("gateway.ui").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


class Dashboard:
    """Handlers of the /ui routes over one `DashboardSource`."""

    def __init__(self, source: DashboardSource, access: Access, *, loopback_only: bool) -> None:
        self.source = source
        self.access = access
        self.loopback_only = loopback_only
        self.assets = load_assets()

    # -- pages ----------------------------------------------------------------------------
    async def redirect(self, request: Request) -> Response:
        self._gate(request)
        return RedirectResponse("/ui/", status_code=307, headers=SECURITY_HEADERS)

    async def page(self, request: Request) -> Response:
        self._gate(request)
        return self._asset("index.html")

    async def asset(self, request: Request) -> Response:
        self._gate(request)
        name = request.path_params["name"]
        if name == "index.html" or name not in self.assets:
            raise errors.not_found(request.url.path)
        return self._asset(name)

    def _asset(self, name: str) -> Response:
        return Response(self.assets[name], media_type=ASSETS[name], headers=SECURITY_HEADERS)

    # -- data -----------------------------------------------------------------------------
    async def snapshot(self, request: Request) -> Response:
        self._gate(request)
        principal: Principal | None = getattr(request.state, "principal", None)
        snap = await self.source.snapshot(principal)
        viewer = {
            "name": principal.name if principal is not None else None,
            "admin": self._admin_error(request) is None,
            "admin_enabled": bool(len(self.access.admin)),
            "keys_required": not self.access.open,
        }
        return _json({"viewer": viewer, **snap.as_dict()})

    async def logs(self, request: Request) -> Response:
        self._gate(request)
        denied = self._admin_error(request)
        if denied is not None:
            raise denied
        n = _int_param(request, "n", 200, 1, MAX_LOG_LINES)
        replica = _int_param(request, "replica", 0, 0, 1023)
        got = await self.source.log_lines(request.path_params["model"], n, replica)
        return _json({"model": got.model, "replica": got.replica, "lines": list(got.lines)})

    # -- checks ---------------------------------------------------------------------------
    def _gate(self, request: Request) -> None:
        """403 for a client beyond loopback, or a non-loopback Host, in loopback mode."""
        if not self.loopback_only:
            return
        client = request.client.host if request.client is not None else ""
        if not _is_loopback(client):
            raise errors.GatewayError(
                403, "The dashboard is served to clients on this machine only "
                     "(GATEWAY_UI=loopback, the default): open it here as "
                     "http://127.0.0.1:PORT/ui/, or start the gateway with GATEWAY_UI=on to "
                     "serve it beyond loopback (its data still needs a key when API keys are "
                     "configured).")
        if not _is_loopback(request.url.hostname or ""):
            raise errors.GatewayError(
                403, "The dashboard answers only when addressed as localhost, 127.0.0.1 or "
                     "[::1] (GATEWAY_UI=loopback, the default); set GATEWAY_UI=on to serve it "
                     "under other names.")

    def _admin_error(self, request: Request) -> errors.GatewayError | None:
        """None when the caller holds the admin key, else the error to answer."""
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is not None:
            # Keys are on: the middleware checked the key (and removed it from the headers).
            if principal.admin:
                return None
            return errors.GatewayError(403, "Log lines and actions need the admin key; this "
                                            "key is not it.")
        outcome = self.access.check(ADMIN, presented_key(request.headers.raw))
        if isinstance(outcome, errors.GatewayError):
            return outcome
        return None if outcome is not None and outcome.admin else errors.GatewayError(
            401, "The admin key is not valid.")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise errors.GatewayError(400, f"`{name}` must be a whole number from {low} to "
                                       f"{high}; got {raw!r}.", param=name)
    return value


def _json(content: Any) -> Response:
    return JSONResponse(content, headers=SECURITY_HEADERS)
