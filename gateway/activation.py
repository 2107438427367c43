"""On-demand activation and idle time-to-live, through the fleet's Python API.

A request for a managed model that is not awake waits while the fleet brings it up (the same
switch path, lock and planner as `fleet switch`); concurrent requests for that model share
one activation. The fleet refuses to evict a model with requests in flight: the activation
then waits for those to drain and tries again until its deadline, after which the request
gets 503 with Retry-After and the reason. Idle models with a `ttl` are put to sleep (or
stopped when they have no sleep mode) by a background loop.

The fleet's calls block (Docker, health polls), so they run in worker threads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

import anyio

from fleet.errors import ModelsBusy
from gateway import errors

log = logging.getLogger("gateway.activation")


class FleetPort(Protocol):
    """What the gateway needs of the fleet (fleet.api.FleetClient provides it)."""

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: Collection[str] | None = None) -> object:
        """Bring `model` up; with `evict`, the only models the fleet may evict."""
        ...

    def sleep(self, model: str) -> object: ...


class Activator:
    """Shares one activation per model among the requests that wait for it."""

    def __init__(self, fleet: FleetPort, *, timeout: float, retry_after: int,
                 drain_poll: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self.timeout = timeout
        self.retry_after = retry_after
        self.drain_poll = drain_poll
        self.clock = clock
        self._pending: dict[str, asyncio.Task[None]] = {}
        self.activations = 0          # completed activation attempts (for metrics and tests)
        self.asleep: set[str] = set()  # models the gateway itself put to sleep

    def pending(self, model: str) -> bool:
        return model in self._pending

    async def activate(self, model: str) -> None:
        """Return when `model` is awake; GatewayError 503 when it cannot be made so in time."""
        task = self._pending.get(model)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._run(model))
            self._pending[model] = task
            task.add_done_callback(lambda _t: self._pending.pop(model, None))
        # A waiter that goes away (client disconnect) must not cancel the shared activation.
        await asyncio.shield(task)

    async def _run(self, model: str) -> None:
        deadline = self.clock() + self.timeout
        started = self.clock()
        while True:
            remaining = deadline - self.clock()
            try:
                await anyio.to_thread.run_sync(
                    functools.partial(self.fleet.ensure_awake, model,
                                      timeout=max(1.0, remaining)),
                    abandon_on_cancel=True)
                self.asleep.discard(model)
                self.activations += 1
                log.info("activated %s in %.1f s", model, self.clock() - started)
                return
            except Exception as exc:  # the fleet's errors carry the reason to show
                reason = str(exc).strip() or type(exc).__name__
                if isinstance(exc, ModelsBusy) and self.clock() + self.drain_poll < deadline:
                    await asyncio.sleep(self.drain_poll)  # let the models in the way drain
                    continue
                log.warning("activation of %s failed: %s", model, reason)
                kind = ("the models in its way are busy" if isinstance(exc, ModelsBusy) else
                        "the fleet's planner refused it" if getattr(exc, "violations", None)
                        else None)
                raise errors.activation_failed(model, self.timeout, reason, self.retry_after,
                                               kind) from None

    async def put_to_sleep(self, model: str) -> None:
        await anyio.to_thread.run_sync(lambda: self.fleet.sleep(model))
        self.asleep.add(model)


async def idle_loop(activator: Activator, ttl: Mapping[str, float],
                    idle_for: Callable[[str], float | None], interval: float) -> None:
    """Every `interval` s, put to sleep each model idle (no request in flight) for its ttl.

    `idle_for(model)` is the seconds since its last request ended, or None while busy.
    """
    while True:
        await asyncio.sleep(interval)
        for model, seconds in ttl.items():
            idle = idle_for(model)
            if (idle is None or idle < seconds or model in activator.asleep
                    or activator.pending(model)):
                continue
            try:
                await activator.put_to_sleep(model)
                log.info("model %s idle for %.0f s (ttl %g s): put to sleep", model, idle, seconds)
            except Exception as exc:
                log.warning("idle ttl: could not put %s to sleep: %s", model, exc)
