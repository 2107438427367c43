"""One pooled client per upstream instance, and the mapping of transport failures.

Clients are made when the app starts (never per request) and closed when it stops. Every
client has explicit connect, read, write and pool timeouts from the settings.

Two implementations of one small interface (the slice of `httpx.AsyncClient` the app uses:
`build_request`, `send(stream=True)`, `get`, and on responses `status_code`, `headers.raw`,
`headers.get`, `aiter_raw()`, `aclose()`):

- `httpx.AsyncClient` (`upstream_client="httpx"`, and always when a `transport_factory` is
  given, e.g. respx or ASGI transports in tests);
- `AiohttpClient` (`upstream_client="aiohttp"`, what `python -m gateway` uses when aiohttp is
  installed): about 4x less CPU per streamed request. Its `aiter_raw()` hands over everything
  that has arrived when the relay asks (a burst of SSE events becomes one write to the client,
  nothing waits for more), and it raises httpx's exception types, so the failure mapping
  below, the relay and the app's failover are the same for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import httpx

from gateway import errors
from gateway.settings import GatewaySettings

try:
    import aiohttp
    import yarl
except ImportError:  # pragma: no cover - exercised only without aiohttp
    aiohttp = None  # type: ignore[assignment]

TransportFactory = Callable[[str], httpx.AsyncBaseTransport]


def aiohttp_available() -> bool:
    return aiohttp is not None


class Upstreams:
    """Owns the pooled upstream clients, keyed by base URL."""

    def __init__(self, settings: GatewaySettings,
                 transport_factory: TransportFactory | None = None) -> None:
        self.settings = settings
        self.timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout,
                                     write=settings.write_timeout, pool=settings.pool_timeout)
        self.limits = httpx.Limits(max_connections=settings.max_connections,
                                   max_keepalive_connections=settings.max_keepalive,
                                   keepalive_expiry=settings.keepalive_expiry)
        self._transport_factory = transport_factory
        self.use_aiohttp = (transport_factory is None and settings.upstream_client == "aiohttp")
        if self.use_aiohttp and aiohttp is None:
            raise RuntimeError("upstream_client='aiohttp' needs the aiohttp package "
                               "(pip install aiohttp) or GATEWAY_UPSTREAM_CLIENT=httpx")
        self._clients: dict[str, UpstreamClient] = {}

    def open(self, base_urls: Iterable[str]) -> None:
        for url in base_urls:
            self.client(url)

    def client(self, base_url: str) -> UpstreamClient:
        client = self._clients.get(base_url)
        if client is None:
            if self.use_aiohttp:
                client = AiohttpClient(base_url, self.timeout, self.limits)
            else:
                transport = self._transport_factory(base_url) if self._transport_factory else None
                client = httpx.AsyncClient(base_url=base_url, timeout=self.timeout,
                                           limits=self.limits, transport=transport,
                                           follow_redirects=False, trust_env=False)
            self._clients[base_url] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def map_failure(exc: httpx.HTTPError, model: str, url: str,
                settings: GatewaySettings) -> errors.GatewayError:
    """The client-facing error for a failure before any upstream response byte arrived."""
    if isinstance(exc, httpx.ConnectTimeout):
        return errors.upstream_not_ready(model, url, f"no connection within "
                                         f"{settings.connect_timeout:g} s", settings.retry_after)
    if isinstance(exc, httpx.PoolTimeout):
        return errors.upstream_not_ready(model, url, "all connections to it are busy",
                                         settings.retry_after)
    if isinstance(exc, httpx.ReadTimeout):
        return errors.upstream_timeout(model, url, settings.read_timeout)
    if isinstance(exc, httpx.WriteTimeout):
        return errors.upstream_timeout(model, url, settings.write_timeout)
    if isinstance(exc, httpx.TimeoutException):
        return errors.upstream_timeout(model, url, None)
    detail = "connection refused" if isinstance(exc, httpx.ConnectError) else (
        type(exc).__name__ + (f": {exc}" if str(exc) else ""))
    return errors.upstream_refused(model, url, detail)


# -- the aiohttp client ------------------------------------------------------------------------


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
    """A streamed upstream response: `status_code`, `headers`, `aiter_raw()`, `aclose()`."""

    __slots__ = ("_resp", "headers", "status_code")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status_code: int = resp.status
        self.headers = _Headers(resp.raw_headers, resp.headers)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, transfer coding removed, content coding kept; each item
        is everything received so far that the relay has not taken yet."""
        content = self._resp.content
        with _as_httpx_errors():
            while True:
                data = await content.readany()
                if not data:
                    return
                yield data

    async def aread(self) -> bytes:
        with _as_httpx_errors():
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

    def _client_timeout(self, timeout: httpx.Timeout) -> aiohttp.ClientTimeout:
        key = (timeout.connect, timeout.read, timeout.write, timeout.pool)
        found = self._timeouts.get(key)
        if found is None:
            # `connect` bounds the wait for a pooled connection plus a new connection's set-up;
            # `sock_connect` the set-up alone; `sock_read` the gap between two reads.
            pool_and_connect = None if timeout.connect is None else (
                timeout.connect + (timeout.pool or 0.0))
            found = aiohttp.ClientTimeout(total=None, connect=pool_and_connect,
                                          sock_connect=timeout.connect, sock_read=timeout.read)
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
        """Send and wait for the response head; the body is read by `aiter_raw`."""
        session = self._get_session()
        timeout: httpx.Timeout = request.timeout
        content: bytes = request.content
        data: bytes | _TimedBody | None = content or None
        if len(content) > _SMALL_BODY:
            data = _TimedBody(content, timeout.write)
        with _as_httpx_errors():
            resp = await session.request(
                request.method, request.url, data=data, headers=request.headers,
                allow_redirects=False, compress=None, timeout=self._client_timeout(timeout))
        response = AiohttpResponse(resp)
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def get(self, path: str, *, timeout: float | httpx.Timeout | None = None
                  ) -> AiohttpResponse:
        """A small GET read to its end (health probes)."""
        if isinstance(timeout, (int, float)):
            timeout = httpx.Timeout(timeout)
        request = self.build_request("GET", path, timeout=timeout)
        return await self.send(request, stream=False)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()



class UpstreamHeaders(Protocol):
    @property
    def raw(self) -> Sequence[tuple[bytes, bytes]]: ...

    def get(self, name: str, default: str | None = None, /) -> str | None: ...


class UpstreamResponse(Protocol):
    """What the gateway reads of an upstream response (`httpx.Response`, `AiohttpResponse`)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> UpstreamHeaders: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    """The slice of `httpx.AsyncClient` the gateway uses (`AiohttpClient` has it too). A
    request from `build_request` is only ever given back to the same client's `send`."""

    def build_request(self, method: str, path: str, /, *, content: bytes = ...,
                      headers: Sequence[tuple[bytes, bytes]] = ..., params: str | None = ...,
                      timeout: httpx.Timeout = ...) -> Any: ...

    async def send(self, request: Any, /, *, stream: bool = ...) -> UpstreamResponse: ...

    async def get(self, path: str, /, *, timeout: float | httpx.Timeout | None = ...
                  ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...
