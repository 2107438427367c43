"""Words and figures about waiting: the estimate behind Retry-After, and the messages a
rejected request gets (where it stood in line and why)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.scheduler.events import BringUp, Residency
from gateway.scheduler.model import _Model, _Request

if TYPE_CHECKING:
    from gateway.scheduler.core import SchedulerCore


def estimate(core: SchedulerCore, model: str, now: float) -> float:
    """Seconds a request for `model` arriving now would wait (rough: Retry-After and the
    messages of rejected requests)."""
    m = core.models.get(model)
    if m is None:
        return 1.0
    per_slot = m.service / max(1, m.policy.max_concurrency or 1)
    queued = len(m.queue) * per_slot
    if m.state is Residency.AWAKE:
        return 0.0 if m.has_room() and not m.queue else queued + per_slot
    if m.state is Residency.ACTIVATING:
        kind = BringUp.of(core._cold_before.get(model, Residency.STOPPED))
        return max(0.0, core.costs.bring_up(model, kind) - (now - m.state_since)) + queued
    kind = BringUp.of(m.state if m.state.cold else m.policy.evicts_to)
    candidates = core._candidates(now)
    ahead = candidates[:candidates.index(m)] if m in candidates else candidates
    turns = sum(core.config.quantum_floor
                + core.costs.bring_up(c.policy.name, BringUp.of(c.state)) for c in ahead)
    holders = [h for h in core.models.values()
               if h.policy.shared and h.state.holds and h is not m]
    blocking = min((max(0.0, h.resident_since + core.quantum(h, m) - now) + h.service
                    for h in holders), default=0.0)
    return core.costs.bring_up(model, kind) + turns + blocking + queued

def queue_full(m: _Model) -> str:
    if m.state is Residency.AWAKE:
        return (f"Model `{m.policy.name}` is at its limit of {m.policy.max_concurrency} "
                f"concurrent requests and {m.policy.max_queue} queued; retry later.")
    return (f"Model `{m.policy.name}` is not awake and {m.policy.max_queue} requests already "
            f"wait for it (its max_queue); retry later.")

def timed_out(core: SchedulerCore, m: _Model, req: _Request, position: int,
              now: float) -> tuple[int, str]:
    waited = now - req.arrived
    name = m.policy.name
    if m.state is Residency.AWAKE:
        return 429, (f"Model `{name}` stayed at its limit of {m.policy.max_concurrency} "
                     f"concurrent requests for {waited:.0f} s while this request waited "
                     f"(position {position} of {len(m.queue)} in its queue); retry later.")
    if m.state is Residency.ACTIVATING:
        why = "it was still being brought up"
    elif m.state is Residency.DRAINING:
        why = "it was draining: " + m.drain_reason
    elif m.state is Residency.EVICTING:
        why = "it was being put to sleep"
    else:
        holders = [h.policy.name for h in core.models.values()
                   if h.policy.shared and h.state.holds]
        ahead = [c.policy.name for c in core._candidates(now) if c is not m]
        why = ("the resource was held by " + ", ".join(f"`{h}`" for h in holders)
               if holders else "it was not awake")
        if ahead:
            why += "; models waiting longer: " + ", ".join(f"`{a}`" for a in ahead)
    return 503, (f"Model `{name}` did not get its turn within {waited:.0f} s (position "
                 f"{position} of {len(m.queue)} waiting for it): {why}. Estimated wait "
                 f"{estimate(core, name, now):.0f} s; retry later.")


def snapshot(core: SchedulerCore, now: float) -> dict[str, object]:
    """The scheduler as `/admin/status`, `fleet status --gateway` and the dashboard show it:
    per model its state, queue, oldest wait, time resident, quantum left while a rival waits,
    why it drains, whether its clients send back to back; the last switches; the measured
    switch costs; time spent switching."""
    candidates = core._candidates(now)
    rival = candidates[0] if candidates else None
    models: dict[str, object] = {}
    for name, m in core.models.items():
        entry: dict[str, object] = {
            "state": str(m.state), "shared": m.policy.shared, "in_flight": m.in_flight,
            "queued": len(m.queue),
            "oldest_wait": round(now - m.oldest(), 3) if m.queue else None,
            "resident_for": round(now - m.resident_since, 3) if m.state.holds else None,
            "pinned": m.policy.pinned, "priority": m.policy.priority,
            # share of its recent requests sent within the idle grace of an answer (back to
            # back): at 0.5 or more an idle turn lingers for the grace before a switch
            "back_to_back": round(m.back_to_back, 2),
        }
        if rival is not None and m.state is Residency.AWAKE and m.policy.shared \
                and not m.policy.pinned:
            left = m.resident_since + core.quantum(m, rival) - now
            entry["quantum_left"] = round(max(0.0, left), 3)
            entry["rival"] = rival.policy.name
        if m.state is Residency.DRAINING:
            entry["draining_because"] = m.drain_reason
        if m.policy.ttl is not None and m.state is Residency.AWAKE and not m.in_flight:
            entry["ttl_left"] = round(max(0.0, max(m.last_done, m.resident_since)
                                          + m.policy.ttl - now), 3)
        models[name] = entry
    return {
        "policy": core.config.policy,
        "switching": sorted(op[1] for op in core.ops.values() if op[0] == "switch"),
        "models": models,
        "switches": list(core.history),
        "switch_costs": core.costs.measured(),
        "switches_total": dict(core.switches),
        "switching_seconds": round(core.switching_seconds, 3),
        "resident_seconds": {k: round(v, 3) for k, v in core.resident_seconds.items()},
    }
