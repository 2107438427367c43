"""The gateway's ASGI application: `create_app(registry, settings)`.

Request path: find the model (body field, multipart field or /{model}/ prefix) -> resolve
name or alias -> the instance's pooled client -> relay the upstream response as it arrives.
Every failure the gateway itself answers goes through `gateway.errors` (vLLM's error shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from fleet.registry import Registry
from gateway import body as bodies
from gateway import errors
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

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "content-length", "proxy-connection", "proxy-authorization", "expect"}


class Gateway:
    """Request handlers over one routing table and one set of upstream clients."""

    def __init__(self, registry: Registry, settings: GatewaySettings,
                 transport_factory: TransportFactory | None = None) -> None:
        self.settings = settings
        self.table = RoutingTable(registry, settings.upstream_host)
        self.upstreams = Upstreams(settings, transport_factory)
        self.started = int(time.time())

    # -- lifecycle ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.upstreams.open(self.table.base_urls())
        try:
            yield
        finally:
            await self.upstreams.aclose()

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
            return await self._send(request, route, "GET", path, b"")
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
                    payload: bytes) -> Response:
        request_id = request.state.request_id
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1") not in _HOP]
        headers = [(k, v) for k, v in headers if k != b"x-request-id"]
        headers.append((b"x-request-id", request_id.encode()))
        client = self.upstreams.client(route.base_url)
        upstream_request = client.build_request(method, path, content=payload, headers=headers,
                                                params=request.url.query or None)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            raise map_failure(exc, route.model, route.base_url, self.settings) from None
        return RelayResponse(upstream, route.model, request_id, self.settings.retry_after)

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
    async def _probe(self, route: Route) -> str:
        """`ready`, `unhealthy` (answers, not 200) or `unreachable`, from the instance's /health."""
        client = self.upstreams.client(route.base_url)
        try:
            resp = await client.get("/health", timeout=self.settings.health_timeout)
        except httpx.HTTPError:
            return "unreachable"
        return "ready" if resp.status_code == 200 else "unhealthy"

    def _model_card(self, route: Route, state: str) -> dict[str, Any]:
        spec = self.table.registry.models[route.model]
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
            "state": state,
        }


# -- app factory ------------------------------------------------------------------------------


def create_app(registry: Registry, settings: GatewaySettings | None = None, *,
               transport_factory: TransportFactory | None = None) -> Starlette:
    """Build the gateway for `registry`. `transport_factory(base_url)` swaps the upstream
    transport (tests use respx or ASGI transports)."""
    settings = settings or GatewaySettings()
    gw = Gateway(registry, settings, transport_factory)
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
