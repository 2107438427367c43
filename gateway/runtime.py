"""What one running gateway shares: settings, the routing state in force, the upstream
clients, the replica balancer, metrics, and the fleet (activator, autoscaler, reloader).

`state` is swapped whole (`apply`): handlers read it once per request. The fleet client is
opened lazily, once the registry has a managed model (a registry of remote servers never
touches the fleet), and reopened for a new registry on reload when the opener can.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fleet.registry import Registry
from gateway import auth
from gateway.activation import Activator
from gateway.autoscale import Autoscaler
from gateway.balancer import Balancer
from gateway.metrics import GatewayMetrics, MeteredFleet
from gateway.ports import FleetOpener
from gateway.reload import Reloader
from gateway.scheduler.explain import snapshot
from gateway.scheduler.runtime import Scheduler
from gateway.settings import GatewaySettings
from gateway.state import RoutingState, build_state
from gateway.upstream import TransportFactory, Upstreams


class Runtime:
    """The shared parts of one gateway app (`app.state.gateway`)."""

    def __init__(self, registry: Registry, settings: GatewaySettings,
                 transport_factory: TransportFactory | None = None,
                 fleet_opener: FleetOpener | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 access: auth.Access | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.access = access or auth.Access(auth.KeyRing(), auth.KeyRing())
        self.metrics = GatewayMetrics(self)
        self.upstreams = Upstreams(settings, transport_factory)
        self.balancer = Balancer(clock)
        self.started = int(time.time())
        self.activator: Activator | None = None
        self.autoscaler: Autoscaler | None = None
        self.reloader: Reloader | None = None
        self.fleet_opener = fleet_opener
        # Called when a reload opens the first fleet client while serving (starts idle ttl).
        self.on_activator: Callable[[], None] | None = None
        # The scheduler (gateway/scheduler/), set by create_app unless GATEWAY_SCHEDULER is
        # drain-wait: it owns the per-model figures the state exposes as `admission`.
        self.scheduler: Scheduler | None = None
        self.state: RoutingState = self._build(registry, None)
        self.open_fleet(registry)

    def _build(self, registry: Registry, previous: RoutingState | None) -> RoutingState:
        figures = self.scheduler.core.models if self.scheduler is not None else None
        state = build_state(registry, self.settings, previous, clock=self.clock,
                            base_timeout=self.upstreams.timeout, figures=figures)
        self.upstreams.open(state.table.base_urls())
        return state

    def use_scheduler(self, scheduler: Scheduler) -> None:
        """Admission by `scheduler` from now on (create_app, before serving)."""
        self.scheduler = scheduler
        self.state = self._build(self.state.registry, self.state)

    def apply(self, registry: Registry) -> None:
        """Route by `registry` from now on; replicas and counters of kept models carry over."""
        if self.scheduler is not None:
            self.scheduler.reconfigure(registry)
        self.state = self._build(registry, self.state)
        if self.autoscaler is not None:
            self.autoscaler.set_models(registry.models)

    def reconfigure(self, registry: Registry) -> None:
        """A reload: `apply`, then reopen the fleet client for `registry`."""
        self.apply(registry)
        self.open_fleet(registry, reload=True)
        if self.scheduler is not None:  # the fleet client may be new: models become shared
            self.scheduler.reconfigure(registry)

    def open_fleet(self, registry: Registry, *, reload: bool = False) -> None:
        """Open (or, on reload, reopen for `registry`) the fleet client activations use,
        wrapped to meter activations, evictions and sleeps."""
        opener = self.fleet_opener
        if opener is None or not self.settings.activation:
            return
        if reload:
            rebind = getattr(opener, "for_registry", None)
            if rebind is not None:
                opener = self.fleet_opener = rebind(registry)
            elif self.activator is not None:
                return  # an opener bound to its registry: keep its client
        if self.activator is None and not any(m.managed for m in registry.models.values()):
            return
        assert opener is not None
        fleet = MeteredFleet(opener(self.busy, self.last_used), self.metrics)
        if self.activator is not None:
            self.activator.fleet = fleet
            return
        self.activator = Activator(fleet, timeout=self.settings.activation_timeout,
                                   retry_after=self.settings.retry_after)
        if self.on_activator is not None:  # serving already (a reload added a managed model)
            self.on_activator()

    def scheduler_view(self) -> dict[str, Any] | None:
        """The scheduler as status pages show it; None without one (drain-wait)."""
        if self.scheduler is None:
            return None
        return snapshot(self.scheduler.core, self.clock())

    async def refresh(self) -> None:
        """The fleet changed outside the scheduler (an admin action): let it look again."""
        if self.scheduler is not None:
            await self.scheduler.refresh()

    def asleep(self) -> set[str]:
        """Models the gateway put to sleep (idle ttl, admin)."""
        return self.activator.asleep if self.activator is not None else set()

    # -- figures the fleet, idle ttl and autoscaling read (from worker threads too) --------
    def busy(self, model: str) -> bool:
        """Whether the fleet must not evict `model`. Under the scheduler only requests in
        flight count: it drains a model before it evicts it, and that model's queued
        requests wait for its next turn."""
        adm = self.state.admission.get(model)
        if adm is None:
            return False
        return adm.in_flight > 0 or (self.scheduler is None and adm.waiting > 0)

    def last_used(self, model: str) -> float:
        adm = self.state.admission.get(model)
        return adm.last_used if adm is not None else 0.0

    def idle_for(self, model: str) -> float | None:
        adm = self.state.admission.get(model)
        if adm is None or adm.in_flight or adm.waiting:
            return None
        return self.clock() - adm.last_used

    def load(self, model: str) -> float:
        """In-flight plus queued requests of `model` (what autoscaling samples)."""
        adm = self.state.admission.get(model)
        return float(adm.in_flight + adm.waiting) if adm is not None else 0.0
