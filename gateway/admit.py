"""The old admitter (`GATEWAY_SCHEDULER=drain-wait`, kept to compare with the scheduler):
per-model limits (`gateway.limits.Admission`) for the slot, then the fleet
(`gateway.activation.Activator`) when the model sleeps.

A model sleeps when the gateway put it to sleep (idle ttl, admin) or when its engine says so:
a sleep-mode model put to sleep by `fleet switch`, say, whose vLLM would hold the request
until woken. The engine is asked (`GET /is_sleeping` on the first replica) at most once per
`sleep_check_interval` per model. `revive` is the last resort of the request path when every
replica failed to connect: one activation, then the replicas are tried again.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.limits import Admission
from gateway.ports import Ticket
from gateway.routing import Route
from gateway.runtime import Runtime
from gateway.sleepcheck import SleepCheck
from gateway.state import RoutingState


class _Slot:
    __slots__ = ("release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release


class FleetAdmitter:
    """`Admitter` over the state's `Admission` and the runtime's `Activator`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.sleep = SleepCheck(runtime.upstreams, runtime.settings, runtime.clock)

    async def admit(self, state: RoutingState, route: Route) -> Ticket:
        admission = state.admission[route.model]
        assert isinstance(admission, Admission)  # this admitter's states hold Admission
        await admission.acquire()
        try:
            activator = self.runtime.activator
            spec = state.registry.models.get(route.model)
            if activator is not None and route.managed and (
                    route.model in activator.asleep or await self.sleep.asleep(
                        route, spec is not None and spec.sleep_mode)):
                await activator.activate(route.model)
                self.sleep.forget(route.model)
        except BaseException:
            admission.release()
            raise
        return _Slot(admission.release)

    async def revive(self, route: Route, ticket: Ticket) -> Ticket | None:
        activator = self.runtime.activator
        if activator is None or not route.managed:
            return None
        await activator.activate(route.model)
        return ticket
