"""Relaying an upstream response to the client, chunk by chunk, as it arrives.

No buffering, no re-encoding: raw bytes from the upstream socket go straight to the client,
as soon as they arrive; what arrived together (a burst of SSE events) goes out in one write.
A watcher task waits for the client's `http.disconnect` while the pump runs; a disconnect
cancels the pump, the pump's end stops the watcher, and the upstream response is closed at
once either way, so vLLM aborts a generation nobody is reading. (Plain asyncio tasks: an anyio
task group per request cost about a tenth of the gateway's CPU per streamed request.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway import errors
from gateway.upstream import UpstreamResponse

# Hop-by-hop headers (RFC 9110 7.6.1) and those the ASGI server sets itself.
_DROP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
         b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"date", b"server"}


class RelayResponse(Response):
    """An ASGI response that streams an already opened upstream response."""

    def __init__(self, upstream: UpstreamResponse, model: str, request_id: str,
                 retry_after: int) -> None:
        self.upstream = upstream
        self.model = model
        self.status_code = upstream.status_code
        headers = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower() not in _DROP]
        present = {k for k, _ in headers}
        content_type = upstream.headers.get("content-type") or ""
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
        # Set by the app (metrics): called once after the first body chunk was sent, and
        # when the upstream fails mid-response. Nothing is checked per chunk.
        self.on_first_chunk: Callable[[], None] | None = None
        self.on_broken: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.current_task()
        assert pump is not None
        state = _WatchState()
        watcher = asyncio.get_running_loop().create_task(_watch(receive, pump, state))
        try:
            await self._pump(send)
            state.done = True  # from here on a disconnect must not cancel this task
        except asyncio.CancelledError:
            state.done = True
            if state.disconnected and pump.uncancel() == 0:
                return  # the client went away: nobody to answer
            raise
        finally:
            watcher.cancel()
            await self.upstream.aclose()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        tail = b"\n\n"
        chunks = self.upstream.aiter_raw()
        try:
            if self.on_first_chunk is not None:
                async for chunk in chunks:  # up to the first chunk, then the loop below
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                        tail = chunk[-2:]
                        self.on_first_chunk()
                        break
            async for chunk in chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail = chunk[-2:]
        except httpx.HTTPError as exc:
            if self.on_broken is not None:
                self.on_broken()
            if not self.is_event_stream:
                # Break the connection: a truncated body must not look complete.
                raise UpstreamBroken(self.model, exc) from exc
            detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            event = errors.upstream_broken_stream(self.model, detail)
            prefix = b"" if tail.endswith(b"\n\n") else b"\n\n"
            await send({"type": "http.response.body", "body": prefix + event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _WatchState:
    __slots__ = ("disconnected", "done")

    def __init__(self) -> None:
        self.done = False
        self.disconnected = False


async def _watch(receive: Receive, pump: asyncio.Task[object], state: _WatchState) -> None:
    """Cancel `pump` when the client disconnects before the response is over."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            if not state.done:
                state.disconnected = True
                pump.cancel()
            return


class UpstreamBroken(Exception):
    """The upstream failed after the response started; the client connection is dropped."""

    def __init__(self, model: str, exc: Exception) -> None:
        super().__init__(f"upstream of model {model!r} failed mid-response: {exc!r}")
