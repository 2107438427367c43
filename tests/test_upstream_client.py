"""The aiohttp upstream client (`gateway.upstream.AiohttpClient`) over real loopback sockets.

Small asyncio servers in the test process play the upstream: they refuse, stall, never read,
answer in pieces, or count connections. What the gateway relies on is checked: httpx's
exception types for every failure (so `map_failure` gives 502/503/504 as with httpx), bytes
relayed as they arrive, the connection closed at once when a response is dropped early, reused
when it was read to its end, and no header the caller did not send.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Self

import aiohttp
import httpx
import pytest

from gateway.settings import GatewaySettings
from gateway.upstream import AiohttpClient, Upstreams, httpx_error, map_failure
from support.ports import free_port

pytestmark = [pytest.mark.gateway, pytest.mark.anyio]

S = GatewaySettings(connect_timeout=0.3, read_timeout=0.5, write_timeout=0.3, pool_timeout=0.3,
                    retry_after=7, upstream_client="aiohttp")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A loopback server running `handler` per connection; records what it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body


@pytest.fixture
async def client() -> AsyncIterator[Callable[[str], AiohttpClient]]:
    made: list[AiohttpClient] = []

    def make(url: str) -> AiohttpClient:
        ups = Upstreams(S)
        c = ups.client(url)
        assert isinstance(c, AiohttpClient)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.aclose()


async def send(c: AiohttpClient, body: bytes = b'{"x":1}', path: str = "/v1/chat/completions",
               params: str | None = None):  # type: ignore[no-untyped-def]
    req = c.build_request("POST", path, content=body, params=params,
                          headers=[(b"content-type", b"application/json"),
                                   (b"x-request-id", b"rid-1")])
    return await c.send(req, stream=True)


def status_of(exc: httpx.HTTPError) -> int:
    return map_failure(exc, "m", "http://127.0.0.1:1", S).status


# -- failures ------------------------------------------------------------------------------


async def test_refused_is_a_connect_error_502(client) -> None:
    with pytest.raises(httpx.ConnectError) as info:
        await send(client(f"http://127.0.0.1:{free_port()}"))
    assert status_of(info.value) == 502


async def test_no_connection_in_time_is_a_connect_timeout_503(client) -> None:
    # A listener with a full accept queue: the kernel drops further SYNs, connect hangs.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    port = lsock.getsockname()[1]
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(httpx.ConnectTimeout) as info:
            await send(client(f"http://127.0.0.1:{port}"))
        assert loop.time() - start < 2.0
        err = map_failure(info.value, "m", "u", S)
        assert err.status == 503 and err.retry_after == 7
    finally:
        for s in (*fillers, lsock):
            s.close()


async def test_no_answer_in_time_is_a_read_timeout_504(client) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        await asyncio.sleep(5)

    async with Upstream(silent) as up:
        with pytest.raises(httpx.ReadTimeout) as info:
            await send(client(up.url))
    assert status_of(info.value) == 504


async def test_body_not_taken_in_time_is_a_write_timeout_504(client) -> None:
    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with Upstream(never_reads) as up:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(httpx.WriteTimeout) as info:
            await send(client(up.url), body=b"x" * (64 * 2**20))
        assert loop.time() - start < 3.0
    assert status_of(info.value) == 504


async def test_server_closing_before_answering_is_a_protocol_error(client) -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)

    async with Upstream(hangs_up) as up:
        with pytest.raises(httpx.RemoteProtocolError):
            await send(client(up.url))


async def test_stream_broken_midway_raises_an_httpx_error(client) -> None:
    async def breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
        await writer.drain()

    async with Upstream(breaks) as up:
        resp = await send(client(up.url))
        got = []
        with pytest.raises(httpx.HTTPError):
            async for chunk in resp.aiter_raw():
                got.append(chunk)
        await resp.aclose()
    assert b"".join(got) == b"data: 1"


@pytest.mark.parametrize(("exc", "want"), [
    (aiohttp.ConnectionTimeoutError("t"), httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError("t"), httpx.ReadTimeout),
    (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError("cut"), httpx.ReadError),
    (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
    (TimeoutError(), httpx.TimeoutException),
])
def test_aiohttp_failures_become_httpx_types(exc: BaseException, want: type) -> None:
    mapped = httpx_error(exc)
    assert type(mapped) is want


# -- streaming, pooling, headers -------------------------------------------------------------


async def test_bytes_arrive_as_sent_and_a_full_read_reuses_the_connection(client) -> None:
    second = asyncio.Event()

    async def paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await up.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
            await writer.drain()
            await second.wait()
            writer.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
            await writer.drain()
            second.clear()

    async with Upstream(paced) as up:
        c = client(up.url)
        for _ in range(2):
            resp = await send(c)
            assert resp.status_code == 200
            assert resp.headers.get("content-type") == "text/event-stream"
            assert (b"transfer-encoding", b"chunked") in [(k.lower(), v)
                                                         for k, v in resp.headers.raw]
            chunks = resp.aiter_raw()
            # the first event is handed over while the upstream still holds the second
            assert await asyncio.wait_for(chunks.__anext__(), 2) == b"data: 1\n\n"
            second.set()
            assert [c async for c in chunks] == [b"data: 2\n\n"]
            await resp.aclose()
        assert up.connections == 1


async def test_dropping_a_response_early_closes_its_connection_at_once(client) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"2\r\nok\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            up.closed.set()

    async with Upstream(endless) as up:
        c = client(up.url)
        resp = await send(c)
        async for _ in resp.aiter_raw():
            break
        await resp.aclose()
        await asyncio.wait_for(up.closed.wait(), 1.0)  # the upstream saw the disconnect


async def test_request_goes_out_as_given(client) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async with Upstream(echo) as up:
        resp = await send(client(up.url), body=b'{"a":1}', path="/v1/completions",
                          params="x=a%2Fb&y=%20")
        assert [c async for c in resp.aiter_raw()] == [b"ok"]
        await resp.aclose()
    head, _, body = up.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/completions?x=a%2Fb&y=%20 HTTP/1.1"
    names = sorted(line.split(b":")[0].lower() for line in lines[1:])
    assert names == [b"content-length", b"content-type", b"host", b"x-request-id"]
    assert body == b'{"a":1}'


async def test_get_reads_the_whole_answer(client) -> None:
    async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    async with Upstream(health) as up:
        resp = await client(up.url).get("/health", timeout=1.0)
    assert resp.status_code == 503 and up.requests[0].startswith(b"GET /health HTTP/1.1")


async def test_upstreams_choose_the_client() -> None:
    assert isinstance(Upstreams(S).client("http://a:1"), AiohttpClient)
    plain = Upstreams(GatewaySettings()).client("http://a:1")
    assert isinstance(plain, httpx.AsyncClient)  # the library default: respx can mock it
    mocked = Upstreams(S, transport_factory=lambda url: httpx.MockTransport(
        lambda r: httpx.Response(200))).client("http://a:1")
    assert isinstance(mocked, httpx.AsyncClient)  # a transport factory always means httpx
    await plain.aclose()
    await mocked.aclose()


@pytest.mark.parametrize(("env", "want"), [({}, "h1"),
                                           ({"GATEWAY_UPSTREAM_CLIENT": "aiohttp"}, "aiohttp"),
                                           ({"GATEWAY_UPSTREAM_CLIENT": "httpx"}, "httpx")])
def test_the_server_uses_h1_unless_told(tmp_path: Path, env: dict[str, str],
                                             want: str) -> None:
    reg = tmp_path / "models.toml"
    reg.write_text('[models.a]\nurl = "http://127.0.0.1:9"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--registry", str(reg), "--port", str(free_port())],
        stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
        env={"PATH": "/usr/bin:/bin", **env})
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"upstream client {want}" in line, line
    finally:
        proc.terminate()
        proc.wait(10)
