"""Where the fleet reaches its models when it does not run on the Docker host itself.

The fleet probes each replica at `fleet.observe.base_url`: the registry's `host_ip` and the
replica's published port, which is right for the `fleet` CLI on the host. Inside the compose
gateway's container that address is the gateway itself; there each replica is reached on the
compose network by its service name (`vllm-<name>`, `vllm-<name>-r<i>`), exactly as the
gateway's own traffic goes (`fleet.registry.replica_urls` with the same upstream host).

`AddressedProbe` wraps a `Probe` and rewrites each host address to the replica's address for
the configured upstream host (`FLEET_UPSTREAM_HOST`: `service` for compose, or any host name),
so health waits, sleep and wake reach the same server the gateway routes to. The mapping is
built from the registry alone (no guessing by port); an address it does not know is passed
through unchanged.
"""

from __future__ import annotations

from fleet.health import HealthResult, Probe
from fleet.observe import base_url
from fleet.registry import Registry, replica_urls

HOST_ADDRESSING = "127.0.0.1"


def address_map(registry: Registry, upstream_host: str) -> dict[str, str]:
    """Host base URL -> base URL through `upstream_host`, for every managed replica slot."""
    out: dict[str, str] = {}
    for m in registry.models.values():
        if not m.managed:
            continue
        for i, url in enumerate(replica_urls(registry, m, upstream_host)):
            out[base_url(registry, m, i)] = url
    return out


class AddressedProbe:
    """A `Probe` that reaches each replica through `upstream_host` instead of the host port."""

    def __init__(self, inner: Probe, registry: Registry, upstream_host: str) -> None:
        self.inner = inner
        self.upstream_host = upstream_host
        self._map = address_map(registry, upstream_host)

    def url(self, host_url: str) -> str:
        return self._map.get(host_url, host_url)

    def health(self, base_url: str) -> HealthResult:
        return self.inner.health(self.url(base_url))

    def is_sleeping(self, base_url: str) -> bool | None:
        return self.inner.is_sleeping(self.url(base_url))

    def sleep(self, base_url: str, level: int = 1) -> None:
        self.inner.sleep(self.url(base_url), level=level)

    def wake_up(self, base_url: str) -> None:
        self.inner.wake_up(self.url(base_url))


def addressed(probe: Probe, registry: Registry, upstream_host: str | None) -> Probe:
    """`probe` itself for the host's addresses (None, '' or 127.0.0.1), else wrapped."""
    if not upstream_host or upstream_host == HOST_ADDRESSING:
        return probe
    return AddressedProbe(probe, registry, upstream_host)
