"""Relaying an upstream response to the client, chunk by chunk, as it arrives.

No buffering, no re-encoding: raw bytes from the upstream socket go straight to the client.
A watcher waits for the client's `http.disconnect` while the pump runs; whichever ends first
cancels the other, and the upstream response is closed at once, so vLLM aborts a generation
nobody is reading.
"""

from __future__ import annotations

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway import errors

# Hop-by-hop headers (RFC 9110 7.6.1) and those the ASGI server sets itself.
_DROP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
         b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"date", b"server"}


class RelayResponse(Response):
    """An ASGI response that streams an already opened upstream `httpx.Response`."""

    def __init__(self, upstream: httpx.Response, model: str, request_id: str,
                 retry_after: int) -> None:
        self.upstream = upstream
        self.model = model
        self.status_code = upstream.status_code
        headers = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower() not in _DROP]
        present = {k for k, _ in headers}
        content_type = upstream.headers.get("content-type", "")
        self.is_event_stream = content_type.startswith("text/event-stream")
        if self.is_event_stream:
            # Stop intermediaries (nginx, CDNs) from buffering the stream.
            if b"cache-control" not in present:
                headers.append((b"cache-control", b"no-cache"))
            headers.append((b"x-accel-buffering", b"no"))
        if upstream.status_code == 503 and b"retry-after" not in present:
            headers.append((b"retry-after", str(retry_after).encode()))
        headers.append((b"x-request-id", request_id.encode()))
        self.raw_headers = headers
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    while True:
                        message: Message = await receive()
                        if message["type"] == "http.disconnect":
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch)
                await self._pump(send)
                tg.cancel_scope.cancel()
        finally:
            await self.upstream.aclose()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        tail = b"\n\n"
        try:
            async for chunk in self.upstream.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail = chunk[-2:]
        except httpx.HTTPError as exc:
            if not self.is_event_stream:
                # Break the connection: a truncated body must not look complete.
                raise UpstreamBroken(self.model, exc) from exc
            detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            event = errors.upstream_broken_stream(self.model, detail)
            prefix = b"" if tail.endswith(b"\n\n") else b"\n\n"
            await send({"type": "http.response.body", "body": prefix + event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class UpstreamBroken(Exception):
    """The upstream failed after the response started; the client connection is dropped."""

    def __init__(self, model: str, exc: Exception) -> None:
        super().__init__(f"upstream of model {model!r} failed mid-response: {exc!r}")
