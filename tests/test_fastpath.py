"""`gateway.fastpath.GatewayApp`: POST to a lean path skips Starlette's stack, answers the same.

A toy app with the same shape as the gateway's (a middleware that records, exception handlers
for a known error and for anything else, a route for the same path): the lean path must run
its guards in order (one may answer instead of the handler), answer errors with the app's
handlers, call the fallback handler and raise again for unexpected errors, leave other
methods and paths to Starlette, and hand the handler's response the server's own `send` (no
wrapper per body chunk).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.fastpath import GatewayApp

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


class Known(Exception):
    pass


class Tag:
    """A middleware that marks the scope, as the request id middleware does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["tag"] = "on"
        await self.app(scope, receive, send)


def tag(scope: Scope) -> None:
    """The lean path's guard doing what `Tag` does."""
    scope.setdefault("state", {})["tag"] = "on"


def refuse(scope: Scope) -> ASGIApp | None:
    """A guard that answers a request carrying `x-refuse` itself (as the key check does)."""
    if (b"x-refuse", b"1") in scope["headers"]:
        return JSONResponse({"error": "refused", "tag": scope["state"]["tag"]}, status_code=401)
    return None


def make_app() -> tuple[GatewayApp, dict[str, Any]]:
    seen: dict[str, Any] = {"fallback": 0, "handler": 0, "sends": []}

    async def handler(request: Request) -> Response:
        seen["handler"] += 1
        body = await request.body()
        if body == b"known":
            raise Known("k")
        if body == b"boom":
            raise RuntimeError("boom")
        tag = request.state.tag

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            seen["sends"].append(send)
            await PlainTextResponse(f"ok {tag} {scope['app'] is app}")(scope, receive, send)

        return answer  # type: ignore[return-value]

    async def known(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "known", "tag": request.state.tag}, status_code=418)

    async def fallback(request: Request, exc: Exception) -> Response:
        seen["fallback"] += 1
        return JSONResponse({"error": "internal"}, status_code=500)

    async def slow_path(request: Request) -> Response:
        return PlainTextResponse("slow")

    app = GatewayApp(routes=[Route("/v1/chat/completions", slow_path, methods=["GET", "POST"])],
                     exception_handlers={Known: known, Exception: fallback})
    app.add_middleware(Tag)
    app.lean(["/v1/chat/completions"], handler, [tag, refuse])
    return app, seen


async def call(app: GatewayApp, method: str, body: bytes = b"") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, "/v1/chat/completions", content=body)


async def test_post_takes_the_lean_path_with_its_middleware() -> None:
    app, seen = make_app()
    r = await call(app, "POST", b"hi")
    assert r.status_code == 200 and r.text == "ok on True"
    assert seen["handler"] == 1
    assert "ServerErrorMiddleware" not in repr(seen["sends"][0])  # the server's send itself


async def test_other_methods_take_starlettes_stack() -> None:
    app, seen = make_app()
    r = await call(app, "GET")
    assert r.text == "slow" and seen["handler"] == 0


async def test_a_handled_error_gets_its_handler() -> None:
    app, seen = make_app()
    r = await call(app, "POST", b"known")
    assert r.status_code == 418 and r.json() == {"error": "known", "tag": "on"}
    assert seen["fallback"] == 0


async def test_an_unexpected_error_gets_the_fallback_and_is_raised_again() -> None:
    app, seen = make_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(RuntimeError, match="boom"):
            await client.post("/v1/chat/completions", content=b"boom")
    assert seen["fallback"] == 1
    r = await call(app, "POST", b"boom")
    assert r.status_code == 500 and r.json() == {"error": "internal"}


async def test_a_guard_that_answers_ends_the_request() -> None:
    app, seen = make_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/v1/chat/completions", content=b"hi", headers={"x-refuse": "1"})
    assert r.status_code == 401 and r.json() == {"error": "refused", "tag": "on"}
    assert seen["handler"] == 0
