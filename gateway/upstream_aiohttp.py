"""The aiohttp upstream client (`upstream_client="aiohttp"`; https models under "h1").

`AiohttpClient` has the interface of `gateway.upstream.UpstreamClient` and raises httpx's
exception types, so the failure mapping, the relay and the failover treat it as any client.
Its `readany()` hands over everything that has arrived when the relay asks (a burst of SSE
events becomes one write to the client, nothing waits for more).

Deadlines the gateway owns, not aiohttp (its C parser waits forever on a chunk-size line that
is not hex, whatever its read timeout): the wait for a response head is bounded by connect +
pool + write + read timeouts (one timer per request; with a body over 64 KiB: the write
timeout, then aiohttp's sock_read), a probe (`get`) by its timeout over the whole exchange,
`aread` by the read timeout, and a relayed body by the relay's read-deadline timer
(`AiohttpResponse.read_timeout`, see `gateway.relay`). aiohttp's own `sock_read` timer is off
otherwise: it was re-armed on every received chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

try:
    import aiohttp
    import yarl
except ImportError:  # pragma: no cover - exercised only without aiohttp
    aiohttp = None  # type: ignore[assignment]


def aiohttp_available() -> bool:
    return aiohttp is not None


def httpx_error(exc: BaseException) -> httpx.HTTPError | None:
    """The httpx exception that stands for an aiohttp (or asyncio timeout) failure."""
    if aiohttp is None:  # pragma: no cover
        return None
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(exc, _WriteTimeout):
        return httpx.WriteTimeout(message)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return httpx.TimeoutException(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError)):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
        return httpx.ReadError(message)
    if isinstance(exc, aiohttp.ClientError):
        return httpx.TransportError(message)
    return None


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except (TimeoutError, aiohttp.ClientError, _WriteTimeout) as exc:
        mapped = httpx_error(exc)
        if mapped is None:  # pragma: no cover
            raise
        raise mapped from exc


class _WriteTimeout(asyncio.TimeoutError):
    """The request body was not taken by the upstream within the write timeout."""


# A body up to this size goes out in one non-blocking write with the head (aiohttp drains only
# above 64 KiB); a bigger one is written under the write timeout, which aiohttp lacks.
_SMALL_BODY = 64 * 1024


if aiohttp is not None:
    class _TimedBody(aiohttp.BytesPayload):
        """A request body whose writing must finish within `write_timeout` seconds (aiohttp
        arms its read timeout only once the body is out: a stalled upload would hang)."""

        def __init__(self, value: bytes, write_timeout: float | None) -> None:
            super().__init__(value)
            self.write_timeout = write_timeout

        async def write_with_length(self, writer: Any, content_length: int | None) -> None:
            try:
                async with asyncio.timeout(self.write_timeout):
                    await super().write_with_length(writer, content_length)
            except TimeoutError:
                raise _WriteTimeout(f"request body not taken within {self.write_timeout} s") \
                    from None


class _Headers:
    """What the relay reads of response headers: the raw pairs and a lookup."""

    __slots__ = ("_proxy", "raw")

    def __init__(self, raw: Sequence[tuple[bytes, bytes]], proxy: Any) -> None:
        self.raw = raw
        self._proxy = proxy

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._proxy.get(name, default)  # type: ignore[no-any-return]


class AiohttpRequest:
    """A request built by `AiohttpClient.build_request`, sent by its `send`."""

    __slots__ = ("content", "headers", "method", "timeout", "url")

    def __init__(self, method: str, url: Any, content: bytes, headers: Any,
                 timeout: Any) -> None:
        self.method, self.url, self.content = method, url, content
        self.headers, self.timeout = headers, timeout


class AiohttpResponse:
    """A streamed upstream response: `status_code`, `headers`, `aiter_raw()`, `aclose()`;
    for the relay also `readany()` (aiohttp's errors: `map_error`), `read_timeout` (the
    longest silence allowed between two reads) and `total_deadline` (loop time, or None)."""

    __slots__ = ("_resp", "headers", "read_timeout", "readany", "status_code",
                 "total_deadline")

    def __init__(self, resp: aiohttp.ClientResponse, read_timeout: float | None = None) -> None:
        self._resp = resp
        self.status_code: int = resp.status
        self.headers = _Headers(resp.raw_headers, resp.headers)
        self.read_timeout = read_timeout
        self.total_deadline: float | None = None
        # Everything received so far that was not taken yet (b"" at the end), raising
        # aiohttp's errors: what the relay's loop awaits, one call per chunk.
        self.readany: Callable[[], Awaitable[bytes]] = resp.content.readany

    @staticmethod
    def map_error(exc: BaseException) -> httpx.HTTPError | None:
        return httpx_error(exc)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, transfer coding removed, content coding kept; each item
        is everything received so far that the relay has not taken yet."""
        content = self._resp.content
        with _as_httpx_errors():
            while True:
                async with asyncio.timeout(self.read_timeout):
                    data = await content.readany()
                if not data:
                    return
                yield data

    async def aread(self) -> bytes:
        """The whole body, within the read timeout."""
        with _as_httpx_errors():
            async with asyncio.timeout(self.read_timeout):
                return await self._resp.read()

    async def aclose(self) -> None:
        """Back to the pool if the body was read to its end; else close the connection at
        once, so the upstream sees the disconnect (vLLM aborts the generation)."""
        resp = self._resp
        if resp.content.is_eof() and not resp.content.exception():
            resp.release()
        else:
            resp.close()


class AiohttpClient:
    """A pooled aiohttp session to one upstream base URL, with httpx's timeouts."""

    def __init__(self, base_url: str, timeout: httpx.Timeout, limits: httpx.Limits) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._urls: dict[str, yarl.URL] = {}
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _client_timeout(self, timeout: httpx.Timeout, sock_read: bool = False
                        ) -> aiohttp.ClientTimeout:
        key = (timeout.connect, timeout.read, timeout.write, timeout.pool, sock_read)
        found = self._timeouts.get(key)
        if found is None:
            # `connect` bounds the wait for a pooled connection plus a new connection's set-up;
            # `sock_connect` the set-up alone. Reads are bounded by the gateway's own deadlines
            # (`send`, `AiohttpResponse`, the relay); aiohttp's `sock_read` (re-armed on every
            # received chunk) only for requests with a big body, whose head deadline it is.
            pool_and_connect = None if timeout.connect is None else (
                timeout.connect + (timeout.pool or 0.0))
            found = aiohttp.ClientTimeout(total=None, connect=pool_and_connect,
                                          sock_connect=timeout.connect,
                                          sock_read=timeout.read if sock_read else None)
            self._timeouts[key] = found
        return found

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made inside the running loop, on first use
            connector = aiohttp.TCPConnector(
                limit=self.limits.max_connections or 0, limit_per_host=0,
                keepalive_timeout=self.limits.keepalive_expiry or 4.0,
                ttl_dns_cache=10)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), timeout=self._client_timeout(self.timeout),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                raise_for_status=False)
        return self._session

    def _url(self, path: str, params: str | None) -> yarl.URL:
        key = path if not params else f"{path}?{params}"
        url = self._urls.get(key)
        if url is None:
            url = yarl.URL(self.base_url + key, encoded=True)  # the query exactly as received
            if len(self._urls) < 256:
                self._urls[key] = url
        return url

    def build_request(self, method: str, path: str, *, content: bytes = b"",
                      headers: Sequence[tuple[bytes, bytes]] = (),
                      params: str | None = None,
                      timeout: httpx.Timeout | None = None) -> AiohttpRequest:
        hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        return AiohttpRequest(method, self._url(path, params), content, hdrs,
                              timeout or self.timeout)

    async def send(self, request: AiohttpRequest, *, stream: bool = True) -> AiohttpResponse:
        """Send and wait for the response head, within connect + pool + write + read
        timeouts whatever the parser does; the body is read by `readany`/`aiter_raw`."""
        session = self._get_session()
        timeout: httpx.Timeout = request.timeout
        data: bytes | _TimedBody | None = request.content or None
        big = len(request.content) > _SMALL_BODY
        if big:
            # Written under the write timeout, then aiohttp's sock_read bounds the head.
            data = _TimedBody(request.content, timeout.write)
        head_deadline = None if big else _head_deadline(timeout)
        try:
            with _as_httpx_errors():
                async with asyncio.timeout(head_deadline):
                    resp = await session.request(
                        request.method, request.url, data=data, headers=request.headers,
                        allow_redirects=False, compress=None,
                        timeout=self._client_timeout(timeout, sock_read=big))
        except httpx.TimeoutException as exc:
            if type(exc) is httpx.TimeoutException:  # our deadline, not one of aiohttp's
                raise httpx.ReadTimeout(f"no response head within {head_deadline} s") from None
            raise
        response = AiohttpResponse(resp, timeout.read)
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def get(self, path: str, *, timeout: float | httpx.Timeout | None = None
                  ) -> AiohttpResponse:
        """A small GET read to its end (health probes): the whole exchange within `timeout`
        (its read timeout, for an `httpx.Timeout`), however the upstream misbehaves."""
        if isinstance(timeout, (int, float)):
            timeout = httpx.Timeout(timeout)
        request = self.build_request("GET", path, timeout=timeout)
        limit = request.timeout.read
        try:
            with _as_httpx_errors():
                async with asyncio.timeout(limit):
                    return await self.send(request, stream=False)
        except httpx.TimeoutException as exc:
            if type(exc) is httpx.TimeoutException:
                raise httpx.ReadTimeout(f"no complete answer within {limit:g} s") from None
            raise

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _head_deadline(timeout: httpx.Timeout) -> float | None:
    """Seconds from sending a request to its response head: every phase's limit added."""
    parts = (timeout.connect, timeout.pool, timeout.write, timeout.read)
    if timeout.read is None:
        return None
    return sum(p for p in parts if p is not None)
