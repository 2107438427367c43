"""Replay a workload against the scheduler core on a simulated clock (no gateway, no Docker).

A discrete-event world: models with a size on a budget (cores or GPU memory), switches that
take their bring-up cost, requests that take their service time, clients that leave, and
closed-loop clients that send again as soon as an answer comes back. The world carries out the
core's actions exactly as the gateway and the fleet would and checks, at every step, the
invariants the policy promises (never over budget, a busy model is never evicted, no switch
for an empty queue, pinned models stay). Used by the property tests and by the replay
benchmark (`benchmarks/replay.py`), which also drives the real gateway with the same traces.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.scheduler.core import SchedulerCore
from gateway.scheduler.costs import SwitchCosts
from gateway.scheduler.events import (
    Action,
    Admit,
    Arrive,
    BringUp,
    Done,
    Event,
    Leave,
    PutToSleep,
    Reject,
    Residency,
    SleepDone,
    StartSwitch,
    SwitchDone,
    Tick,
)
from gateway.scheduler.model import ModelPolicy, SchedulerConfig


@dataclass(frozen=True)
class SimModel:
    name: str
    size: int = 1                      # units of the budget it holds while awake
    load: float = 3.0                  # seconds to bring it up from stopped
    wake: float = 0.5                  # from sleep
    evict: float = 0.2                 # to put it away
    sleep_mode: bool = False
    pinned: bool = False
    priority: float = 1.0
    max_concurrency: int | None = None
    ttl: float | None = None
    quantum: float | None = None
    shared: bool = True                # False: not time-shared (always up, outside the budget)


@dataclass(frozen=True)
class SimRequest:
    at: float
    model: str
    service: float
    leave_after: float | None = None   # the client goes away this long after sending


@dataclass(frozen=True)
class ClosedLoop:
    """`clients` clients of `model`, each sending again `think` s after an answer, from
    `start` until `stop`."""

    model: str
    clients: int
    service: float
    start: float = 0.0
    stop: float = 60.0
    think: float = 0.0


@dataclass
class Outcome:
    rid: int
    model: str
    sent: float
    admitted: float | None = None
    finished: float | None = None
    status: int = 0
    message: str = ""
    left: bool = False

    @property
    def waited(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.sent


@dataclass
class Replay:
    """The result: every request's outcome, the switches, time spent switching, residency."""

    outcomes: list[Outcome]
    switches: list[tuple[float, float, str, tuple[str, ...]]]  # start, end, target, evicted
    timeline: list[tuple[float, frozenset[str], dict[str, int]]]  # t, awake, queue lengths
    violations: list[str] = field(default_factory=list)
    end: float = 0.0


def _used(specs: dict[str, SimModel], names: Iterable[str]) -> int:
    """The budget units `names` hold (a model that is not time-shared holds none)."""
    return sum(specs[n].size for n in names if n in specs and specs[n].shared)


class InvariantBroken(AssertionError):
    pass


def replay(models: Sequence[SimModel], budget: int, requests: Iterable[SimRequest] = (),
           loops: Iterable[ClosedLoop] = (), *, policy: str = "fair",
           quantum_floor: float = 5.0, switch_share: float = 0.2, idle_grace: float = 0.25,
           queue_timeout: float = 600.0, switch_timeout: float = 600.0,
           awake: Iterable[str] = (), horizon: float = 3600.0, strict: bool = True) -> Replay:
    """Run the world until every request ended (or `horizon`). `strict`: raise
    InvariantBroken at the first broken invariant (else collect them in `violations`)."""
    specs = {m.name: m for m in models}

    def fits(names: frozenset[str]) -> list[str]:
        used = _used(specs, names)
        return [] if used <= budget else [f"needs {used} of {budget} units"]

    costs = SwitchCosts(defaults={BringUp.WAKE: 1.0, BringUp.START: 3.0, BringUp.CREATE: 3.0},
                        evict_default=0.2)
    up = set(awake) | {m.name for m in models if not m.shared}
    core = SchedulerCore(
        [ModelPolicy(m.name, shared=m.shared, max_concurrency=m.max_concurrency,
                     queue_timeout=queue_timeout, switch_timeout=switch_timeout,
                     priority=m.priority, pinned=m.pinned, ttl=m.ttl, quantum=m.quantum,
                     max_queue=100_000,
                     evicts_to=Residency.ASLEEP if m.sleep_mode else Residency.STOPPED)
         for m in models],
        fits, now=0.0, config=SchedulerConfig(policy=policy,  # type: ignore[arg-type]
                                              quantum_floor=quantum_floor,
                                              switch_share=switch_share,
                                              idle_grace=idle_grace),
        costs=costs,
        states={n: (Residency.AWAKE if n in up else Residency.STOPPED) for n in specs})
    world = _World(core, specs, budget, up, strict)
    for r in requests:
        world.send(r.at, r.model, r.service, r.leave_after)
    for loop in loops:
        for _ in range(loop.clients):
            world.loop(loop, loop.start)
    world.run(horizon)
    return Replay(sorted(world.outcomes.values(), key=lambda o: o.rid), world.switches,
                  world.timeline, world.violations, world.now)


class _World:
    def __init__(self, core: SchedulerCore, specs: dict[str, SimModel], budget: int,
                 up: set[str], strict: bool) -> None:
        self.core, self.specs, self.budget, self.up, self.strict = core, specs, budget, up, strict
        self.now = 0.0
        self.heap: list[tuple[float, int, Event | tuple[str, int]]] = []
        self.seq = itertools.count()
        self.rids = itertools.count(1)
        self.outcomes: dict[int, Outcome] = {}
        self.service: dict[int, float] = {}
        self.leave: dict[int, float | None] = {}
        self.loops: dict[int, ClosedLoop] = {}
        self.switches: list[tuple[float, float, str, tuple[str, ...]]] = []
        self.timeline: list[tuple[float, frozenset[str], dict[str, int]]] = []
        self.violations: list[str] = []
        self.asleep: set[str] = set()
        self.ticks: set[float] = set()

    def push(self, at: float, item: Event | tuple[str, int]) -> None:
        heapq.heappush(self.heap, (at, next(self.seq), item))

    def send(self, at: float, model: str, service: float, leave_after: float | None,
             loop: ClosedLoop | None = None) -> None:
        rid = next(self.rids)
        self.outcomes[rid] = Outcome(rid, model, at)
        self.service[rid] = service
        self.leave[rid] = leave_after
        if loop is not None:
            self.loops[rid] = loop
        self.push(at, Arrive(at, rid, model))
        if leave_after is not None:
            self.push(at + leave_after, ("leave", rid))

    def loop(self, loop: ClosedLoop, at: float) -> None:
        if at < loop.stop:
            self.send(at, loop.model, loop.service, None, loop)

    def run(self, horizon: float) -> None:
        while self.heap:
            at, _, item = heapq.heappop(self.heap)
            if at > horizon:
                break
            self.now = max(self.now, at)
            if isinstance(item, tuple):
                kind, rid = item
                if kind == "leave":
                    o = self.outcomes[rid]
                    if o.finished is None and o.status == 0:
                        o.left = True
                        self.apply(self.core.handle(Leave(self.now, rid)))
                        o.status, o.finished = 499, self.now
                continue
            if isinstance(item, Tick):
                self.ticks.discard(at)
            self.apply(self.core.handle(item if not isinstance(item, Tick) else
                                        Tick(self.now)))

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Admit):
                self.admit(a)
            elif isinstance(a, Reject):
                o = self.outcomes[a.rid]
                o.status, o.message, o.finished = a.status, a.message, self.now
            elif isinstance(a, StartSwitch):
                self.switch(a)
            elif isinstance(a, PutToSleep):
                self.up.discard(a.model)
                state = Residency.ASLEEP if self.specs[a.model].sleep_mode else \
                    Residency.STOPPED
                self.push(self.now + self.specs[a.model].evict,
                          SleepDone(self.now + self.specs[a.model].evict, a.model, state))
        self.check()
        wake = self.core.next_wakeup()
        if wake is not None and max(wake, self.now) not in self.ticks:
            self.ticks.add(max(wake, self.now))
            self.push(max(wake, self.now), Tick(max(wake, self.now)))
        self.timeline.append((self.now, frozenset(self.up),
                              {n: len(m.queue) for n, m in self.core.models.items()}))

    def admit(self, a: Admit) -> None:
        o = self.outcomes[a.rid]
        if a.model not in self.up:
            self.broken(f"t={self.now:.2f}: request {a.rid} admitted to `{a.model}`, which is "
                        f"not up")
        o.admitted = self.now
        done_at = self.now + self.service[a.rid]
        leave = self.leave[a.rid]
        if leave is not None and o.sent + leave < done_at:
            return  # the leave event frees the slot
        self.push(done_at, Done(done_at, a.rid))
        o.finished, o.status = done_at, 200
        loop = self.loops.get(a.rid)
        if loop is not None:
            self.loop(loop, done_at + loop.think)

    def switch(self, a: StartSwitch) -> None:
        core = self.core
        if not core.models[a.target].queue:
            self.broken(f"t={self.now:.2f}: switch to `{a.target}` for an empty queue")
        cost = 0.0
        for e in a.evict:
            m = core.models[e]
            if m.in_flight:
                self.broken(f"t={self.now:.2f}: `{e}` evicted with {m.in_flight} in flight")
            if self.specs[e].pinned:
                self.broken(f"t={self.now:.2f}: pinned `{e}` evicted")
            self.up.discard(e)
            cost += self.specs[e].evict
            if self.specs[e].sleep_mode:
                self.asleep.add(e)
        spec = self.specs[a.target]
        bring = spec.wake if a.target in self.asleep else spec.load
        self.asleep.discard(a.target)
        self.up.add(a.target)
        used = _used(self.specs, self.up)
        if used > self.budget:
            self.broken(f"t={self.now:.2f}: over budget ({used} > {self.budget}) with "
                        f"{sorted(self.up)}")
        end = self.now + cost + bring
        self.switches.append((self.now, end, a.target, a.evict))
        evicted = {e: (Residency.ASLEEP if self.specs[e].sleep_mode else Residency.STOPPED)
                   for e in a.evict}
        self.push(end, SwitchDone(end, a.target, bring, evicted, cost))

    def check(self) -> None:
        holding = frozenset(n for n, m in self.core.models.items() if m.state.holds)
        used = _used(self.specs, holding)
        if used > self.budget:
            self.broken(f"t={self.now:.2f}: the scheduler holds {sorted(holding)} over budget")

    def broken(self, message: str) -> None:
        if self.strict:
            raise InvariantBroken(message)
        self.violations.append(message)
