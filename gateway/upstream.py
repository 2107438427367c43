"""One pooled client per upstream instance, and the mapping of transport failures.

Clients are made when the app starts (never per request) and closed when it stops. Every
client has explicit connect, read, write and pool timeouts from the settings.

Three implementations of one small interface (`UpstreamClient`, below: the slice of
`httpx.AsyncClient` the app uses), all raising httpx's exception types, so the failure
mapping below, the relay and the app's failover are the same for each:

- `gateway.h1.H1Client` (`upstream_client="h1"`, what `python -m gateway` uses): the
  gateway's own HTTP/1.1 client, the least CPU per relayed chunk; plain http only;
- `gateway.upstream_aiohttp.AiohttpClient` (`"aiohttp"`, and https models under `"h1"`);
- `httpx.AsyncClient` (`"httpx"`, the library default, and always when a `transport_factory`
  is given, e.g. respx or ASGI transports in tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Protocol

import httpx

from gateway import errors
from gateway.h1 import H1Client
from gateway.settings import GatewaySettings
from gateway.upstream_aiohttp import AiohttpClient as AiohttpClient
from gateway.upstream_aiohttp import aiohttp_available as aiohttp_available
from gateway.upstream_aiohttp import httpx_error as httpx_error

TransportFactory = Callable[[str], httpx.AsyncBaseTransport]


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
        self.use_h1 = transport_factory is None and settings.upstream_client == "h1"
        # h1 speaks plain http: https upstreams get aiohttp (or httpx without it)
        self.use_aiohttp = transport_factory is None and (
            settings.upstream_client == "aiohttp" or (self.use_h1 and aiohttp_available()))
        if settings.upstream_client == "aiohttp" and self.use_aiohttp and not aiohttp_available():
            raise RuntimeError("upstream_client='aiohttp' needs the aiohttp package "
                               "(pip install aiohttp) or GATEWAY_UPSTREAM_CLIENT=httpx")
        self._clients: dict[str, UpstreamClient] = {}

    def open(self, base_urls: Iterable[str]) -> None:
        for url in base_urls:
            self.client(url)

    def client(self, base_url: str) -> UpstreamClient:
        client = self._clients.get(base_url)
        if client is None:
            if self.use_h1 and base_url.startswith("http://"):
                client = H1Client(base_url, self.timeout, self.limits)
            elif self.use_aiohttp:
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


def map_failure(exc: httpx.HTTPError, model: str, url: str, settings: GatewaySettings,
                timeout: httpx.Timeout | None = None) -> errors.GatewayError:
    """The client-facing error for a failure before any upstream response byte arrived.
    `timeout`: the model's own timeouts (registry), when it has them; the message states the
    limit that applied. `url` and the client library's text go to the log only."""
    own = timeout is not None
    connect = (timeout.connect if timeout is not None else None) or settings.connect_timeout
    read = (timeout.read if timeout is not None else None) or settings.read_timeout
    if isinstance(exc, httpx.ConnectTimeout):
        return errors.upstream_not_ready(model, url, f"no connection within {connect:g} s",
                                         settings.retry_after)
    if isinstance(exc, httpx.PoolTimeout):
        return errors.upstream_not_ready(model, url, "all connections to it are busy",
                                         settings.retry_after)
    if isinstance(exc, httpx.ReadTimeout):
        return errors.upstream_timeout(model, url, read, f"`read_timeout` of `{model}` in the "
                                       f"registry" if own else "GATEWAY_READ_TIMEOUT")
    if isinstance(exc, httpx.WriteTimeout):
        return errors.upstream_timeout(model, url, settings.write_timeout,
                                       "GATEWAY_WRITE_TIMEOUT")
    if isinstance(exc, httpx.TimeoutException):
        return errors.upstream_timeout(model, url, None)
    if isinstance(exc, httpx.ConnectError):
        detail = str(exc) if "does not resolve" in str(exc) else "connection refused"
    else:
        detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
    return errors.upstream_refused(model, url, detail)


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
