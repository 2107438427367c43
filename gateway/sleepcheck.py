"""Is a sleep-mode model's engine asleep? (`GET /is_sleeping` on its first replica.)

Something other than the gateway may have put it to sleep (`fleet switch` from the host, say);
vLLM would then hold a request until woken, so the gateway asks first, at most once per
`sleep_check_interval` per model. A replica that does not answer counts as awake: the request
path finds out and reacts.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from gateway.routing import Route
from gateway.settings import GatewaySettings
from gateway.upstream import Upstreams


class SleepCheck:
    def __init__(self, upstreams: Upstreams, settings: GatewaySettings,
                 clock: Callable[[], float]) -> None:
        self.upstreams, self.settings, self.clock = upstreams, settings, clock
        self._seen: dict[str, tuple[float, bool]] = {}  # model -> (checked at, asleep)

    def forget(self, model: str) -> None:
        """The model was just woken: trust that until the next interval."""
        self._seen[model] = (self.clock(), False)

    async def asleep(self, route: Route, sleep_mode: bool) -> bool:
        if not sleep_mode:
            return False
        now = self.clock()
        checked, asleep = self._seen.get(route.model, (float("-inf"), False))
        if now - checked < self.settings.sleep_check_interval:
            return asleep
        client = self.upstreams.client(route.replicas[0])
        request = client.build_request("GET", "/is_sleeping",
                                       timeout=httpx.Timeout(self.settings.health_timeout))
        try:
            resp = await client.send(request, stream=True)
            try:
                body = await resp.aread()
            finally:
                await resp.aclose()
            asleep = resp.status_code == 200 and json.loads(body).get("is_sleeping") is True
        except (httpx.HTTPError, ValueError, AttributeError):
            asleep = False
        self._seen[route.model] = (now, asleep)
        return asleep
