"""What the dashboard reads: the `DashboardSource` protocol.

The routes (`gateway.ui.routes`) depend on this protocol only. `gateway.ui.live.GatewaySource`
implements it over today's gateway (admission, replicas, activator, metrics, the fleet client);
a scheduler can implement it (or feed that one) with its own queues, states, quanta and switch
history. Actions (switch, wake, sleep, reload) are not part of it: the page calls the admin
API (`/admin/...`) with the admin key, so there is one action path and its answers and
errors are shown exactly as the API gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.auth import Principal
from gateway.ui.snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class LogLines:
    """The last lines a model's replica printed (oldest first)."""

    model: str
    replica: int
    lines: tuple[str, ...]


class DashboardSource(Protocol):
    """Figures for the dashboard, filtered for one viewer."""

    async def snapshot(self, principal: Principal | None) -> Snapshot:
        """The fleet now, with only the models `principal` may use (None: the gateway is
        open, every model). Must be cheap: the page asks about once a second."""
        ...

    async def log_lines(self, model: str, n: int, replica: int = 0) -> LogLines:
        """The last `n` log lines of `model` (a name or alias). Admins only: the routes check.
        Raises `gateway.errors.GatewayError` (unknown model 404, a remote model 400, no fleet
        or no way to read logs 409, the fleet failing 503)."""
        ...
