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

import json
from collections.abc import Callable

import httpx

from gateway.limits import Admission
from gateway.ports import Ticket
from gateway.routing import Route
from gateway.runtime import Runtime
from gateway.state import RoutingState


class _Slot:
    __slots__ = ("release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release


class FleetAdmitter:
    """`Admitter` over the state's `Admission` and the runtime's `Activator`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._sleep_seen: dict[str, tuple[float, bool]] = {}  # model -> (checked at, asleep)

    async def admit(self, state: RoutingState, route: Route) -> Ticket:
        admission = state.admission[route.model]
        assert isinstance(admission, Admission)  # this admitter's states hold Admission
        await admission.acquire()
        try:
            activator = self.runtime.activator
            if activator is not None and route.managed and (
                    route.model in activator.asleep or await self._engine_asleep(state, route)):
                await activator.activate(route.model)
                self._sleep_seen[route.model] = (self.runtime.clock(), False)
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

    async def _engine_asleep(self, state: RoutingState, route: Route) -> bool:
        """Whether a sleep-mode model's engine sleeps (cached per model for
        `sleep_check_interval`); a replica that does not answer counts as awake."""
        spec = state.registry.models.get(route.model)
        if spec is None or not spec.sleep_mode:
            return False
        settings, now = self.runtime.settings, self.runtime.clock()
        checked, asleep = self._sleep_seen.get(route.model, (float("-inf"), False))
        if now - checked < settings.sleep_check_interval:
            return asleep
        client = self.runtime.upstreams.client(route.replicas[0])
        request = client.build_request("GET", "/is_sleeping",
                                       timeout=httpx.Timeout(settings.health_timeout))
        try:
            resp = await client.send(request, stream=True)
            try:
                body = await resp.aread()
            finally:
                await resp.aclose()
            asleep = resp.status_code == 200 and json.loads(body).get("is_sleeping") is True
        except (httpx.HTTPError, ValueError, AttributeError):
            asleep = False  # not answering: the request path finds out and reacts
        self._sleep_seen[route.model] = (now, asleep)
        return asleep
