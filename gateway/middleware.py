"""What wraps every request: the request id, metering of requests that never reach a model,
the access line of the small JSON routes, and the error handlers (vLLM's error shape).

- `RequestIdMiddleware` keeps the client's `X-Request-Id` (printable ASCII, at most 128
  characters: it is echoed on every answer) or makes one, in `request.state.request_id`.
- `AccessMeter.rejected` meters (and logs) a request answered before a model was known
  (401, 400, 404...), once; `AccessMeter.logged` gives a handler an access line.
- `error_handlers` turns `GatewayError`, Starlette's HTTP errors and anything unexpected into
  JSON errors carrying the request id (an unexpected one is logged with its traceback).
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import errors, logs
from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway")

_random_bits = random.Random().getrandbits  # its own generator, seeded from os.urandom

Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "-"


def json_response(request: Request, content: Any) -> Response:
    return JSONResponse(content, headers={"x-request-id": request_id(request)})


def new_request_id() -> str:
    """32 random hex digits, as `uuid.uuid4().hex` gave but without its system call and
    object per request (an id to find a request by, not a secret)."""
    return f"{_random_bits(128):032x}"


class RequestIdMiddleware:
    """Keeps the client's X-Request-Id (or makes one) and puts it in `request.state`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            assign_request_id(scope)
        await self.app(scope, receive, send)


def assign_request_id(scope: Scope) -> None:
    """An HTTP request's id, in `scope["state"]["request_id"]` (`request_id_of` its headers).
    Also a guard of the lean path: it never refuses."""
    scope.setdefault("state", {})["request_id"] = request_id_of(scope["headers"])


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is usable (printable ASCII, 1 to 128 characters: it
    is echoed unchanged on every answer), else a new id."""
    for key, value in headers:
        if key == b"x-request-id":
            candidate = value.decode("latin-1")
            if 0 < len(candidate) <= 128 and candidate.isascii() and candidate.isprintable():
                return candidate
            break
    return new_request_id()


class AccessMeter:
    """Metering and access lines of the requests the proxy does not meter itself."""

    def __init__(self, metrics: GatewayMetrics, access_log: bool) -> None:
        self.metrics = metrics
        self.access_log = access_log

    def rejected(self, scope: Scope, status: int) -> None:
        """A request answered before it reached a model (401, 400, 404...): metered, logged."""
        state = scope.get("state", {})
        if state.get("metered"):
            return
        state["metered"] = True
        self.metrics.rejected_request(status)
        if self.access_log:
            logs.access_line({"request_id": state.get("request_id", "-"),
                              "method": scope.get("method"), "path": scope.get("path"),
                              "model": None, "status": status})

    def logged(self, handler: Handler) -> Handler:
        """`handler` (a route answering small JSON) with an access line, when they are on."""
        if not self.access_log:
            return handler

        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            started = time.perf_counter()
            response = await handler(request)
            request.state.metered = True
            logs.access_line({"request_id": request_id(request), "method": request.method,
                              "path": request.url.path, "model": None,
                              "status": response.status_code,
                              "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
            return response

        return wrapper


def error_handlers(meter: AccessMeter) -> Mapping[Any, ErrorHandler]:
    """Starlette's `exception_handlers`: every error the gateway answers, in vLLM's shape."""

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.GatewayError)
        meter.rejected(request.scope, exc.status)
        rid = request_id(request)  # internal details go to the log under it, not to the caller
        return exc.for_request(rid).response({"x-request-id": rid})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            err = errors.not_found(request.url.path)
        elif exc.status_code == 405:
            err = errors.method_not_allowed(request.method, request.url.path)
        else:
            err = errors.GatewayError(exc.status_code, str(exc.detail))
        meter.rejected(request.scope, err.status)
        return err.response({"x-request-id": request_id(request)})

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        rid = request_id(request)
        log.error("request %s failed: %r", rid, exc, exc_info=exc)
        meter.rejected(request.scope, 500)
        return errors.internal_error(rid).response({"x-request-id": rid})

    return {errors.GatewayError: gateway_error, HTTPException: http_error,
            Exception: unexpected_error}
