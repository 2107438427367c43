"""The scheduler in the gateway: the `Admitter` the proxy asks, carrying out the core's actions.

Each request is an `Arrive` event; the core answers at once (admitted: the fast path, no
future, no task) or later (the request waits on a future until an `Admit` or `Reject` action
names it). A client that goes away while waiting (the proxy cancels the wait) is a `Leave`.
Switches and idle sleeps run through the fleet in worker threads (its calls block: Docker,
health polls) and come back as `SwitchDone`/`SwitchFailed`/`SleepDone` with the fleet's own
phase timings, which the core keeps as switch costs. A timer sends `Tick` at the core's next
wake-up (a deadline, a quantum, a ttl). The fleet's view (`status`) is read at start and
every `observe_interval` seconds, so a `fleet switch` from the host is seen.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from fleet.cluster import planning_node
from fleet.errors import PlacementRefused
from fleet.placement import check_placement
from fleet.registry import Registry
from gateway import errors
from gateway.activation import Activator
from gateway.ports import Ticket as TicketLike
from gateway.routing import Route
from gateway.scheduler.core import SchedulerCore
from gateway.scheduler.events import (
    Action,
    Admit,
    Arrive,
    Done,
    Drain,
    Event,
    Leave,
    Lost,
    Observed,
    PutToSleep,
    Reject,
    Residency,
    SleepDone,
    StartSwitch,
    SwitchDone,
    SwitchFailed,
    Tick,
    Undrain,
)
from gateway.scheduler.model import ModelPolicy, SchedulerConfig
from gateway.settings import GatewaySettings
from gateway.sleepcheck import SleepCheck
from gateway.state import RoutingState

log = logging.getLogger("gateway.scheduler")
_ANSWERS = (Admit, Reject)
_TURNS = (Drain, Undrain)

_STATES = {"healthy": Residency.AWAKE, "running": Residency.AWAKE, "loading": Residency.AWAKE,
           "drifted": Residency.AWAKE, "sleeping": Residency.ASLEEP,
           "stopped": Residency.STOPPED, "absent": Residency.ABSENT}


def _states(rows: Iterable[Any]) -> dict[str, Residency]:
    """Model -> residency from the fleet's status rows (one per replica: `name`, `state`);
    a model is awake when any of its replicas is."""
    states: dict[str, Residency] = {}
    for row in rows:
        state = _STATES.get(str(getattr(row, "state", "")))
        name = getattr(row, "name", None) or getattr(row, "model", None)
        if state is None or not isinstance(name, str):
            continue
        if states.get(name) is not Residency.AWAKE:
            states[name] = state
    return states


@dataclass(frozen=True)
class ModelLoad:
    """A model's figures as the rest of the gateway reads them."""

    in_flight: int
    waiting: int
    last_used: float
    max_concurrency: int | None
    max_queue: int


def policies(registry: Registry, settings: GatewaySettings, shared: bool) -> list[ModelPolicy]:
    """The scheduler's view of each model of `registry`."""
    out = []
    for name, spec in registry.models.items():
        out.append(ModelPolicy(
            name, shared=shared and spec.managed, max_concurrency=spec.max_concurrency,
            max_queue=spec.max_queue, queue_timeout=spec.queue_timeout,
            switch_timeout=settings.activation_timeout,
            priority=spec.priority, pinned=spec.pinned, quantum=spec.quantum,
            ttl=spec.ttl if spec.managed else None,
            evicts_to=Residency.ASLEEP if spec.sleep_mode else Residency.STOPPED,
            # on a Swarm each node takes its own turns (one host: one group)
            group=(planning_node(registry.nodes, spec) or "") if registry.swarm else ""))
    return out


def placement(registry: Registry) -> Callable[[frozenset[str]], list[str]]:
    """The core's `fits`: the fleet planner's rules for models awake together."""
    def fits(names: frozenset[str]) -> list[str]:
        return [v.message for v in check_placement(registry, sorted(names))]
    return fits


class Ticket:
    """One admitted request: `release()` once its answer is over; `revive()` when every
    replica refused it (the model is not up after all): back in line, keeping its place."""

    __slots__ = ("arrived", "model", "rid", "scheduler")

    def __init__(self, scheduler: Scheduler, rid: int, model: str, arrived: float) -> None:
        self.scheduler, self.rid, self.model, self.arrived = scheduler, rid, model, arrived

    def release(self) -> None:
        s = self.scheduler
        s.apply(s.core.handle(Done(s.clock(), self.rid)))


class Scheduler:
    """The gateway's `Admitter` over a `SchedulerCore`."""

    def __init__(self, settings: GatewaySettings, state: RoutingState,
                 activator: Callable[[], Activator | None],
                 clock: Callable[[], float] = time.monotonic,
                 config: SchedulerConfig | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self._activator = activator
        self.core = SchedulerCore(
            policies(state.registry, settings, activator() is not None),
            placement(state.registry), now=clock(), config=config or SchedulerConfig(
                quantum_floor=settings.quantum_floor, switch_share=settings.switch_share,
                idle_grace=settings.idle_grace))
        self._rids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Action]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_action: Callable[[Action], None] | None = None  # metrics, dashboards
        self.sleep_check: SleepCheck | None = None  # set by create_app

    # -- the Admitter protocol ------------------------------------------------------------
    async def admit(self, state: RoutingState, route: Route) -> Ticket:
        m = self.core.models.get(route.model)
        if (self.sleep_check is not None and m is not None and m.policy.shared
                and m.state is Residency.AWAKE and m.policy.evicts_to is Residency.ASLEEP
                and await self.sleep_check.asleep(route, True)):
            # put to sleep behind the gateway's back (vLLM would hold the request): say so
            self.apply(self.core.handle(Observed(self.clock(), {route.model: Residency.ASLEEP})))
        now = self.clock()
        rid = next(self._rids)
        actions = self.core.handle(Arrive(now, rid, route.model))
        ticket = self._admitted(actions, rid, route.model, now)
        if ticket is not None:
            return ticket  # the fast path
        return await self._wait(rid, route.model, now, actions)

    def can_admit_now(self, model: str) -> bool:
        """Whether `admit` would admit a request for `model` at once, without a fleet check:
        awake, a free slot, nobody in its line, and not a sleep-mode model (`admit` asks the
        engine about those first). Changes nothing (gateway/direct.py asks before deciding)."""
        m = self.core.models.get(model)
        return not (m is None or m.state is not Residency.AWAKE or m.queue or not m.has_room()
                    or (self.sleep_check is not None and m.policy.shared
                        and m.policy.evicts_to is Residency.ASLEEP))

    def admit_now(self, route: Route) -> Ticket:
        """The admission `can_admit_now` promised (nothing may have run in between)."""
        now = self.clock()
        rid = next(self._rids)
        ticket = self._admitted(self.core.handle(Arrive(now, rid, route.model)), rid,
                                route.model, now)
        assert ticket is not None  # the core's own rule
        return ticket

    def _admitted(self, actions: list[Action], rid: int, model: str,
                  now: float) -> Ticket | None:
        """The ticket when the core's answer to request `rid`'s arrival (`actions`) admits it
        at once, else None (it waits, or is refused)."""
        if len(actions) == 1 and isinstance(actions[0], Admit) and actions[0].rid == rid:
            if self.on_action is not None:
                self.on_action(actions[0])
            self._rearm()
            return Ticket(self, rid, model, now)
        return None

    async def revive(self, route: Route, ticket: TicketLike) -> Ticket | None:
        """Every replica refused `ticket`'s request: the model is down. Back in line (its
        first arrival keeps its place); the core brings the model up again."""
        m = self.core.models.get(route.model)
        if not isinstance(ticket, Ticket) or m is None or not m.policy.shared:
            return None
        now = self.clock()
        self.apply(self.core.handle(Lost(now, ticket.model)))
        ticket.release()
        rid = next(self._rids)
        actions = self.core.handle(Arrive(now, rid, ticket.model, arrived=ticket.arrived))
        return await self._wait(rid, ticket.model, ticket.arrived, actions)

    def load(self, model: str) -> ModelLoad | None:
        m = self.core.models.get(model)
        if m is None:
            return None
        return ModelLoad(m.in_flight, len(m.queue), max(m.last_demand, m.last_done, 0.0),
                         m.policy.max_concurrency, m.policy.max_queue)

    # -- configuration --------------------------------------------------------------------
    def reconfigure(self, registry: Registry) -> None:
        shared = self._activator() is not None
        self.apply(self.core.set_models(policies(registry, self.settings, shared),
                                        placement(registry), now=self.clock()))

    async def refresh(self) -> None:
        """Read the fleet's state now (after an admin switch, wake or sleep)."""
        states = await self._fleet_states()
        if states:
            self.apply(self.core.handle(Observed(self.clock(), states)))

    async def observe_loop(self, interval: float) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- carrying out actions -------------------------------------------------------------
    async def _wait(self, rid: int, model: str, arrived: float,
                    actions: list[Action]) -> Ticket:
        future: asyncio.Future[Action] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = future
        self.apply(actions)
        try:
            outcome = await future
        except asyncio.CancelledError:  # the client went away (or shutdown)
            self._waiters.pop(rid, None)
            if future.done() and not future.cancelled() and isinstance(future.result(), Admit):
                self.apply(self.core.handle(Done(self.clock(), rid)))
            else:
                self.apply(self.core.handle(Leave(self.clock(), rid)))
            raise
        if isinstance(outcome, Reject):
            raise errors.GatewayError(outcome.status, outcome.message,
                                      retry_after=outcome.retry_after)
        return Ticket(self, rid, model, arrived)

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, _ANSWERS):
                future = self._waiters.pop(action.rid, None)
                if future is not None and not future.done():
                    future.set_result(action)
            elif isinstance(action, StartSwitch):
                self._spawn(self._switch(action))
            elif isinstance(action, PutToSleep):
                self._spawn(self._sleep(action))
            elif isinstance(action, _TURNS):
                log.info("%s %s: %s", type(action).__name__.lower(), action.model, action.reason)
            if self.on_action is not None:
                self.on_action(action)
        self._rearm()

    def _rearm(self) -> None:
        wake = self.core.next_wakeup()
        if self._timer is not None:
            if wake is not None and abs(self._timer.when() - self._loop_time(wake)) < 1e-3:
                return
            self._timer.cancel()
            self._timer = None
        if wake is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._loop_time(wake), self._tick)

    def _loop_time(self, at: float) -> float:
        loop = asyncio.get_running_loop()
        return loop.time() + max(0.0, at - self.clock()) + 1e-3

    def _tick(self) -> None:
        self._timer = None
        self.apply(self.core.handle(Tick(self.clock())))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _switch(self, action: StartSwitch) -> None:
        activator = self._activator()
        started = self.clock()
        event: Event
        log.info("switch to %s (%s): %s", action.target, action.kind, action.reason)
        if activator is None:
            self.apply(self.core.handle(SwitchFailed(self.clock(), action.target,
                                                     "no fleet is configured")))
            return
        timeout = self.settings.activation_timeout
        try:
            report = await anyio.to_thread.run_sync(
                lambda: _ensure_awake(activator, action.target, timeout, action.evict),
                abandon_on_cancel=True)
        except Exception as exc:
            reason = str(exc).strip() or type(exc).__name__
            observed = await self._fleet_states() if isinstance(exc, PlacementRefused) else {}
            retry = any(state.holds and not self.core.models[name].state.holds
                        for name, state in observed.items() if name in self.core.models)
            log.warning("switch to %s failed%s: %s", action.target,
                        " (the fleet saw other models awake: replanning)" if retry else "",
                        reason)
            event = SwitchFailed(self.clock(), action.target, reason, observed=observed,
                                 retry=retry)
        else:
            timings = getattr(report, "timings", None) or {}
            total = self.clock() - started
            evict = float(timings.get("evict", 0.0))
            bring_up = max(0.0, float(timings.get("total", total)) - evict)
            activator.asleep.discard(action.target)
            if self.sleep_check is not None:
                self.sleep_check.forget(action.target)
            activator.activations += 1
            evicted = {m: self.core.models[m].policy.evicts_to for m in action.evict
                       if m in self.core.models}
            for m, state in evicted.items():
                if state is Residency.ASLEEP:
                    activator.asleep.add(m)
            log.info("switched to %s in %.1f s (evict %.1f s)", action.target, total, evict)
            event = SwitchDone(self.clock(), action.target, bring_up, evicted, evict)
        self.apply(self.core.handle(event))

    async def _fleet_states(self) -> dict[str, Residency]:
        """The fleet's view (empty when it cannot tell): read every `observe_interval`, after
        an admin action, and after a refused placement (the core may have believed a model
        asleep that is awake: before the first observation, or after `fleet switch` from the
        host)."""
        activator = self._activator()
        status = getattr(activator.fleet, "status", None) if activator else None
        if status is None:
            return {}
        try:
            return _states(await anyio.to_thread.run_sync(status, abandon_on_cancel=True))
        except Exception as exc:  # the engine may be away for a while
            log.debug("fleet status failed: %s", exc)
            return {}

    async def _sleep(self, action: PutToSleep) -> None:
        activator = self._activator()
        policy = self.core.models[action.model].policy if action.model in self.core.models \
            else None
        state = policy.evicts_to if policy else Residency.STOPPED
        ok = True
        if activator is not None:
            try:
                await activator.put_to_sleep(action.model)
                log.info("model %s %s: put to sleep", action.model, action.reason)
            except Exception as exc:
                log.warning("idle ttl: could not put %s to sleep: %s", action.model, exc)
                ok = False
        self.apply(self.core.handle(SleepDone(self.clock(), action.model, state, ok)))


def _ensure_awake(activator: Activator, model: str, timeout: float,
                  evict: tuple[str, ...]) -> object:
    """The fleet brings `model` up, evicting only `evict` (drained by the scheduler)."""
    return activator.fleet.ensure_awake(model, timeout=timeout, evict=evict)
