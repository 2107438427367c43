"""A lean path for the proxied requests: `POST` to a model endpoint without Starlette's routing.

Every proxied request used to pass Starlette's whole stack: the error middleware and the
exception middleware (each wrapping `send`, so every relayed chunk went through two more
coroutines), the router trying the routes one by one, and the route's request wrapper. For
`POST` to an exact model endpoint path (`/v1/chat/completions`, ...), `GatewayApp` instead
runs what the gateway's middlewares do (request id, then keys) as plain calls, its *guards*,
then the handler directly, with the app's own exception handlers: the same answers, headers,
metering and logs, at a fraction of the cost per request, and the server's `send` untouched
for the body. (Guards rather than middlewares: each middleware is one more coroutine that
every suspension and resumption of the request passes through.)

What the stack did and this path does too:
- a `GatewayError` (or any exception with a handler) raised before the answer is sent is
  answered by its handler (vLLM's error shape, the request id);
- anything else is answered 500 by the handler for `Exception` (logged, metered) and raised
  again for the server to log, as Starlette's error middleware does;
- an exception raised while an answer streams (the upstream broke on a plain body) runs the
  handler for `Exception` (log, meter) and is raised again: the server drops the connection.

With CORS configured the lean path is off (CORS decorates every answer): every request takes
the full stack, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]
# A check run before the handler: None to go on, else the answer to send instead.
Guard = Callable[[Scope], ASGIApp | None]


class GatewayApp(Starlette):
    """Starlette, with `POST` to the paths of `lean(...)` going around its stack."""

    _lean_paths: frozenset[str] = frozenset()
    _lean_app: ASGIApp | None = None
    # gateway/direct.py's DirectPath, for a server that serves requests itself
    direct: object | None = None

    def lean(self, paths: Iterable[str], handler: Handler, guards: Sequence[Guard]) -> None:
        """`POST` to any of `paths` runs `guards` in order (the first that answers ends the
        request), then `handler(request)` with this app's exception handlers."""
        self._lean_paths = frozenset(paths)
        self._lean_app = _Endpoint(handler, self.exception_handlers, tuple(guards))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lean = self._lean_app
        if (lean is not None and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"] in self._lean_paths):
            scope["app"] = self
            await lean(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class _Endpoint:
    """Calls the handler and answers its errors with the app's exception handlers."""

    def __init__(self, handler: Handler, handlers: Mapping[Any, ErrorHandler],
                 guards: tuple[Guard, ...] = ()) -> None:
        self.handler = handler
        self.guards = guards
        self.handlers: dict[Any, ErrorHandler] = dict(handlers)
        fallback = self.handlers.get(Exception) or self.handlers.get(500)
        self.fallback: ErrorHandler | None = fallback

    def _lookup(self, exc: Exception) -> ErrorHandler | None:
        for cls in type(exc).__mro__:
            if cls is not Exception and cls in self.handlers:
                return self.handlers[cls]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for guard in self.guards:
            answer = guard(scope)
            if answer is not None:
                await answer(scope, receive, send)
                return
        request = Request(scope, receive, send)
        try:
            response = await self.handler(request)
        except Exception as exc:
            handler = self._lookup(exc)
            if handler is not None:
                await (await handler(request, exc))(scope, receive, send)
                return
            if self.fallback is None:
                raise
            await (await self.fallback(request, exc))(scope, receive, send)
            raise
        try:
            await response(scope, receive, send)
        except Exception as exc:
            # The answer has started (a relayed body broke): log and meter, then let the
            # server drop the connection.
            if self.fallback is not None:
                await self.fallback(request, exc)
            raise
