"""The scheduler's decisions: who holds the resource, who waits, who drains, who is next.

A pure state machine: `SchedulerCore.handle(event)` takes an event stamped with its time and
returns the actions the gateway carries out (admit a request, reject one, drain a model, start
a switch, put an idle model to sleep). No clock, no I/O, no asyncio: tests drive it with a
simulated clock and a recording world (tests/support/sched_sim.py).

The policy is described in the package docstring (gateway/scheduler/__init__.py).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from gateway.scheduler import explain, room, turns
from gateway.scheduler.costs import SwitchCosts
from gateway.scheduler.events import (
    Action,
    Admit,
    Arrive,
    BringUp,
    Done,
    Event,
    Leave,
    Lost,
    Observed,
    Reject,
    Residency,
    SleepDone,
    SwitchDone,
    SwitchFailed,
    Tick,
)
from gateway.scheduler.model import ModelPolicy, SchedulerConfig, _Model, _Request

# Placement check: the violations (human sentences) when these models hold the resource
# together; empty when they fit.
Fits = Callable[[frozenset[str]], Sequence[str]]
_FINISH = (Done, Leave)  # a tuple: `Done | Leave` would build a union type per event


class SchedulerCore:
    """The scheduler's state and decisions (see the module docstring)."""

    # Skip a decision pass an event cannot change (see `_finish`). Off only in the test that
    # checks the skips change nothing (tests/test_scheduler_shortcuts.py).
    shortcuts = True

    def __init__(self, models: Iterable[ModelPolicy], fits: Fits, *, now: float,
                 states: Mapping[str, Residency] | None = None,
                 config: SchedulerConfig | None = None,
                 costs: SwitchCosts | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.costs = costs or SwitchCosts()
        self.fits = fits
        self.models: dict[str, _Model] = {}
        self._requests: dict[int, _Request] = {}
        self._deadlines: list[tuple[float, int]] = []
        # The fleet operation under way per group (one host, or one Swarm node): (switch or
        # sleep, model, started). Groups take turns independently of each other.
        self.ops: dict[str, tuple[str, str, float]] = {}
        self.switch_reason = ""
        self._wake: float | None = None
        self._cold_before: dict[str, Residency] = {}
        self.switches: dict[str, int] = {}              # by reason kind
        self.switching_seconds = 0.0
        self.resident_seconds: dict[str, float] = {}
        self.history: list[dict[str, object]] = []      # the last switches, newest last
        self.set_models(models, fits, now=now, states=states)

    # -- configuration --------------------------------------------------------------------
    def set_models(self, models: Iterable[ModelPolicy], fits: Fits, *, now: float,
                   states: Mapping[str, Residency] | None = None) -> list[Action]:
        """(Re)configure: kept models keep their state, queue and counters; requests queued
        for a removed model are rejected."""
        self.fits = fits
        old, self.models = self.models, {}
        out: list[Action] = []
        for policy in models:
            kept = old.pop(policy.name, None)
            if kept is not None:
                kept.policy = policy
                self.models[policy.name] = kept
            else:
                state = (states or {}).get(policy.name,
                                           Residency.ABSENT if policy.shared else Residency.AWAKE)
                if not policy.shared:
                    state = Residency.AWAKE
                self.models[policy.name] = _Model(policy, state, resident_since=now,
                                                  state_since=now)
        for gone in old.values():
            for req in list(gone.queue.values()):
                self._drop(req)
                out.append(Reject(req.rid, req.model, 404,
                                  f"Model `{req.model}` was removed by a registry reload while "
                                  f"this request waited.", 1))
        self._schedule(now, out)
        return out

    # -- events ---------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        out: list[Action] = []
        now = event.now
        if isinstance(event, Arrive):
            self._arrive(event, out)
        elif isinstance(event, _FINISH):
            self._finish(event.rid, now, isinstance(event, Done), out)
        elif isinstance(event, Tick):
            self._schedule(now, out)
        elif isinstance(event, SwitchDone):
            self._switch_done(event, out)
        elif isinstance(event, SwitchFailed):
            self._switch_failed(event, out)
        elif isinstance(event, SleepDone):
            self._sleep_done(event, out)
        elif isinstance(event, Observed):
            self._observed(event, out)
        elif isinstance(event, Lost):
            m = self.models.get(event.model)
            if m is not None and m.policy.shared and m.state in (Residency.AWAKE,
                                                                 Residency.DRAINING):
                self._set(m, Residency.STOPPED, now)
            self._schedule(now, out)
        return out

    def _arrive(self, ev: Arrive, out: list[Action]) -> None:
        m = self.models.get(ev.model)
        if m is None:
            out.append(Reject(ev.rid, ev.model, 404, f"Model `{ev.model}` is not served.", 1))
            return
        now = ev.now
        m.last_demand = now
        if m.answered_since_arrival:  # does this request follow an answer back to back?
            m.answered_since_arrival = False
            follows = 1.0 if now - m.last_done <= self.config.idle_grace else 0.0
            m.back_to_back += 0.3 * (follows - m.back_to_back)
        if m.state is Residency.AWAKE and not m.queue and m.has_room():
            req = _Request(ev.rid, ev.model, now, now, admitted=now)
            self._requests[ev.rid] = req
            m.in_flight += 1
            out.append(Admit(ev.rid, ev.model, 0.0))
            return
        if len(m.queue) >= m.policy.max_queue:
            out.append(Reject(ev.rid, ev.model, 429, explain.queue_full(m),
                              self._retry_after(m, now)))
            return
        arrived = now if ev.arrived is None else ev.arrived
        waits_for_turn = m.policy.shared and m.state is not Residency.AWAKE
        bound = max(m.policy.queue_timeout, m.policy.switch_timeout) if waits_for_turn \
            else m.policy.queue_timeout
        req = _Request(ev.rid, ev.model, arrived, arrived + bound)
        if ev.arrived is not None and ev.arrived < now and m.queue:  # back in line, in order
            items = sorted([*m.queue.values(), req], key=lambda r: r.arrived)
            m.queue = {r.rid: r for r in items}
        else:
            m.queue[ev.rid] = req
        self._requests[ev.rid] = req
        heapq.heappush(self._deadlines, (req.deadline, ev.rid))
        if m.state is Residency.AWAKE:
            self._wake_at(req.deadline)  # waits for a slot: nothing else changes
        else:
            self._schedule(now, out)

    def _finish(self, rid: int, now: float, done: bool, out: list[Action]) -> None:
        req = self._requests.pop(rid, None)
        if req is None:
            return
        m = self.models.get(req.model)
        if m is None:
            return
        if req.admitted is None:  # left while queued
            m.queue.pop(rid, None)
            self._schedule(now, out)
            return
        m.in_flight -= 1
        m.last_done = now
        m.answered_since_arrival = True
        if done:
            m.service += 0.2 * (max(0.0, now - req.admitted) - m.service)
        if m.state is Residency.AWAKE and m.queue and self.config.policy == "drain-wait":
            self._admit(m, now, out)
            return
        if m.state is Residency.AWAKE and m.queue and not self._contended():
            self._admit(m, now, out)
            return
        if self.shortcuts and not m.queue and not m.policy.shared and (
                self._wake is None or now < self._wake):
            # A model that does not take turns (always awake) with no one in its line: its
            # slot counts in no other decision (turns, room and ttl look at shared models
            # only), and nothing timed is due yet (the wake-up covers deadlines, quanta and
            # ttls). A full pass would decide nothing new: about a third of the cost of a
            # request's admission and release.
            return
        self._schedule(now, out)

    def _switch_done(self, ev: SwitchDone, out: list[Action]) -> None:
        now = ev.now
        m = self.models.get(ev.target)
        group = self._end_op(m)
        kind = BringUp.CREATE
        if m is not None:
            kind = BringUp.of(self._cold_before.get(ev.target, Residency.ABSENT))
            self._set(m, Residency.AWAKE, now)
            m.resident_since = now
        self.costs.record_bring_up(ev.target, kind, ev.seconds)
        for name, state in ev.evicted.items():
            e = self.models.get(name)
            if e is not None:
                self._set(e, state if state.cold else Residency.STOPPED, now)
            if ev.evicted:
                self.costs.record_evict(name, ev.evict_seconds / len(ev.evicted))
        # Models marked evicting that the fleet did not report: trust the plan.
        for e in self.models.values():
            if (e.state is Residency.EVICTING and e.policy.name not in ev.evicted
                    and e.policy.group == group):
                self._set(e, e.policy.evicts_to, now)
        self.switching_seconds += ev.seconds + ev.evict_seconds
        if self.history and self.history[-1].get("target") == ev.target:
            self.history[-1].update(seconds=round(ev.seconds + ev.evict_seconds, 3),
                                    result="ok", kind=str(kind))
        self._schedule(now, out)

    def _switch_failed(self, ev: SwitchFailed, out: list[Action]) -> None:
        now = ev.now
        m = self.models.get(ev.target)
        group = self._end_op(m)
        if m is not None:
            self._set(m, ev.observed.get(ev.target, Residency.STOPPED), now)
        # The fleet's reason (container logs, addresses) is for the operator: the log and
        # /admin/status (`history`) have it, the callers get what they need.
        message = (f"Model `{ev.target}` is not awake and could not be brought up; retry later, "
                   f"and if it persists ask the operator (the gateway's log and /admin/status "
                   f"have the fleet's reason).")
        wait = self._retry_after(m, now) if m is not None else 1
        for req in [] if m is None or ev.retry else list(m.queue.values()):
            self._drop(req)
            out.append(Reject(req.rid, req.model, ev.status, message, wait))
        for e in self.models.values():
            if e.state is Residency.EVICTING and e.policy.group == group:
                self._set(e, ev.observed.get(e.policy.name, Residency.STOPPED), now)
        self._believe(ev.observed, now)
        if self.history and self.history[-1].get("target") == ev.target:
            self.history[-1].update(result="failed", error=ev.reason)
        self._schedule(now, out)

    def _sleep_done(self, ev: SleepDone, out: list[Action]) -> None:
        m = self.models.get(ev.model)
        self._end_op(m)
        if m is not None and m.state is Residency.EVICTING:
            self._set(m, ev.state if ev.ok else Residency.AWAKE, ev.now)
        self._schedule(ev.now, out)

    def _observed(self, ev: Observed, out: list[Action]) -> None:
        self._believe(ev.states, ev.now)
        self._schedule(ev.now, out)

    def _believe(self, states: Mapping[str, Residency], now: float) -> None:
        for name, state in states.items():
            m = self.models.get(name)
            if m is None or not m.policy.shared:
                continue
            if m.state in (Residency.ACTIVATING, Residency.EVICTING):
                continue  # ours, in progress
            if state.holds and not m.state.holds:
                self._set(m, Residency.AWAKE, now)
                m.resident_since = now
            elif state.cold and m.state.holds and m.in_flight == 0:
                self._set(m, state, now)
            elif state.cold and m.state.cold:
                m.state = state

    # -- the decision ---------------------------------------------------------------------
    def _schedule(self, now: float, out: list[Action]) -> None:
        self._wake = None
        self._expire(now, out)
        for group in {m.policy.group for m in self.models.values()}:
            turns.time_share(self, group, now, out)
        for m in self.models.values():
            if m.state is Residency.AWAKE and m.queue:
                self._admit(m, now, out)
        turns.idle_ttl(self, now, out)
        if self._deadlines:
            self._wake_at(self._deadlines[0][0])

    def _expire(self, now: float, out: list[Action]) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            req = self._requests.get(rid)
            if req is None or req.admitted is not None:
                continue
            m = self.models[req.model]
            position = list(m.queue).index(rid) + 1
            status, message = explain.timed_out(self, m, req, position, now)
            self._drop(req)
            out.append(Reject(rid, req.model, status, message, self._retry_after(m, now)))

    def _admit(self, m: _Model, now: float, out: list[Action]) -> None:
        while m.queue and m.has_room():
            rid = next(iter(m.queue))
            req = m.queue.pop(rid)
            req.admitted = now
            m.in_flight += 1
            out.append(Admit(rid, req.model, now - req.arrived))

    def _contended(self) -> bool:
        return any(m.queue and m.state.cold for m in self.models.values() if m.policy.shared)

    def _candidates(self, now: float) -> list[_Model]:
        return turns.candidates(self, now)

    def quantum(self, holder: _Model, waiting: _Model) -> float:
        """How long `holder` may keep the resource while `waiting` waits."""
        return room.quantum(self, holder, waiting)

    # -- helpers --------------------------------------------------------------------------
    def _end_op(self, m: _Model | None) -> str:
        group = m.policy.group if m is not None else ""
        self.ops.pop(group, None)
        return group

    def _set(self, m: _Model, state: Residency, now: float) -> None:
        if m.state.holds and not state.holds:
            self.resident_seconds[m.policy.name] = (
                self.resident_seconds.get(m.policy.name, 0.0) + now - m.resident_since)
        m.state = state
        m.state_since = now

    def _drop(self, req: _Request) -> None:
        self._requests.pop(req.rid, None)
        m = self.models.get(req.model)
        if m is not None:
            m.queue.pop(req.rid, None)

    def _wake_at(self, when: float) -> None:
        if self._wake is None or when < self._wake:
            self._wake = when

    def next_wakeup(self) -> float | None:
        """When the gateway must send a Tick at the latest (a deadline, a quantum, a ttl)."""
        return self._wake

    def estimate(self, model: str, now: float) -> float:
        """Seconds a request for `model` arriving now would wait (rough)."""
        return explain.estimate(self, model, now)

    def _retry_after(self, m: _Model, now: float) -> int:
        return max(1, math.ceil(explain.estimate(self, m.policy.name, now)))
