"""The routing state: one immutable snapshot of what the gateway routes by.

`build_state` derives it from a registry: the routing table, each model's replicas
(`Instance`), its admission (in-flight count, queue, limits), its upstream timeouts and its
idle ttl. A reload builds a new state and swaps it in with one assignment
(`Runtime.apply`); a handler reads the state once and works with that snapshot, so a reload
landing mid-request never mixes two registries.

Kept models carry their `Instance` and `Admission` objects over to the new state (outstanding
requests, ejections, in-flight counts and queues survive a reload); a kept model's admission
takes the new limits, the one change `build_state` makes to the previous state's objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx

from fleet.registry import ModelSpec, Registry
from gateway.balancer import Instance
from gateway.limits import Admission
from gateway.routing import RoutingTable
from gateway.settings import GatewaySettings


@dataclass(frozen=True, slots=True)
class RoutingState:
    """What one request routes by. Never changed after `build_state`: a reload swaps it."""

    table: RoutingTable
    instances: Mapping[str, tuple[Instance, ...]]
    admission: Mapping[str, LoadFigures]  # the scheduler's per-model figures (or Admission)
    timeouts: Mapping[str, httpx.Timeout | None]  # None: the upstream clients' own
    ttl: Mapping[str, float]                      # managed models with an idle ttl

    @property
    def registry(self) -> Registry:
        return self.table.registry

    def aliases(self, model: str) -> tuple[str, ...]:
        spec = self.registry.models.get(model)
        return spec.aliases if spec is not None else ()


class LoadFigures(Protocol):
    """A model's live figures: `gateway.scheduler`'s per-model record, or the drain-wait
    admitter's `gateway.limits.Admission`."""

    in_flight: int

    @property
    def waiting(self) -> int: ...

    @property
    def last_used(self) -> float: ...

    @property
    def max_concurrency(self) -> int | None: ...

    @property
    def max_queue(self) -> int: ...


def build_state(registry: Registry, settings: GatewaySettings, previous: RoutingState | None,
                *, clock: Callable[[], float], base_timeout: httpx.Timeout,
                figures: Mapping[str, LoadFigures] | None = None) -> RoutingState:
    """The state for `registry`; kept models of `previous` keep their replicas and admission.

    `base_timeout` is the upstream clients' timeout, which a model's `connect_timeout` or
    `read_timeout` overrides in part.
    """
    table = RoutingTable(registry, settings.upstream_host)
    instances: dict[str, tuple[Instance, ...]] = {}
    admission: dict[str, LoadFigures] = {}
    timeouts: dict[str, httpx.Timeout | None] = {}
    for name, route in table.routes.items():
        spec = registry.models[name]
        old = {i.base_url: i for i in previous.instances.get(name, ())} if previous else {}
        instances[name] = tuple(old.get(url) or Instance(name, idx, url)
                                for idx, url in enumerate(route.replicas))
        if figures is not None and name in figures:
            admission[name] = figures[name]
        else:
            kept = previous.admission.get(name) if previous else None
            adm = kept if isinstance(kept, Admission) else Admission(name, None, 0, 1.0, clock)
            adm.max_concurrency, adm.max_queue = spec.max_concurrency, spec.max_queue
            adm.queue_timeout = spec.queue_timeout
            admission[name] = adm
        timeouts[name] = _timeout(spec, base_timeout)
    ttl = {n: m.ttl for n, m in registry.models.items() if m.ttl and m.managed}
    return RoutingState(table, instances, admission, timeouts, ttl)


def _timeout(spec: ModelSpec, base: httpx.Timeout) -> httpx.Timeout | None:
    if not (spec.connect_timeout or spec.read_timeout):
        return None
    return httpx.Timeout(connect=spec.connect_timeout or base.connect,
                         read=spec.read_timeout or base.read, write=base.write, pool=base.pool)
