"""The routing table: model name or alias -> the route to the replicas that serve it (derived
from the registry).

Where a managed model is reached: on one host, at `upstream_host` (`127.0.0.1` beside the
containers, `service` inside compose: `vllm-<name>`); on a Swarm, at its port on every node it
may run on (host-mode published ports), or, for a gateway on the Swarm's overlay network
(`[cluster] network`) with `upstream_host` `service`, by name on that network (each replica
answers to `vllm-<name>`, `vllm-<name>-r<i>` there: `fleet.swarm_spec`).
"""

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
            if registry.swarm and spec.managed and upstream_host != "service":
                urls = tuple(node_urls(registry.nodes, spec))  # its port on each allowed node
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


def addressing_problem(registry: Registry, upstream_host: str) -> str | None:
    """Why `registry`'s managed models cannot be reached at `upstream_host`, or None."""
    if (registry.swarm and upstream_host == "service"
            and not (registry.cluster and registry.cluster.network)):
        return ("GATEWAY_UPSTREAM_HOST=service reaches a Swarm's models by name on its overlay "
                "network, and [cluster] sets no `network`: add `network = \"NAME\"` (an "
                "attachable overlay network the gateway's container joins) to [cluster], or "
                "unset GATEWAY_UPSTREAM_HOST to reach the models on the nodes' published ports")
    return None
