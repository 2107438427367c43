"""One pooled httpx client per upstream instance, and the mapping of transport failures.

Clients are made when the app starts (never per request) and closed when it stops. Every
client has explicit connect, read, write and pool timeouts from the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import httpx

from gateway import errors
from gateway.settings import GatewaySettings

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
                                   keepalive_expiry=30.0)
        self._transport_factory = transport_factory
        self._clients: dict[str, httpx.AsyncClient] = {}

    def open(self, base_urls: Iterable[str]) -> None:
        for url in base_urls:
            self.client(url)

    def client(self, base_url: str) -> httpx.AsyncClient:
        client = self._clients.get(base_url)
        if client is None:
            transport = self._transport_factory(base_url) if self._transport_factory else None
            client = httpx.AsyncClient(base_url=base_url, timeout=self.timeout, limits=self.limits,
                                       transport=transport, follow_redirects=False, trust_env=False)
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
