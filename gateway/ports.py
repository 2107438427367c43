"""The small interfaces the gateway's parts depend on instead of on each other.

`Runtime` (gateway/runtime.py) provides `AdminTarget` and `ReloadTarget`; `Proxy`
(gateway/proxy.py) provides `Forwarder`; `FleetAdmitter` (gateway/admit.py) is the `Admitter`
the proxy asks for a slot. The admin endpoints, `POST /v1/infer` and hot reload import only
these, so no module of the gateway imports the app that wires it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from fleet.registry import Registry
from gateway.activation import Activator, FleetPort
from gateway.balancer import Balancer
from gateway.body import BodyBudget, Hold
from gateway.metrics import GatewayMetrics
from gateway.routing import Route
from gateway.state import RoutingState


class FleetOpener(Protocol):
    """Opens the fleet client activations use, given the gateway's busy(model) and
    last_used(model) (the fleet asks them before evicting a model).

    An opener may also have `for_registry(registry) -> FleetOpener` (the CLI's does): a
    registry reload then opens the fleet client for the new registry. Without it the client
    opened at start is kept across reloads.
    """

    def __call__(self, busy: Callable[[str], bool],
                 last_used: Callable[[str], float]) -> FleetPort: ...


class Ticket(Protocol):
    """One admitted request's hold on its model: released once its answer is over."""

    def release(self) -> None: ...


class Admitter(Protocol):
    """Who decides when a request to a model may go upstream: the scheduler
    (gateway/scheduler/runtime.py), or the old drain-wait admitter (gateway/admit.py)."""

    async def admit(self, state: RoutingState, route: Route) -> Ticket:
        """Wait until a request to `route` may be sent (a slot, the model awake); the ticket
        is released once its response is done. GatewayError (429, 503) when it may not."""
        ...

    async def revive(self, route: Route, ticket: Ticket) -> Ticket | None:
        """Every replica of `route` failed before answering: make the model serve again and
        return the request's (new) ticket; None when there is no way to (it then fails)."""
        ...


class Forwarder(Protocol):
    """The request path, as `POST /v1/infer` (gateway/compat.py) uses it."""

    budget: BodyBudget  # request body bytes held at once, across all requests

    @property
    def state(self) -> RoutingState: ...

    async def read_body(self, request: Request, hold: Hold | None = None) -> bytes: ...

    async def send(self, request: Request, state: RoutingState, route: Route, method: str,
                   path: str, payload: bytes) -> Response: ...


class ReloadResultLike(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class Reloading(Protocol):
    async def reload(self) -> ReloadResultLike: ...


class AdminTarget(Protocol):
    """What the admin endpoints (gateway/admin.py) read and act through."""

    @property
    def state(self) -> RoutingState: ...

    @property
    def activator(self) -> Activator | None: ...

    @property
    def balancer(self) -> Balancer: ...

    @property
    def reloader(self) -> Reloading | None: ...

    async def refresh(self) -> None:
        """The fleet changed outside the scheduler: it reads the fleet's state again."""
        ...

    def scheduler_view(self) -> dict[str, Any] | None:
        """The scheduler's snapshot (gateway/scheduler/explain.py), None under drain-wait."""
        ...


class ReloadTarget(Protocol):
    """What hot reload (gateway/reload.py) swaps."""

    @property
    def state(self) -> RoutingState: ...

    @property
    def metrics(self) -> GatewayMetrics: ...

    def reconfigure(self, registry: Registry) -> None:
        """Route by `registry` from now on and reopen the fleet client for it."""
        ...
