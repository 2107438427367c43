"""The gateway's background tasks, started with the app and cancelled when it stops:

- the probe loop: every `probe_interval`, ejected replicas whose /health answers 200 are
  brought back;
- the idle loop (`gateway.activation.idle_loop`, drain-wait admitter only), once a fleet
  client exists: models idle for their ttl are put to sleep; it reads the ttl of the routing
  state in force, so a reload changes it, and a reload that adds the first managed model
  starts it. Under the scheduler (which decides idle ttl itself) its place is taken by the
  scheduler's view of the fleet (`observe_loop`: `fleet status` every `observe_interval`);
- the autoscaler, when a fleet client exists and a managed model is autoscaled;
- SIGHUP (when asked for): a registry reload, in a task.
Finished tasks (a reload, say) are dropped from the set the app cancels at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    ItemsView,
    Iterator,
    Mapping,
)
from typing import Any, cast

from gateway.activation import idle_loop
from gateway.autoscale import Autoscaler, ScalingFleet
from gateway.runtime import Runtime

log = logging.getLogger("gateway")


class Background:
    """Starts and stops the background tasks of one runtime."""

    def __init__(self, runtime: Runtime, healthy: Callable[[str], Awaitable[bool]], *,
                 reload_on_sighup: bool = False) -> None:
        self.runtime = runtime
        self.healthy = healthy
        self.reload_on_sighup = reload_on_sighup
        self.tasks: set[asyncio.Task[None]] = set()
        self._idle_task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The tasks run inside this context; on exit they are cancelled and awaited."""
        loop = asyncio.get_running_loop()
        self._spawn(self._probe_loop())
        self.start_idle_loop()
        self._start_autoscaler()
        self.runtime.on_activator = self.start_idle_loop
        sighup = self.reload_on_sighup and self.runtime.reloader is not None
        if sighup:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            yield
        finally:
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            self.runtime.on_activator = None
            tasks, self.tasks, self._idle_task = list(self.tasks), set(), None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.runtime.scheduler is not None:
                await self.runtime.scheduler.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def start_idle_loop(self) -> None:
        """Idle ttl: one loop over the ttl of the routing state in force (reloads included).
        Under the scheduler, idle ttl is its decision; this starts its view of the fleet."""
        activator = self.runtime.activator
        if activator is None or self._idle_task is not None:
            return
        scheduler = self.runtime.scheduler
        if scheduler is not None:
            self._idle_task = self._spawn(scheduler.observe_loop(
                self.runtime.settings.observe_interval))
            return
        self._idle_task = self._spawn(idle_loop(
            activator, _CurrentTtl(self.runtime), self.runtime.idle_for,
            self.runtime.settings.idle_check_interval))

    def _start_autoscaler(self) -> None:
        """Replica autoscaling, when a fleet is configured and a model is autoscaled."""
        rt = self.runtime
        if rt.activator is None or rt.autoscaler is not None:
            return
        models = rt.state.registry.models
        if not any(m.autoscaled and m.managed for m in models.values()):
            return
        fleet = cast(ScalingFleet, rt.activator.fleet)  # the fleet client scales too
        rt.autoscaler = Autoscaler(
            fleet, models, rt.load, lambda m: rt.state.instances.get(m, ()),
            clock=rt.clock, scale_timeout=rt.settings.activation_timeout)
        self._spawn(rt.autoscaler.run(rt.settings.autoscale_interval))

    def _on_sighup(self) -> None:
        reloader = self.runtime.reloader
        if reloader is None:
            return
        log.info("SIGHUP: reloading the registry")
        self._spawn(reloader.reload_quietly())

    async def _probe_loop(self) -> None:
        """Bring ejected replicas back once their /health answers 200."""
        while True:
            await asyncio.sleep(self.runtime.settings.probe_interval)
            for replicas in self.runtime.state.instances.values():
                for inst in replicas:
                    if inst.failures and await self.healthy(inst.base_url):
                        self.runtime.balancer.restore(inst)


class _CurrentTtl(Mapping[str, float]):
    """The idle loop's view of the ttl of the routing state in force (a reload changes it)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def __getitem__(self, model: str) -> float:
        return self._runtime.state.ttl[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._runtime.state.ttl)

    def __len__(self) -> int:
        return len(self._runtime.state.ttl)

    def items(self) -> ItemsView[str, float]:
        return self._runtime.state.ttl.items()  # one state's: stable while the loop awaits
