"""The direct path (gateway/direct.py, gateway/server_direct.py), through the gateway's server.

The gateway's server with the direct path (uvicorn in this process, `DirectHttpTools`) in
front of a raw keep-alive upstream that answers each request with the next script. A request
with a pooled connection at hand is served in the callbacks (checked: `Exchange.start` said
yes); the first on a cold pool, and any the direct path declines, takes the ordinary path.
Every outcome the module's docstring lists is driven here: a stream byte for byte and the
connection reused, the same head as the ordinary path, a length-delimited answer, a broken
and a silent body, a head that never comes, a client that leaves, an upstream connection that
was closed while pooled, pipelined requests, keys, back-pressure, and one metering per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, Self

import httpx
import pytest

from gateway import direct
from gateway.server import ConnectionLimits
from gateway.server_direct import DirectHttpTools
from test_splice import Served, _raw_answer, read_slowly
from test_upstream_deadlines import CHUNK, EVENT, MARGIN, SSE_HEAD

pytestmark = [pytest.mark.gateway, pytest.mark.anyio]

BODY = {"model": "m", "stream": True, "messages": []}
ANSWER = [SSE_HEAD + CHUNK, b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"data: [DONE]\n\n"),
                                                        b"data: [DONE]\n\n")]
TEXT = EVENT.decode() + "data: [DONE]\n\n"


class Upstream:
    """A loopback HTTP/1.1 server keeping its connections: each request gets the next
    script of `scripts` (parts written a few ms apart, then `keep`, `close` or `stall`),
    or ANSWER once they are used up."""

    def __init__(self) -> None:
        self.scripts: list[tuple[list[bytes], str]] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self.written = 0  # bytes of answers the kernel took
        self.eof = asyncio.Event()  # a connection the gateway closed while a script stalled
        self.stop = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.stop.set()
        self.server.close()
        await asyncio.sleep(0)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                parts, then = self.scripts.pop(0) if self.scripts else (ANSWER, "keep")
                for i, part in enumerate(parts):
                    if i:
                        await asyncio.sleep(0.02)
                    writer.write(part)
                    await writer.drain()
                    self.written += len(part)
                if then == "close":
                    return
                if then == "stall":
                    eof = asyncio.ensure_future(reader.read())
                    stopped = asyncio.ensure_future(self.stop.wait())
                    await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    if eof.done():
                        self.eof.set()
                    eof.cancel()
                    stopped.cancel()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """What `Exchange.start` answered for each request whose head the direct path wanted."""
    seen: list[bool] = []
    start = direct.Exchange.start

    def recording(self: direct.Exchange) -> bool:
        seen.append(start(self))
        return seen[-1]

    monkeypatch.setattr(direct.Exchange, "start", recording)
    yield seen


def served(up: Upstream, **kwargs: Any) -> Served:
    return Served(up.url, protocol=DirectHttpTools, **kwargs)


async def warm(client: httpx.AsyncClient) -> None:
    """One request through the ordinary path: the upstream connection is pooled after it."""
    r = await client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200 and r.text == TEXT


def requests_total(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("gateway_requests_total{"))


async def test_a_warm_request_is_served_directly_byte_for_byte(taken: list[bool]) -> None:
    async with (Upstream() as up, served(up) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        await warm(client)
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=BODY,
                                  headers={"x-request-id": "mine-1"})
            assert r.status_code == 200 and r.text == TEXT
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-accel-buffering"] == "no"
            assert r.headers["x-request-id"] == "mine-1"
        assert (await client.get("/health")).status_code == 200  # the connection is whole
        assert len(client._transport._pool.connections) == 1  # type: ignore[attr-defined]
        assert requests_total((await client.get("/metrics")).text) == 4
    assert taken == [False, True, True, True]  # cold pool first, then the direct path
    assert up.connections == 1
    assert b"x-request-id: mine-1\r\n" in up.requests[-1]


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
async def test_the_direct_head_is_the_ordinary_head(taken: list[bool], close: bool) -> None:
    heads = []
    for path in (True, False):
        async with Upstream() as up, served(up, settings={"direct_path": path}) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                await warm(client)
            heads.append(await _raw_answer(gw.port, close))
    assert heads[0] == heads[1]
    assert (b"connection: close" in heads[0][0]) is close
    assert taken == [False, True]  # the ordinary app (direct_path off) asked nothing


async def test_a_length_delimited_answer_keeps_its_length(taken: list[bool]) -> None:
    body = json.dumps({"id": "x", "choices": []}).encode()
    async with (Upstream() as up, served(up) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        await warm(client)
        up.scripts.append(([b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n" % len(body), body], "keep"))
        r = await client.post("/v1/chat/completions", json={**BODY, "stream": False})
        assert r.status_code == 200 and r.content == body
        assert r.headers["content-length"] == str(len(body))
        assert "transfer-encoding" not in r.headers
        await warm(client)  # the connection is usable again
    assert taken == [False, True, True]


async def test_a_body_that_breaks_ends_with_an_error_event(taken: list[bool]) -> None:
    async with (Upstream() as up, served(up) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        await warm(client)
        up.scripts.append(([SSE_HEAD + CHUNK], "close"))
        r = await client.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200
        first, error = [e for e in r.text.split("\n\n") if e]
        assert first + "\n\n" == EVENT.decode()
        assert json.loads(error.removeprefix("data: "))["error"]["code"] == 502
        metrics = (await client.get("/metrics")).text
        assert 'gateway_upstream_errors_total{kind="broken_stream",model="m"} 1.0' in metrics
        await warm(client)  # the client connection stays usable
    assert taken[:2] == [False, True]


async def test_a_silent_body_ends_after_the_read_timeout(taken: list[bool]) -> None:
    async with (Upstream() as up, served(up, read=0.4) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        await warm(client)
        up.scripts.append(([SSE_HEAD + CHUNK], "stall"))
        started = time.monotonic()
        r = await client.post("/v1/chat/completions", json=BODY)
        assert 0.4 <= time.monotonic() - started < 0.4 + MARGIN
        *_, error = [e for e in r.text.split("\n\n") if e]
        assert json.loads(error.removeprefix("data: "))["error"]["code"] in (502, 504)
        await asyncio.wait_for(up.eof.wait(), MARGIN)  # the silent connection was closed
    assert taken == [False, True]


async def test_a_head_that_never_comes_is_504(taken: list[bool]) -> None:
    async with (Upstream() as up, served(up, read=0.4) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        await warm(client)
        up.scripts.append(([], "stall"))
        r = await client.post("/v1/chat/completions", json=BODY, headers={"x-request-id": "r5"})
        assert r.status_code == 504
        assert r.headers["x-request-id"] == "r5"
        assert r.json()["error"]["code"] == 504 and "GATEWAY_READ_TIMEOUT" in r.text
        await asyncio.wait_for(up.eof.wait(), MARGIN)
        await warm(client)
    assert taken[:2] == [False, True]


async def test_a_client_that_leaves_closes_the_upstream_and_frees_the_slot(
        taken: list[bool]) -> None:
    async with Upstream() as up, served(up, read=60) as gw:
        async with httpx.AsyncClient(base_url=gw.url) as client:
            await warm(client)
            up.scripts.append(([SSE_HEAD + CHUNK], "stall"))
            async with client.stream("POST", "/v1/chat/completions", json=BODY) as r:
                async for piece in r.aiter_raw():
                    assert piece == EVENT
                    break
        await asyncio.wait_for(up.eof.wait(), MARGIN)
        model = gw.app.state.gateway.scheduler.core.models["m"]
        deadline = time.monotonic() + MARGIN
        while model.in_flight:
            assert time.monotonic() < deadline, "the slot was never released"
            await asyncio.sleep(0.01)
    assert taken == [False, True]


async def test_a_pooled_connection_that_fails_before_answering_falls_back(
        taken: list[bool]) -> None:
    """The upstream closes the pooled connection without answering: the request is given
    to the ordinary path, which opens a new connection and gets the answer."""
    async with (Upstream() as up, served(up) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        await warm(client)
        up.scripts.append(([], "close"))
        r = await client.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200 and r.text == TEXT
        assert requests_total((await client.get("/metrics")).text) == 2
    assert taken == [False, True]
    assert up.connections == 2 and len(up.requests) == 3


@pytest.mark.parametrize("pool", ["warm", "cold"])
async def test_pipelined_requests_are_answered_in_order(taken: list[bool], pool: str) -> None:
    """Behind a direct exchange (warm pool) or behind an ordinary answer (cold pool: the first
    request takes the ordinary path), the next requests wait their turn."""
    async with Upstream() as up, served(up) as gw:
        if pool == "warm":
            async with httpx.AsyncClient(base_url=gw.url) as client:
                await warm(client)
        payload = json.dumps(BODY).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                   b"application/json\r\nx-request-id: p%d\r\ncontent-length: %d\r\n\r\n%s")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"".join(request % (i, len(payload), payload) for i in (1, 2, 3)))
        ids = []
        for _ in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), MARGIN)
            ids += [line for line in head.split(b"\r\n") if line.startswith(b"x-request-id")]
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), MARGIN)
        writer.close()
    assert ids == [b"x-request-id: p1", b"x-request-id: p2", b"x-request-id: p3"]
    assert taken[:2] == ([False, True] if pool == "warm" else [False])


async def test_keys_are_checked_and_not_forwarded(taken: list[bool]) -> None:
    async with (Upstream() as up, served(up, settings={"api_keys": "k1"}) as gw,
                httpx.AsyncClient(base_url=gw.url,
                                  headers={"authorization": "Bearer k1"}) as client):
        await warm(client)
        r = await client.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200 and r.text == TEXT
        refused = await client.post("/v1/chat/completions", json=BODY,
                                    headers={"authorization": "Bearer nope"})
        assert refused.status_code == 401
    assert taken == [False, True, False]  # a refusal is the ordinary path's to answer
    assert all(b"authorization" not in req.lower() for req in up.requests)


async def test_a_client_that_stops_reading_pauses_the_upstream() -> None:
    chunk = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    count = 400  # 25 MiB in all
    parts = [SSE_HEAD] + [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * count + [b"0\r\n\r\n"]
    async with Upstream() as up, served(up, read=60) as gw:
        async with httpx.AsyncClient(base_url=gw.url) as client:
            await warm(client)
        up.scripts.append((parts, "keep"))
        before = up.written
        stalled, received = await read_slowly(gw.port, lambda: up.written - before)
    assert 0 < stalled < 12 * 1024 * 1024, stalled  # bounded: kernel buffers, no more
    assert received == count * len(chunk)



@pytest.mark.parametrize("kept_alive", [False, True], ids=["fresh", "kept-alive"])
async def test_a_late_body_is_408(kept_alive: bool) -> None:
    async with Upstream() as up, served(up, limits=ConnectionLimits(body_timeout=0.3)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        payload = json.dumps(BODY).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                   b"application/json\r\ncontent-length: %d\r\n\r\n" % len(payload))
        if kept_alive:  # one whole request first: uvicorn keeps its answered cycle
            writer.write(request + payload)
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), MARGIN)
        writer.write(request + payload[:5])  # and the rest never comes
        answer = await asyncio.wait_for(reader.read(), 0.3 + MARGIN)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
