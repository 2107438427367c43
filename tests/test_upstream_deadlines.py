"""Deadlines the gateway owns: a malformed or stalled upstream ends within its configured time.

A raw-socket upstream in the test process misbehaves in each way an upstream can (a chunk size
that is not hex mid-stream, a stall before the head, a stall mid-body, a close mid-body, and
fuzzed framing after a valid head); the gateway's relay (`gateway.relay.RelayResponse`, run
in-process with a recording ASGI `send`) and its probes (`client.get`) must end within the
read timeout (or `health_timeout`) plus a margin, with an error event on an event stream, a
broken connection otherwise, or an httpx error before the head. Every upstream client the
gateway can use is tried: `h1` (its own; llhttp raises at once on bad framing) and `aiohttp`
(whose C parser waits forever on a bad chunk size: there the relay's deadline timer ends it).

Against the relay before these deadlines (aiohttp client, `sock_read` only), the invalid chunk
size cases hung until the outer `wait_for` of these tests (seen: one event, then nothing).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.relay import RelayResponse, UpstreamBroken
from gateway.settings import GatewaySettings
from gateway.upstream import Upstreams

pytestmark = [pytest.mark.gateway, pytest.mark.anyio]

READ = 0.4  # the read timeout every client gets here
MARGIN = 2.0  # a loaded 2-core machine: generous, still far below "forever"
CLIENTS = ("h1", "aiohttp")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event], Awaitable[None]]

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
JSON_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
             b"transfer-encoding: chunked\r\n\r\n")
EVENT = b"data: {\"x\": 1}\n\n"
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)


def settings_for(client: str, read: float = READ) -> GatewaySettings:
    return GatewaySettings(connect_timeout=read, read_timeout=read, write_timeout=read,
                           pool_timeout=read, health_timeout=read, upstream_client=client)


class RawUpstream:
    """A loopback server that reads one request head per connection, then runs `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.closed = asyncio.Event()
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Self:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                await self.handler(reader, writer, self.stop)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                self.closed.set()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.stop.set()
        self.server.close()
        await asyncio.sleep(0)  # the handlers see `stop` and end

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


def answering(*parts: bytes, then: str = "stall") -> Handler:
    """A handler writing `parts` (a few ms apart: separate reads for the client), then
    stalling until the test ends (`stall`) or closing (`close`)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      stop: asyncio.Event) -> None:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.03)
            writer.write(part)
            await writer.drain()
        if then == "stall":  # until the client closes the connection, or the test ends
            eof = asyncio.ensure_future(reader.read())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
            eof.cancel()
            stopped.cancel()

    return handler


@pytest.fixture
async def upstreams() -> AsyncIterator[list[Upstreams]]:
    made: list[Upstreams] = []
    yield made
    for ups in made:
        await ups.aclose()


async def open_stream(made: list[Upstreams], kind: str, url: str, read: float = READ) -> Any:
    ups = Upstreams(settings_for(kind, read))
    made.append(ups)
    client = ups.client(url)
    assert type(client).__name__ == {"h1": "H1Client", "aiohttp": "AiohttpClient"}[kind]
    request = client.build_request("POST", "/v1/chat/completions", content=b"{}",
                                   headers=[(b"content-type", b"application/json")])
    return await client.send(request, stream=True)


async def relay(upstream: Any) -> tuple[list[bytes], bool]:
    """Run the relay for `upstream` with a client that stays; the body it sent, and whether
    it ended the body properly (more_body False)."""
    body: list[bytes] = []
    ended = False
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await forever.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal ended
        if message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            ended = ended or not message.get("more_body", False)

    response = RelayResponse(upstream, "m", "rid-1", 5)
    await asyncio.wait_for(response({"type": "http"}, receive, send), READ + MARGIN + 5)
    return body, ended


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("then", ["stall", "close"])
async def test_invalid_chunk_size_mid_stream_ends_with_an_error_event(
        upstreams: list[Upstreams], kind: str, then: str) -> None:
    async with RawUpstream(answering(SSE_HEAD, CHUNK, b"ZZZZ\r\n\r\n", then=then)) as up:
        upstream = await open_stream(upstreams, kind, up.url)
        start = time.monotonic()
        body, ended = await relay(upstream)
        took = time.monotonic() - start
    text = b"".join(body)
    assert text.startswith(EVENT)
    assert b'"error"' in text and b"broke off" in text and ended
    assert took < READ + MARGIN


@pytest.mark.parametrize("kind", CLIENTS)
async def test_stall_mid_body_ends_with_an_error_event_after_the_read_timeout(
        upstreams: list[Upstreams], kind: str) -> None:
    async with RawUpstream(answering(SSE_HEAD, CHUNK)) as up:
        upstream = await open_stream(upstreams, kind, up.url)
        start = time.monotonic()
        body, ended = await relay(upstream)
        took = time.monotonic() - start
        await asyncio.wait_for(up.closed.wait(), MARGIN)  # the upstream connection was closed
    text = b"".join(body)
    assert text.startswith(EVENT) and b'"error"' in text and ended
    assert READ * 0.9 <= took < READ + MARGIN


@pytest.mark.parametrize("kind", CLIENTS)
async def test_close_mid_body_ends_with_an_error_event_at_once(
        upstreams: list[Upstreams], kind: str) -> None:
    async with RawUpstream(answering(SSE_HEAD, CHUNK, b"40\r\ndata: cut", then="close")) as up:
        upstream = await open_stream(upstreams, kind, up.url, read=30.0)
        start = time.monotonic()
        body, ended = await relay(upstream)
        took = time.monotonic() - start
    assert b'"error"' in b"".join(body) and ended
    assert took < MARGIN  # not the 30 s read timeout


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_broken_plain_body_breaks_the_client_connection(
        upstreams: list[Upstreams], kind: str) -> None:
    async with RawUpstream(answering(JSON_HEAD, b"5\r\n{\"a\":\r\nZZZZ\r\n\r\n")) as up:
        upstream = await open_stream(upstreams, kind, up.url)
        start = time.monotonic()
        with pytest.raises(UpstreamBroken):
            await relay(upstream)
        assert time.monotonic() - start < READ + MARGIN


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("parts", [(), (b"HTTP/1.1 200 OK\r\ncontent-",)],
                         ids=["nothing", "half a head"])
async def test_stall_before_the_head_is_a_read_timeout(
        upstreams: list[Upstreams], kind: str, parts: tuple[bytes, ...]) -> None:
    async with RawUpstream(answering(*parts)) as up:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await open_stream(upstreams, kind, up.url)
        # the head deadline: connect + pool + write + read timeouts
        assert time.monotonic() - start < 4 * READ + MARGIN


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("parts", [
    (SSE_HEAD, CHUNK),                                     # a valid head, then silence
    (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nok",),  # a body shorter than said
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nZZZZ\r\n\r\n",),
    (b"HTTP/1.1 200 OK\r\n",),                             # half a head
], ids=["stall mid-body", "short body", "bad chunk size", "half a head"])
async def test_a_probe_never_waits_longer_than_its_timeout(
        upstreams: list[Upstreams], kind: str, parts: tuple[bytes, ...]) -> None:
    async with RawUpstream(answering(*parts)) as up:
        ups = Upstreams(settings_for(kind, read=30.0))
        upstreams.append(ups)
        start = time.monotonic()
        with pytest.raises(httpx.HTTPError):
            await ups.client(up.url).get("/health", timeout=READ)
        assert time.monotonic() - start < READ + MARGIN


# -- fuzzed framing after a valid head ---------------------------------------------------------

_framing = st.lists(st.one_of(
    st.sampled_from([CHUNK, b"0\r\n\r\n", b"ZZZZ\r\n\r\n", b"\r\n", b"-1\r\n",
                     b"ffffffffffff\r\n", b"5;ext=1\r\nhello\r\n", b"5\r\nhel",
                     b"5\r\nhelloXX", b"0\r\nTrailer: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n",
                     b"\x00\xff", b"data: x\n\n"]),
    st.binary(max_size=40)), max_size=6)


@pytest.mark.parametrize("kind", CLIENTS)
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(framing=_framing, then=st.sampled_from(["stall", "close"]))
async def test_fuzzed_framing_always_ends_within_the_read_timeout(
        kind: str, framing: list[bytes], then: str) -> None:
    made: list[Upstreams] = []
    try:
        async with RawUpstream(answering(SSE_HEAD, *framing, then=then)) as up:
            upstream = await open_stream(made, kind, up.url, read=0.3)
            start = time.monotonic()
            body, ended = await relay(upstream)
            assert ended  # a complete body, or one closed by an error event
            assert time.monotonic() - start < 0.3 + MARGIN
            text = b"".join(body)
            assert text.endswith(b"\n\n") or b'"error"' in text or not text or ended
    finally:
        for ups in made:
            await ups.aclose()


@pytest.mark.parametrize("kind", CLIENTS)
async def test_through_the_gateway_a_broken_stream_ends_with_an_openai_error_event(
        kind: str) -> None:
    """The issue's reproduction: one valid event, then a chunk size that is not hex."""
    from fleet.registry import parse_registry
    from gateway.app import create_app

    async with RawUpstream(answering(SSE_HEAD, CHUNK, b"ZZZZ\r\n\r\n")) as up:
        registry = parse_registry(f'[models.m]\nurl = "{up.url}"\n')
        app = create_app(registry, GatewaySettings(read_timeout=READ, upstream_client=kind))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                start = time.monotonic()
                r = await asyncio.wait_for(client.post(
                    "/v1/chat/completions",
                    json={"model": "m", "stream": True, "messages": []}), 30)
                took = time.monotonic() - start
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0] == EVENT.decode().strip()
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == 502 and "broke off" in error["message"]
    assert took < READ + MARGIN


# -- listings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_listing_never_waits_on_bad_upstreams_longer_than_health_timeout(
        kind: str) -> None:
    from fleet.registry import parse_registry
    from gateway.app import create_app

    bad = [answering(),                                                  # stalls before a head
           answering(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", b"ZZZZ\r\n\r\n"),
           answering(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", b"ok")]  # short body
    health_timeout = 1.0
    async with RawUpstream(bad[0]) as u0, RawUpstream(bad[1]) as u1, RawUpstream(bad[2]) as u2:
        registry = parse_registry(f'[models.m]\nurl = ["{u0.url}", "{u1.url}", "{u2.url}"]\n'
                                  f'[models.n]\nurl = "{u1.url}"\n')
        app = create_app(registry, GatewaySettings(health_timeout=health_timeout,
                                                   upstream_client=kind))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                for path in ("/v1/models", "/v1/models/m"):
                    start = time.monotonic()
                    r = await asyncio.wait_for(client.get(path), 30)
                    took = time.monotonic() - start
                    assert r.status_code == 200, r.text
                    cards = r.json()["data"] if path == "/v1/models" else [r.json()]
                    assert {c["state"] for c in cards} <= {"unreachable", "unhealthy"}
                    assert took < health_timeout + 1.5, (path, took)  # not one per replica
