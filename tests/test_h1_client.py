"""The gateway's own HTTP/1.1 upstream client (`gateway.h1.H1Client`) over real sockets.

The same behaviours as the aiohttp client's (tests/test_upstream_client.py, imported and run
here with an `H1Client`): httpx's exception types for every failure, bytes relayed as they
arrive, the connection reused after a full read and closed at once when a response is dropped,
no header the caller did not send; plus what only this client does: back-pressure on a slow
reader, the pool's limit, and direct delivery to a sink.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from gateway.h1 import H1Client
from gateway.settings import GatewaySettings
from gateway.upstream import Upstreams
from test_upstream_client import (  # noqa: F401  (re-run here with the h1 client)
    Upstream,
    send,
    test_body_not_taken_in_time_is_a_write_timeout_504,
    test_bytes_arrive_as_sent_and_a_full_read_reuses_the_connection,
    test_dropping_a_response_early_closes_its_connection_at_once,
    test_get_reads_the_whole_answer,
    test_no_answer_in_time_is_a_read_timeout_504,
    test_no_connection_in_time_is_a_connect_timeout_503,
    test_refused_is_a_connect_error_502,
    test_request_goes_out_as_given,
    test_server_closing_before_answering_is_a_protocol_error,
    test_stream_broken_midway_raises_an_httpx_error,
)

pytestmark = [pytest.mark.gateway, pytest.mark.anyio]

S = GatewaySettings(connect_timeout=0.3, read_timeout=0.5, write_timeout=0.3, pool_timeout=0.3,
                    retry_after=7, upstream_client="h1", max_connections=2)


@pytest.fixture
async def client() -> AsyncIterator[Callable[[str], H1Client]]:
    made: list[H1Client] = []

    def make(url: str) -> H1Client:
        c = Upstreams(S).client(url)
        assert isinstance(c, H1Client)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.aclose()


async def test_https_upstreams_get_another_client() -> None:
    ups = Upstreams(S)
    assert not isinstance(ups.client("https://example.invalid:1"), H1Client)
    await ups.aclose()


async def test_a_name_that_does_not_resolve_says_so(client) -> None:
    """Not "connection refused": on a Swarm overlay a name may not be known yet."""
    c = client("http://vft-no-such-host.invalid:8000")
    with pytest.raises(httpx.ConnectError, match=r"'vft-no-such-host\.invalid' does not resolve"):
        await c.send(c.build_request("GET", "/health"))


async def test_a_slow_reader_pauses_the_upstream(client) -> None:
    sent = 0
    blocked = asyncio.Event()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = b"x" * 65536
        try:
            while sent < 64 * 2**20:
                writer.write(b"10000\r\n" + piece + b"\r\n")
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except TimeoutError:
                    blocked.set()  # the client stopped reading
                    await asyncio.sleep(5)
                    return
                sent += len(piece)
        except ConnectionError:
            pass

    async with Upstream(firehose) as up:
        resp = await send(client(up.url))
        await asyncio.wait_for(blocked.wait(), 10)
        assert sent < 16 * 2**20  # bounded by the socket buffers and the high-water mark
        await resp.aclose()


async def test_the_pool_limit_makes_requests_wait_then_time_out(client) -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: one request after another
            try:
                await up.read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"ok")
            await writer.drain()

    async with Upstream(slow) as up:
        c = client(up.url)
        held = [await send(c), await send(c)]  # max_connections=2, both bodies unread
        with pytest.raises(httpx.PoolTimeout):
            await send(c)
        release.set()
        for r in held:
            assert await r.aread() == b"ok"
            await r.aclose()
        third = await send(c)  # a connection came back to the pool
        release.set()
        await third.aclose()


@pytest.mark.parametrize(("answer", "body", "reused"), [
    (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", b"until the end", False),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok", b"ok", False),
    (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", b"ok", False),
], ids=["until close", "204", "close after length", "http/1.0"])
async def test_bodies_framed_every_way_are_read_whole(client, answer: bytes, body: bytes,
                                                      reused: bool) -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await up.read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(answer)
            await writer.drain()
            if b"close" in answer or b"HTTP/1.0" in answer:
                return

    async with Upstream(once) as up:
        c = client(up.url)
        for _ in range(2):
            resp = await send(c)
            assert await resp.aread() == body
            await resp.aclose()
        assert up.connections == (1 if reused else 2)


async def test_a_query_goes_out_byte_for_byte(client) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await up.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    async with Upstream(echo) as up:
        resp = await send(client(up.url), params="q=caf\u00e9&x=%20\u4e2d")
        await resp.aclose()
    assert up.requests[0].split(b"\r\n")[0] == (
        "POST /v1/chat/completions?q=caf\u00e9&x=%20\u4e2d HTTP/1.1".encode())
