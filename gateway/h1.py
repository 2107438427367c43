"""The gateway's own HTTP/1.1 upstream client: asyncio protocols and `httptools` (llhttp, C).

The interface of `gateway.upstream.UpstreamClient`, at a fraction of a general client's cost
per chunk: `data_received` feeds the C parser, whose body callback appends the bytes and wakes
the one reader (or, with a `sink` set by gateway/splice.py, hands them over at once, waking
nobody); what arrived together goes on together. Failures are httpx's types: refused
`ConnectError`, no connection within `connect` `ConnectTimeout`, no free connection within
`pool` (`max_connections` per upstream) `PoolTimeout`, a body not taken within `write`
`WriteTimeout`, no response head within `read` `ReadTimeout`, framing llhttp rejects (at once,
where aiohttp's parser waits forever) or a close before the head `RemoteProtocolError`, a
close mid-body `ReadError`. Silence mid-body is bounded by the reader (the relay's deadline
timer, `aread`, `aiter_raw`). Connections are kept alive (at most `max_keepalive` idle, closed
after `keepalive_expiry`) and reused only after a response was read to its end; one dropped
early is closed at once (vLLM aborts). Reading pauses while more than `h1_conn.HIGH_WATER`
bytes wait for a slow reader (back-pressure to the upstream, flat memory).
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import httpx

from gateway.h1_conn import Conn

_SMALL_BODY = 64 * 1024


class _Headers:
    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.raw if k.lower() == key), default)


class H1Request:
    __slots__ = ("content", "head", "timeout")

    def __init__(self, head: bytes, content: bytes, timeout: httpx.Timeout) -> None:
        self.head, self.content, self.timeout = head, content, timeout


class H1Response:
    """A response whose head has arrived; the body is read with `readany`."""

    __slots__ = ("_client", "_loop", "_released", "conn", "headers", "read_timeout",
                 "status_code", "total_deadline")

    def __init__(self, client: H1Client, conn: Conn, read_timeout: float | None) -> None:
        self._client = client
        self.conn = conn  # the connection the body arrives on (gateway/splice.py: its sink)
        self._loop = conn.loop
        self._released = False
        self.status_code = conn.status
        self.headers = _Headers(conn.headers)
        self.read_timeout = read_timeout
        self.total_deadline: float | None = None

    async def readany(self) -> bytes:
        """Everything received and not taken yet; b"" at the end of the body."""
        conn = self.conn
        while not conn.buf:
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            conn.waiter = self._loop.create_future()
            await conn.waiter
        return conn.take()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while True:
            async with asyncio.timeout(self.read_timeout):
                data = await self.readany()
            if not data:
                return
            yield data

    async def aread(self) -> bytes:
        chunks = []
        try:
            async with asyncio.timeout(self.read_timeout):
                while data := await self.readany():
                    chunks.append(data)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no complete body within {self.read_timeout:g} s") \
                from None
        return b"".join(chunks)

    async def aclose(self) -> None:
        """Back to the pool after a complete, reusable answer; else the connection is
        closed at once (the upstream sees the disconnect)."""
        if self._released:
            return
        self._released = True
        conn = self.conn
        reusable = conn.complete and conn.keep_alive and conn.error is None and not conn.buf
        self._client._release(conn, reusable)


class H1Client:
    """Pooled HTTP/1.1 connections to one upstream base URL (http only)."""

    def __init__(self, base_url: str, timeout: httpx.Timeout, limits: httpx.Limits) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the h1 upstream client speaks plain http only: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._host_header = (parts.netloc).encode("latin-1")
        self.timeout = timeout
        self.max_connections = limits.max_connections or 2**31
        keepalive = limits.max_keepalive_connections
        self.max_keepalive: int = self.max_connections if keepalive is None else keepalive
        self.keepalive_expiry = limits.keepalive_expiry or 4.0
        self._idle: list[Conn] = []
        self._active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._heads: dict[tuple[str, str, str | None], bytes] = {}

    @property
    def is_closed(self) -> bool:
        return self._closed

    def build_request(self, method: str, path: str, *, content: bytes = b"",
                      headers: Sequence[tuple[bytes, bytes]] = (),
                      params: str | None = None,
                      timeout: httpx.Timeout | None = None) -> H1Request:
        key = (method, path, params)
        line = self._heads.get(key)
        if line is None:
            target = self._prefix + path + (f"?{params}" if params else "")
            # the query as Starlette decoded it (UTF-8): the bytes the client sent
            line = f"{method} {target} HTTP/1.1\r\nhost: ".encode() + self._host_header + b"\r\n"
            if len(self._heads) < 256:
                self._heads[key] = line
        parts = [line]
        for k, v in headers:
            parts += (k, b": ", v, b"\r\n")
        if content or method in ("POST", "PUT", "PATCH"):
            parts.append(b"content-length: %d\r\n" % len(content))
        parts.append(b"\r\n")
        return H1Request(b"".join(parts), content, timeout or self.timeout)

    async def send(self, request: H1Request, *, stream: bool = True) -> H1Response:
        """Send and wait for the response head; the body is read by `readany`."""
        timeout = request.timeout
        conn = await self._acquire(timeout)
        try:
            transport = conn.transport
            assert transport is not None
            content = request.content
            if content and len(content) <= _SMALL_BODY:
                transport.write(request.head + content)
            else:
                transport.write(request.head)
                if content:
                    transport.write(content)
                    try:
                        async with asyncio.timeout(timeout.write):
                            await conn.drain()
                    except TimeoutError:
                        raise httpx.WriteTimeout(f"request body not taken within "
                                                 f"{timeout.write:g} s") from None
            if not conn.head and conn.error is None:
                loop = conn.loop
                # a timer on the connection, not asyncio.timeout (a context manager, a timer
                # and a task cancellation per request)
                late = None if timeout.read is None else loop.call_at(
                    loop.time() + timeout.read, conn.head_late, timeout.read)
                try:
                    while not conn.head and conn.error is None:
                        conn.waiter = loop.create_future()
                        await conn.waiter
                finally:
                    if late is not None:
                        late.cancel()
            if conn.error is not None and not conn.head:
                raise conn.error
        except BaseException:
            self._release(conn, False)
            raise
        response = H1Response(self, conn, timeout.read)
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def get(self, path: str, *, timeout: float | httpx.Timeout | None = None
                  ) -> H1Response:
        """A small GET read to its end (health probes), the whole exchange within `timeout`
        (its read timeout, for an `httpx.Timeout`)."""
        if isinstance(timeout, (int, float)):
            timeout = httpx.Timeout(timeout)
        request = self.build_request("GET", path, timeout=timeout)
        limit = request.timeout.read
        try:
            async with asyncio.timeout(limit):
                return await self.send(request, stream=False)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no complete answer within {limit:g} s") from None

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(httpx.PoolTimeout("the client was closed"))

    def take_idle(self, now: float) -> Conn | None:
        """An idle pooled connection, ready for a request (counted active), or None; `now`
        is the loop's time."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.lost or now - conn.idle_since > self.keepalive_expiry:
                if conn.transport is not None:
                    conn.transport.close()
                continue
            conn._reset()
            self._active += 1
            return conn
        return None

    async def _acquire(self, timeout: httpx.Timeout) -> Conn:
        if self._closed:
            raise httpx.ConnectError("the upstream client is closed")
        loop = asyncio.get_running_loop()
        conn = self.take_idle(loop.time())
        if conn is not None:
            return conn
        if self._active >= self.max_connections:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout.pool):
                    await waiter
            except TimeoutError:
                raise httpx.PoolTimeout("no free connection to the upstream within "
                                        f"{timeout.pool:g} s") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            return await self._acquire(timeout)
        self._active += 1
        try:
            async with asyncio.timeout(timeout.connect):
                _, conn = await loop.create_connection(Conn, self.host, self.port)
        except BaseException as exc:
            self._active -= 1
            self._wake_one()
            if isinstance(exc, socket.gaierror):  # e.g. an overlay name not known here yet
                raise httpx.ConnectError(f"the name {self.host!r} does not resolve: {exc}") \
                    from None
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"no connection within {timeout.connect:g} s") \
                    from None
            if isinstance(exc, OSError):
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
            raise
        return conn

    def _release(self, conn: Conn, reusable: bool) -> None:
        self._active -= 1
        if (reusable and not conn.lost and not self._closed
                and len(self._idle) < self.max_keepalive):
            conn.idle_since = conn.loop.time()
            conn.waiter = None
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
