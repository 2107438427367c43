"""The splice (gateway/splice.py): a chunked upstream body written straight to the client.

The gateway's own server (`gateway.server.protocol_class`, uvicorn in this process) in front
of a raw-socket upstream: the body arrives byte for byte with the connection still usable, a
client that stops reading pauses the upstream (the gateway buffers nothing), a client that
leaves closes the upstream connection, and an upstream that breaks, sends bad framing or
stalls mid-body ends the answer with an error event in a well-framed body. Every test checks
the splice wrote the body (not the ordinary relay, which gateway/relay.py keeps for other
servers and clients).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import uvicorn

from gateway import splice
from gateway.server import ConnectionLimits, GuardedHttpTools, protocol_class
from gateway.settings import GatewaySettings
from test_upstream_deadlines import CHUNK, EVENT, READ, SSE_HEAD, RawUpstream, answering

pytestmark = [pytest.mark.gateway, pytest.mark.anyio]

MARGIN = 2.0
BODY = {"model": "m", "stream": True, "messages": []}


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes each call of the splice's sink (`Splice.write`, `Splice._write_first` for the
    first arrival) was given."""
    seen: list[int] = []

    def counting(sink: Callable[[splice.Splice, bytes], None]
                 ) -> Callable[[splice.Splice, bytes], None]:
        def counted(self: splice.Splice, data: bytes) -> None:
            seen.append(len(data))
            sink(self, data)
        return counted

    for name in ("write", "_write_first"):
        monkeypatch.setattr(splice.Splice, name, counting(getattr(splice.Splice, name)))
    return seen


class Served:
    """`create_app` for one model at `url`, served by the gateway's server on loopback."""

    def __init__(self, url: str, read: float = READ, client: str = "h1",
                 protocol: type[GuardedHttpTools] = GuardedHttpTools,
                 settings: dict[str, Any] | None = None,
                 limits: ConnectionLimits | None = None) -> None:
        from fleet.registry import parse_registry
        from gateway.app import create_app

        self.app = create_app(parse_registry(f'[models.m]\nurl = "{url}"\n'),
                              GatewaySettings(read_timeout=read, upstream_client=client,
                                              **(settings or {})))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        http = protocol_class(limits or ConnectionLimits(), protocol)
        config = uvicorn.Config(self.app, http=http, lifespan="off", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=2)
        config.load()
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Served:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.server.lifespan = self.server.config.lifespan_class(self.server.config)
        await self.server.startup(sockets=[self.sock])
        await self.server.on_tick(0)  # uvicorn's default headers (date, server), as it serves
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        await self.server.shutdown()
        await self._lifespan.__aexit__(None, None, None)
        self.sock.close()


def events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e]


async def test_a_stream_arrives_byte_for_byte_and_the_connection_stays_usable(
        spliced: list[int]) -> None:
    parts = [b"%x\r\n%s\r\n" % (len(e), e) for e in
             (b"data: 1\n\n", b"data: 22\n\n", b"data: [DONE]\n\n")]
    upstream = answering(SSE_HEAD, parts[0], parts[1] + parts[2], b"0\r\n\r\n", then="close")
    async with (RawUpstream(upstream) as up, Served(up.url) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        r = await client.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200
        assert r.text == "data: 1\n\ndata: 22\n\ndata: [DONE]\n\n"
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["transfer-encoding"] == "chunked"
        # the same connection answers the next request (uvicorn's state is whole)
        health = await client.get("/health")
        assert health.status_code == 200
        assert len(client._transport._pool.connections) == 1  # type: ignore[attr-defined]
    assert spliced == [9, 24]  # what arrived together went out together


class _Counting:
    """The client's transport, counting what is written to it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        if data:
            self.writes.append(data)
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_the_head_and_the_last_chunk_share_the_writes_of_the_bytes_beside_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A head that arrives with the first event leaves with it, and the body's end with the
    last event: three writes to the client for three arrivals (uvicorn made five: the head,
    each event, the last chunk), and uvicorn's state stays whole (the connection is reused)."""
    counted: list[_Counting] = []
    make = splice.splice

    def counting(*args: Any) -> splice.Splice | None:
        made = make(*args)
        if made is not None:
            made.transport = made.cycle.transport = _Counting(made.transport)  # type: ignore
            counted.append(made.transport)  # type: ignore[arg-type]
        return made

    monkeypatch.setattr("gateway.relay.splice", counting)
    parts = [b"%x\r\n%s\r\n" % (len(e), e) for e in
             (b"data: 1\n\n", b"data: 22\n\n", b"data: [DONE]\n\n")]
    upstream = answering(SSE_HEAD + parts[0], parts[1], parts[2] + b"0\r\n\r\n",
                         then="close")
    async with (RawUpstream(upstream) as up, Served(up.url) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        r = await client.post("/v1/chat/completions", json=BODY)
        assert r.text == "data: 1\n\ndata: 22\n\ndata: [DONE]\n\n"
        assert (await client.get("/health")).status_code == 200
        assert len(client._transport._pool.connections) == 1  # type: ignore[attr-defined]
    [transport] = counted
    first, middle, last = transport.writes
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(parts[0])
    assert middle == parts[1]
    assert last == parts[2] + b"0\r\n\r\n"


async def _raw_answer(port: int, close: bool) -> tuple[list[bytes], bytes, bool]:
    """One streamed request on a raw connection: the answer's head lines (date and request
    id without their values), its body, and whether the server closed the connection."""
    body = json.dumps(BODY).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                 b"content-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                 % (len(body), b"connection: close\r\n" if close else b"", body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), MARGIN)
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), MARGIN)
    closed = await asyncio.wait_for(reader.read(1), MARGIN) == b"" if close else False
    writer.close()
    lines = [line.split(b":")[0] if line.startswith((b"date:", b"x-request-id:")) else line
             for line in head.split(b"\r\n")]
    return lines, rest, closed


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
async def test_the_spliced_head_is_the_head_uvicorn_writes(spliced: list[int],
                                                           close: bool) -> None:
    """The splice writes the answer's head itself (without uvicorn's per-header checks): it
    is the head uvicorn writes for the same answer through the ordinary relay (httpx client:
    no splice), `connection: close` included, and the connection ends as uvicorn ends it."""
    parts = [b"%x\r\n%s\r\n" % (len(e), e) for e in (b"data: 1\n\n", b"data: [DONE]\n\n")]
    heads = []
    for client in ("h1", "httpx"):
        upstream = answering(SSE_HEAD + parts[0], parts[1] + b"0\r\n\r\n", then="close")
        async with RawUpstream(upstream) as up, Served(up.url, client=client) as gw:
            heads.append(await _raw_answer(gw.port, close))
    (spliced_head, spliced_body, spliced_closed), (plain_head, plain_body, plain_closed) = heads
    assert spliced_head == plain_head
    assert (b"connection: close" in spliced_head) is close
    assert spliced_body == plain_body == parts[0] + parts[1] + b"0\r\n\r\n"
    assert spliced_closed is plain_closed is close
    assert spliced, "the first answer was not spliced"


async def test_a_client_that_stops_reading_pauses_the_upstream(spliced: list[int]) -> None:
    chunk = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    count = 400  # 25 MiB in all
    written = [0]

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    stop: asyncio.Event) -> None:
        writer.write(SSE_HEAD)
        for _ in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            written[0] += len(chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    # the read timeout counts silence from the model, which a paused stream also is
    async with RawUpstream(flood) as up, Served(up.url, read=60) as gw:
        stalled, received = await read_slowly(gw.port, lambda: written[0])
    assert 0 < stalled < 12 * 1024 * 1024, stalled  # bounded: kernel buffers, no more
    assert received == count * len(chunk) == written[0]
    assert sum(spliced) == received


async def read_slowly(port: int, progress: Callable[[], int]) -> tuple[int, int]:
    """A streamed chat request to the server at `port` from a client with a small receive
    buffer that stops reading once the answer's head is in, until the upstream stops writing
    (`progress()`: the bytes it wrote so far, polled); then the whole chunked body is read.
    Gives what the upstream had written when it stalled, and the body's bytes."""
    payload = json.dumps(BODY).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: "
                     b"application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(payload), payload))
        await reader.readuntil(b"\r\n\r\n")
        reader._transport.pause_reading()  # type: ignore[attr-defined]  # stop reading
        samples = [-1]
        deadline = time.monotonic() + 10
        while samples[-1] != progress():  # poll until the upstream's writing stalls
            assert time.monotonic() < deadline, "the upstream never stalled"
            samples.append(progress())
            await asyncio.sleep(0.3)  # sampling period of the upstream's progress
        stalled = progress()
        reader._transport.resume_reading()  # type: ignore[attr-defined]
        received = 0
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            assert data.endswith(b"\r\n")
            if size == 0:
                break
            received += size
    finally:
        writer.close()
    return stalled, received


async def test_a_client_leaving_mid_stream_closes_the_upstream(spliced: list[int]) -> None:
    # a read timeout far away: only the disconnect can close the upstream in time
    async with RawUpstream(answering(SSE_HEAD, CHUNK)) as up, Served(up.url, read=60) as gw:
        async with (httpx.AsyncClient(base_url=gw.url) as client,
                    client.stream("POST", "/v1/chat/completions", json=BODY) as r):
            async for piece in r.aiter_raw():
                assert piece == EVENT
                break
        await asyncio.wait_for(up.closed.wait(), MARGIN)
    assert spliced == [len(EVENT)]


@pytest.mark.parametrize("tail", [b"ZZZZ\r\n\r\n", b"%x\r\ndata: cut" % len(EVENT), b"stall"])
async def test_an_upstream_failing_mid_body_ends_with_an_error_event(
        spliced: list[int], tail: bytes) -> None:
    parts = (SSE_HEAD, CHUNK) if tail == b"stall" else (SSE_HEAD, CHUNK, tail)
    then = "stall" if tail in (b"stall", b"ZZZZ\r\n\r\n") else "close"
    async with (RawUpstream(answering(*parts, then=then)) as up, Served(up.url) as gw,
                httpx.AsyncClient(base_url=gw.url) as client):
        start = time.monotonic()
        r = await client.post("/v1/chat/completions", json=BODY)  # httpx checks framing
        took = time.monotonic() - start
    assert r.status_code == 200
    got = events(r.text)
    assert got[0] == EVENT.decode().strip()
    error = json.loads(got[-1].removeprefix("data: "))["error"]
    assert error["code"] in (502, 504), error
    assert took < READ + MARGIN
    assert spliced[0] == len(EVENT)

