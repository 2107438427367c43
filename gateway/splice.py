"""Splicing: a relayed body written straight from the upstream connection to the client's.

The ordinary relay (gateway/relay.py) wakes its task for every chunk the upstream sends:
the reader's future, the task's step through the whole chain of ASGI coroutines, one `send`
message, uvicorn's framing. With an `h1` upstream (gateway/h1.py) and a client served by the
gateway's own server (gateway/server.py: its connection is in the scope's extensions), the
relay instead hands the upstream connection a `sink`: `data_received` gives it what llhttp
parsed out of the bytes that arrived, and the sink writes them, framed as one HTTP/1.1 chunk,
to the client's transport. The relay's task sleeps until the body ends, fails or misses a
deadline; it then ends the answer through `send` as before (uvicorn writes the last chunk, or
the relay an error event), so uvicorn's own state stays true.

Fewer writes: the head is sent by `Splice.start`; when body bytes came with the upstream's
head, uvicorn writes the head into a holder and it leaves with them. When the body ends in
the same arrival as its last bytes, the sink adds the last chunk to that write and uvicorn,
told the answer is no longer chunked, ends it without writing anything (a zero-delay
answer: one write to the client, where there were three).

Only when nothing sits between the server and the relay (`send` is uvicorn's own, no
middleware wrapping it), the answer is chunked and the client is still there. Back-pressure:
when the client's transport asks the server to pause writing, the upstream connection stops
reading until it resumes (uvicorn's flow control, one level down). A client that goes away
cancels the relay (below), and the sink writes nothing more from then on.

`on_client_lost`: the same server tells the relay (and the proxy's wait for admission and
the upstream's head) that the client went away, from its `connection_lost`, where a task per
request used to wait on `receive()` for `http.disconnect` (two tasks per request: created,
stepped, cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from gateway.h1 import H1Response
from gateway.h1_conn import Conn

EXTENSION = "gateway.splice"
# Headers that change how uvicorn frames or ends an answer: with any of them it writes the head.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))


def answer_head(status: int, headers: Iterable[tuple[bytes, bytes]], keep_alive: bool,
                chunked: bool) -> bytes:
    """An answer's head as uvicorn writes it: the status line, `headers` as they are (names
    lower-case, values checked by whoever made them), `connection: close` unless
    `keep_alive`, `transfer-encoding: chunked` when `chunked`."""
    parts = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class Paused(Protocol):
    """What the client connection's back-pressure reaches: a splice, or a direct exchange
    (gateway/direct.py)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Tapped(Protocol):
    """What the relay needs of the state it shares with its deadline timer."""

    clock: Callable[[], float]
    last_read: float
    tail: bytes


class Client(Protocol):
    """The client connection, as gateway/server.py offers it in the scope's extensions."""

    transport: asyncio.Transport
    splice: Splice | None
    on_lost: Callable[[], None] | None


class _Held:
    """The client's transport, as uvicorn sees it while it writes a head that is to leave
    with the body's first bytes: what it writes is kept."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class Splice:
    """One relayed body, from `conn` to the client connection of `cycle`."""

    __slots__ = ("client", "conn", "cycle", "ended", "first", "head", "paused", "state",
                 "transport")

    def __init__(self, conn: Conn, client: Client, cycle: RequestResponseCycle, state: Tapped,
                 first: Callable[[], None] | None) -> None:
        self.conn = conn
        self.client = client
        self.cycle = cycle
        self.transport = client.transport
        self.state = state
        self.first = first
        self.paused = False
        self.head = b""  # the answer's head, held to leave with the body's first bytes
        self.ended = False  # the last chunk was written

    async def start(self, send: Send, message: Message) -> bool:
        """Send the answer's head (`message`); False if it is not chunked (then the ordinary
        relay sends the body). When body bytes have arrived already, the head is held and
        leaves with them, in one write instead of two."""
        cycle = self.cycle
        head = None if cycle.flow.write_paused else self._chunked_head(message)
        if head is not None:
            if self.conn.buf:
                self.head = head
            else:
                self.transport.write(head)
            return True
        if not self.conn.buf or cycle.flow.write_paused:
            await send(message)
            return cycle.chunked_encoding is True
        held = _Held()
        cycle.transport = held  # type: ignore[assignment]
        try:
            await send(message)
        finally:
            cycle.transport = self.transport
        if cycle.chunked_encoding is True:
            self.head = held.data
            return True
        self.transport.write(held.data)
        return False

    def _chunked_head(self, message: Message) -> bytes | None:
        """The head uvicorn would write for `message` with a chunked body, its state set as
        its `send` sets it; None where uvicorn is to write it (a length or connection header,
        an answer without a body, uvicorn's access log, a client gone). What it skips is
        uvicorn's check of every name and value against two patterns: the relay's names are
        llhttp's, lower-cased, its values llhttp's or the gateway's own."""
        cycle = self.cycle
        status = message["status"]
        if cycle.access_log or cycle.disconnected or status in (204, 304) \
                or status not in STATUS_LINE:
            return None
        headers = (*cycle.default_headers, *message.get("headers", ()))
        if any(name in _FRAMING for name, _ in headers):
            return None
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        cycle.chunked_encoding = True
        return answer_head(status, headers, cycle.keep_alive, chunked=True)

    def write(self, data: bytes) -> None:
        """The sink: what arrived, as one chunk, to the client (with the last chunk when the
        body ended in the same arrival: one write, where uvicorn would make a second)."""
        if self.cycle.disconnected:
            return
        if self.conn.complete:
            self.ended = True
            self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
        else:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        state = self.state
        state.last_read = state.clock()
        state.tail = data

    def _write_first(self, data: bytes) -> None:
        """`write`, with the held head (if any) in front."""
        self.conn.sink = self.write
        head, self.head = self.head, b""
        if not self.cycle.disconnected:
            self.ended = self.conn.complete
            self.transport.write(b"%b%x\r\n%b\r\n%b" % (
                head, len(data), data, b"0\r\n\r\n" if self.ended else b""))
            state = self.state
            state.last_read = state.clock()
            state.tail = data
        if self.first is not None:
            self.first()

    def pause(self) -> None:
        """The client's transport is full: stop reading the upstream."""
        transport = self.conn.transport
        if not self.paused and transport is not None:
            self.paused = True
            transport.pause_reading()

    def resume(self) -> None:
        transport = self.conn.transport
        if self.paused and transport is not None:
            self.paused = False
            transport.resume_reading()

    async def run(self) -> None:
        """Relay the body until it ends; raise the upstream's failure (httpx's types)."""
        conn = self.conn
        if conn.buf:  # arrived before the sink was set
            self._write_first(conn.take())
        else:
            if self.head:  # not held by `start` without body bytes; written, to be sure
                self.transport.write(self.head)
                self.head = b""
            conn.sink = self._write_first
        self.client.splice = self
        if self.cycle.flow.write_paused:
            self.pause()
        loop = conn.loop
        try:
            while not conn.complete:
                if conn.error is not None:
                    raise conn.error
                conn.waiter = loop.create_future()
                await conn.waiter
        finally:
            conn.sink = None
            if self.client.splice is self:
                self.client.splice = None
            self.resume()
        if self.ended:
            # The last chunk is written: uvicorn is to end the answer without writing it
            # again (unchunked with nothing left to send, it writes b"": no system call).
            self.cycle.chunked_encoding = False


def splice(scope: Scope, send: Send, upstream: Any, state: Tapped,
           first: Callable[[], None] | None) -> Splice | None:
    """A splice for this answer, whose head is not sent yet (`Splice.start` sends it); None
    where it cannot be used."""
    extension = scope.get("extensions", {}).get(EXTENSION)
    if extension is None or not isinstance(upstream, H1Response):
        return None
    client: Client = extension["connection"]
    cycle = getattr(send, "__self__", None)
    if (type(cycle) is not RequestResponseCycle or cycle.transport is not client.transport
            or cycle.response_started or cycle.disconnected or scope["method"] == "HEAD"):
        return None
    return Splice(upstream.conn, client, cycle, state, first)


def on_client_lost(scope: Scope, receive: Receive,
                   callback: Callable[[], None]) -> Callable[[], object] | None:
    """Have the gateway's server call `callback` once if this request's client goes away
    (no task watching `receive`); the function that calls it off. None where the connection
    is not the server's, or already watched: the caller watches `receive` in a task."""
    extension = scope.get("extensions", {}).get(EXTENSION)
    cycle = getattr(receive, "__self__", None)
    if extension is None or type(cycle) is not RequestResponseCycle:
        return None
    client: Client = extension["connection"]
    if cycle.transport is not client.transport or client.on_lost is not None:
        return None
    if cycle.disconnected:  # gone already: as a watching task would, on the next turn
        return asyncio.get_running_loop().call_soon(callback).cancel
    client.on_lost = callback

    def off() -> None:
        if client.on_lost is callback:
            client.on_lost = None

    return off
