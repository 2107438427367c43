"""The fleet's status rows for the dashboard, refreshed in the background.

The fleet's status probes Docker and every model's /health (seconds, at worst), so a page's
request never waits for it: a background refresh keeps a copy at most `max_age` seconds old
while someone watches, and a finished switch makes the copy outdated at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

FLEET_STATUS_TIMEOUT = 15.0  # seconds: the fleet probes Docker and every model's /health


class FleetStatusCache:
    """The fleet's status rows, refreshed in the background while they are asked for."""

    def __init__(self, max_age: float = 2.0, timeout: float = FLEET_STATUS_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.max_age = max_age
        self.timeout = timeout
        self.clock = clock
        self.wall = wall
        self.rows: list[dict[str, Any]] | None = None
        self.error: str | None = None
        self.taken_at = float("-inf")    # monotonic time the rows arrived
        self.asked_at = float("-inf")    # wall time the fleet was asked for them
        self._task: asyncio.Task[None] | None = None

    def age(self) -> float:
        """Seconds since the rows arrived."""
        return max(self.clock() - self.taken_at, 0.0)

    async def get(self, fleet: Any, changed_at: float = float("-inf"), wait: float = 2.0
                  ) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The rows and the last error. Starts a refresh when they are older than max_age, or
        were asked for before `changed_at` (wall time of the last switch: the page must not
        show a finished switch's model as stopped); waits up to `wait` s for that refresh
        then, and for the very first rows."""
        status = getattr(fleet, "status", None)
        if status is None:
            return None, None
        outdated = self.asked_at < changed_at
        if (outdated or self.age() >= self.max_age) and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh(status))
        if (outdated or (self.rows is None and self.error is None)) and self._task is not None:
            with anyio.move_on_after(wait):
                await asyncio.shield(self._task)
        return self.rows, self.error

    async def _refresh(self, status: Callable[[], Sequence[Any]]) -> None:
        asked = self.wall()
        try:
            with anyio.fail_after(self.timeout):
                rows = await anyio.to_thread.run_sync(status, abandon_on_cancel=True)
            self.rows = [r.as_dict() if hasattr(r, "as_dict") else dict(r) for r in rows]
            self.error = None
        except TimeoutError:
            self.error = f"the fleet did not answer within {self.timeout:g} s"
        except Exception as exc:  # Docker unreachable...: shown, never raised
            self.error = f"the fleet's status failed: {str(exc).strip() or type(exc).__name__}"
        finally:
            self.taken_at, self.asked_at = self.clock(), asked
            self._task = None
