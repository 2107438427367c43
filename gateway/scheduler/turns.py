"""Taking turns: which waiting model goes next, who drains for it, when the switch starts;
and idle models put to sleep. Functions over the core's state (gateway/scheduler/core.py),
one group at a time (one host, or one Swarm node): groups never wait on each other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.scheduler import room
from gateway.scheduler.events import (
    Action,
    BringUp,
    Drain,
    PutToSleep,
    Reject,
    Residency,
    StartSwitch,
    Undrain,
)
from gateway.scheduler.model import _Model

if TYPE_CHECKING:
    from gateway.scheduler.core import SchedulerCore


def candidates(core: SchedulerCore, now: float, group: str | None = None) -> list[_Model]:
    """The models waiting for their turn (of `group`, or all), longest (weighted) wait first."""
    waiting = [m for m in core.models.values() if m.policy.shared and m.queue and m.state.cold
               and (group is None or m.policy.group == group)]
    return sorted(waiting, key=lambda m: (-(now - m.oldest()) * m.policy.priority,
                                          m.oldest(), m.policy.name))

def time_share(core: SchedulerCore, group: str, now: float, out: list[Action]) -> None:
    """One group's turn-taking: who waits longest, what makes room, who drains, and the
    switch once the models in the way are idle (one fleet operation at a time per group)."""
    plan: tuple[_Model, tuple[_Model, ...]] | None = None
    for x in candidates(core, now, group):
        found = room.eviction_set(core, x)
        if isinstance(found, str):  # can never fit: say so to everyone waiting for it
            for req in list(x.queue.values()):
                core._drop(req)
                out.append(Reject(req.rid, req.model, 503, found, 60))
            continue
        if found is not None:
            plan = (x, found)
        break  # strict order: only the longest-waiting model is served next
    keep = {e.policy.name for e in plan[1]} if plan else set()
    for m in core.models.values():
        if (m.state is Residency.DRAINING and m.policy.name not in keep
                and m.policy.group == group):
            core._set(m, Residency.AWAKE, now)
            out.append(Undrain(m.policy.name, "no rival waits for its room any more"))
    if plan is None:
        return
    x, evict = plan
    ready = True
    for e in evict:
        if e.in_flight == 0 and (not e.queue or e.state is Residency.DRAINING):
            until = lingers(core, e, x, now)
            if until is not None:  # its clients may be about to send again
                ready = False
                core._wake_at(until)
            continue  # idle, or drained: ready to go
        ready = False  # it has work: in flight, or queued requests it would serve
        if core.config.policy == "drain-wait" or e.state is Residency.DRAINING:
            continue  # the old behaviour waits for idleness; a draining one finishes
        expires = e.resident_since + core.quantum(e, x)
        if now < expires:
            core._wake_at(expires)
            continue
        e.drain_reason = (f"held the resource {now - e.resident_since:.0f} s (quantum "
                          f"{core.quantum(e, x):.0f} s) while `{x.policy.name}` waits")
        core._set(e, Residency.DRAINING, now)
        out.append(Drain(e.policy.name, e.drain_reason))
        ready = ready and e.in_flight == 0
    if ready and group not in core.ops:
        start_switch(core, x, evict, now, out)

def lingers(core: SchedulerCore, e: _Model, x: _Model, now: float) -> float | None:
    """Until when an idle awake `e` keeps the resource for `x`: an answer ended less than
    `idle_grace` ago, its clients have mostly been sending again within that grace of an
    answer, and its quantum is not over (a client sending back to back leaves a gap of its
    round trip between an answer and its next request: not idleness; clients that send on
    their own clock get no grace, which would only delay every switch)."""
    grace = core.config.idle_grace
    if core.config.policy != "fair" or grace <= 0 or e.state is not Residency.AWAKE \
            or e.last_done <= e.resident_since or e.back_to_back < 0.5:
        return None
    until = min(e.last_done + grace, e.resident_since + core.quantum(e, x))
    return until if now < until else None

def start_switch(core: SchedulerCore, x: _Model, evict: Sequence[_Model], now: float,
                 out: list[Action]) -> None:
    kind = BringUp.of(x.state)
    core._cold_before[x.policy.name] = x.state
    waited = now - x.oldest()
    reason = (f"{len(x.queue)} request(s) waiting, oldest {waited:.1f} s"
              + (f"; evicting {', '.join(e.policy.name for e in evict)}" if evict else ""))
    for e in evict:
        core._set(e, Residency.EVICTING, now)
    core._set(x, Residency.ACTIVATING, now)
    core.ops[x.policy.group] = ("switch", x.policy.name, now)
    key = "evict" if evict else "free"
    core.switches[key] = core.switches.get(key, 0) + 1
    core.history.append({"at": now, "target": x.policy.name, "kind": str(kind),
                         "evicted": [e.policy.name for e in evict], "reason": reason,
                         "result": "running"})
    del core.history[:-20]
    out.append(StartSwitch(x.policy.name, tuple(e.policy.name for e in evict), kind, reason))

def idle_ttl(core: SchedulerCore, now: float, out: list[Action]) -> None:
    """Idle models past their ttl are put to sleep (when their group has no operation)."""
    for m in core.models.values():
        ttl = m.policy.ttl
        if (ttl is None or not m.policy.shared or m.policy.pinned or m.queue
                or m.in_flight or m.state is not Residency.AWAKE or m.policy.group in core.ops):
            continue
        idle_since = max(m.last_done, m.resident_since)
        if now >= idle_since + ttl:  # the same sum as the wake-up below (rounding)
            core._set(m, Residency.EVICTING, now)
            core.ops[m.policy.group] = ("sleep", m.policy.name, now)
            out.append(PutToSleep(m.policy.name, f"idle for {now - idle_since:.0f} s "
                                                 f"(ttl {ttl:g} s)"))
            continue
        core._wake_at(idle_since + ttl)

