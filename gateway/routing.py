"""The routing table: model name or alias -> the route to the replicas that serve it (derived
from the registry)."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.cluster import node_urls
from fleet.registry import Registry, replica_urls


@dataclass(frozen=True, slots=True)
class Route:
    """Where requests for one registry model go."""

    model: str                    # the registry name
    base_url: str                 # the first replica, e.g. http://127.0.0.1:8001
    replicas: tuple[str, ...]     # every replica's base URL
    upstream_model: str           # the `model` value the upstream expects
    served_names: frozenset[str]  # names the upstream answers to (no body rewrite needed)
    managed: bool


class RoutingTable:
    """Resolves a requested name (model name or alias) to its `Route`."""

    def __init__(self, registry: Registry, upstream_host: str = "127.0.0.1") -> None:
        self.registry = registry
        self.routes: dict[str, Route] = {}
        for name, spec in registry.models.items():
            if registry.swarm and spec.managed:  # each replica's port on each allowed node
                urls = tuple(node_urls(registry.nodes, spec))
            else:
                urls = tuple(replica_urls(registry, spec, upstream_host))
            self.routes[name] = Route(
                model=name,
                base_url=urls[0],
                replicas=urls,
                upstream_model=spec.upstream_model,
                served_names=frozenset(spec.served_names),
                managed=spec.managed,
            )
        self._by_name: dict[str, Route] = {
            key: self.routes[spec.name] for key, spec in registry.alias_table().items()
        }

    def resolve(self, requested: str) -> Route | None:
        return self._by_name.get(requested)

    def names(self) -> list[str]:
        """Every name and alias a client may use."""
        return list(self._by_name)

    def base_urls(self) -> set[str]:
        return {url for route in self.routes.values() for url in route.replicas}
