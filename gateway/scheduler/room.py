"""Making room: which awake models to evict for a waiting one, and how long a model may
keep the resource while another waits (its quantum)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.scheduler.events import BringUp, Residency
from gateway.scheduler.model import _Model

if TYPE_CHECKING:
    from gateway.scheduler.core import SchedulerCore


def eviction_set(core: SchedulerCore, x: _Model) -> tuple[_Model, ...] | str | None:
    """The models to evict for `x`; a sentence when `x` can never fit; None when it cannot
    fit now (models being brought up are in the way): wait."""
    holding = [m for m in core.models.values()
               if m.policy.shared and m.state.holds and m.policy.group == x.policy.group]
    names = frozenset(m.policy.name for m in holding)
    target = x.policy.name
    if not core.fits(names | {target}):
        return ()
    pinned = frozenset(m.policy.name for m in holding if m.policy.pinned)
    never = core.fits(pinned | {target})
    if never:
        why = "; ".join(never)
        return (f"Model `{target}` cannot be brought up: it does not fit "
                + (f"beside the pinned model(s) {', '.join(sorted(pinned))}" if pinned
                   else "on this host") + f" ({why}). Change the registry's placement.")
    movable = [m for m in holding if not m.policy.pinned and m.state is not
               Residency.ACTIVATING]
    for size in range(1, len(movable) + 1):
        options = [c for c in itertools.combinations(movable, size)
                   if not core.fits(names - {m.policy.name for m in c} | {target})]
        if options:
            return min(options, key=lambda g: _key(core, g))
    return None

def _key(core: SchedulerCore, group: Sequence[_Model]) -> tuple[int, float, float]:
    busy = sum(1 for m in group if m.queue or m.in_flight)
    recent = max(m.last_demand for m in group)
    cost = sum(core.costs.bring_up(m.policy.name, BringUp.of(m.policy.evicts_to))
               for m in group)
    return busy, recent, cost

def quantum(core: SchedulerCore, holder: _Model, waiting: _Model) -> float:
    """How long `holder` may keep the resource while `waiting` waits."""
    if holder.policy.quantum is not None:
        return holder.policy.quantum
    cost = (core.costs.measured_evict(holder.policy.name)
            + core.costs.measured_bring_up(waiting.policy.name, BringUp.of(waiting.state)))
    share = min(max(core.config.switch_share, 0.01), 0.99)
    return max(core.config.quantum_floor, cost * (1 - share) / share)

