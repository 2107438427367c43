"""Switch planning: what `fleet switch TARGET` must evict so the target fits.

Pure: registry + observed state in, a `SwitchPlan` out; the placement rules themselves are
`fleet.placement`, the acting is `fleet.lifecycle`. Nothing here touches Docker.

A switch evicts whole models (every awake replica), never a pinned one, never a busy one
unless forced, and, when the caller names the models it may evict (the gateway's
scheduler, which drained them), none other.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

# gateway_cpuset, fleet_specs and replica_specs are re-exported for fleet.compose and its
# tests (another change is rewriting them); import them from fleet.placement and fleet.spec.
from fleet.placement import Violation, check_placement, gateway_cpuset
from fleet.registry import ModelSpec, Registry
from fleet.spec import fleet_specs, replica_specs
from fleet.states import AWAKE_STATES, READY_STATES, ReplicaState, ViolationKind

__all__ = ["Eviction", "ObservedModel", "SwitchPlan", "describe_plan", "fleet_specs",
           "gateway_cpuset", "plan_switch", "replica_specs"]


@dataclass(frozen=True)
class ObservedModel:
    """What the engine saw of one model.

    state: running | healthy | loading | sleeping | stopped | absent | drifted (for a model
    with replicas, `model_state` of its replicas' states). busy: it has requests in flight.
    last_used: seconds (any monotonic-enough clock, the same for every model) of its last
    request; 0 = never. replicas: the indices of its awake replicas; None means replica 0
    alone when `state` is awake, none otherwise.
    """

    name: str
    state: ReplicaState
    busy: bool = False
    last_used: float = 0.0
    replicas: tuple[int, ...] | None = None

    @property
    def awake_replicas(self) -> tuple[int, ...]:
        if self.replicas is not None:
            return tuple(sorted(set(self.replicas)))
        return (0,) if self.state in AWAKE_STATES else ()


@dataclass(frozen=True)
class Eviction:
    model: str
    action: Literal["sleep", "stop"]
    reason: str


@dataclass(frozen=True)
class SwitchPlan:
    """What `fleet switch target` does. Non-empty `violations` means: do not proceed."""

    target: str
    evict: tuple[Eviction, ...]
    start_action: Literal["start", "wake", "none"]
    violations: tuple[Violation, ...]

    @property
    def ok(self) -> bool:
        return not self.violations


def plan_switch(
    registry: Registry,
    observed: Mapping[str, ObservedModel],
    target: str,
    *,
    force: bool = False,
    replicas: Collection[int] | None = None,
    evictable: Collection[str] | None = None,
) -> SwitchPlan:
    """Plan `fleet switch target`: the minimal set of awake models to evict so it fits.

    `target` may be a name or an alias; an unknown or remote target is a violation (not an
    exception), so callers report every refusal the same way. Models in `observed` that are
    not managed models of the registry are ignored. `replicas`: the target's replica
    indices that will be awake (default: 0..initial_replicas-1 plus those awake now); every
    awake replica of every model counts against the budget.

    Never evicted: a `pinned` model, and, when `evictable` is given, any model not in it.
    When only evicting such models would make room, the plan is refused with a
    not-evictable violation naming them.

    Minimal, precisely: among the sets of other evictable awake models whose eviction lets
    the target fit (check_placement passes for the remaining awake replicas plus the
    target's), choose by (1) fewest busy models (a busy model is only a candidate with
    `force`; without it the plan is refused with a busy violation naming them), then (2)
    fewest models, then (3) least recently used: the set whose most recently used member is
    the oldest wins, comparing the members' `last_used` from newest to oldest, then names.
    A model is evicted whole (all its replicas).

    Each eviction is "sleep" for a `sleep_mode` model that is running/healthy, else "stop"
    (a loading or drifted container cannot be put to sleep). start_action: "none" when the
    target is already running, healthy or loading, "wake" when sleeping, "start" otherwise
    (stopped, absent, drifted: the lifecycle recreates a drifted container).
    """
    model = registry.get(target)
    if model is None:
        return SwitchPlan(target, (), "none", (Violation(
            ViolationKind.UNKNOWN_MODEL, f"{target!r} is not a model or alias of the registry "
                                         f"({registry.source})"),))
    name = model.name
    if not model.managed:
        return SwitchPlan(name, (), "none", (Violation(
            ViolationKind.REMOTE_MODEL, f"{name!r} is a remote model ({model.url}): routed "
                                        f"to, never started or stopped by the fleet"),))

    current = observed.get(name)
    state = current.state if current is not None else ReplicaState.ABSENT
    if state in READY_STATES:
        return SwitchPlan(name, (), "none", ())
    start_action: Literal["start", "wake"] = \
        "wake" if state == ReplicaState.SLEEPING else "start"
    if replicas is None:
        now_awake = current.awake_replicas if current is not None else ()
        replicas = {*range(model.initial_replicas), *now_awake}
    wanted = tuple(sorted(set(replicas)))

    # The target alone must fit; otherwise no eviction helps.
    alone = check_placement(registry, {name: wanted})
    if alone:
        return SwitchPlan(name, (), start_action, tuple(alone))

    others = [o for o in _awake(registry, observed) if o.name != name]
    kept = [o for o in others if registry.models[o.name].pinned
            or (evictable is not None and o.name not in evictable)]
    movable = [o for o in others if o not in kept]
    chosen = _minimal_eviction(registry, name, wanted, others, movable)
    if chosen is None:
        everything_out = {o.name: o.awake_replicas for o in kept}
        why = "; ".join(_why_kept(registry, o, evictable) for o in kept)
        return SwitchPlan(name, (), start_action, (Violation(
            ViolationKind.NOT_EVICTABLE,
            f"switching to {name} needs room that only evicting {_names(kept)} would give "
            f"({why})", tuple(o.name for o in kept)),
            *check_placement(registry, {**everything_out, name: wanted})))
    blocking = [o for o in chosen if o.busy]
    if blocking and not force:
        return SwitchPlan(name, (), start_action, (Violation(
            ViolationKind.BUSY,
            f"switching to {name} needs to evict {_names(chosen)}; {_names(blocking)} "
            f"{'is' if len(blocking) == 1 else 'are'} serving requests; retry when idle or "
            f"force it (their in-flight requests will fail)",
            tuple(o.name for o in blocking)),))
    evictions = tuple(_eviction(registry, o, registry.models[name]) for o in chosen)
    return SwitchPlan(name, evictions, start_action, ())


def _names(models: Sequence[ObservedModel]) -> str:
    return ", ".join(o.name for o in models)


def _why_kept(registry: Registry, o: ObservedModel, evictable: Collection[str] | None) -> str:
    if registry.models[o.name].pinned:
        return f"{o.name} is pinned: a switch never evicts it (`fleet sleep {o.name}` does)"
    allowed = ", ".join(sorted(evictable or ())) or "none"
    return f"{o.name} is not among the models the caller allowed to evict ({allowed})"


def _awake(registry: Registry, observed: Mapping[str, ObservedModel]) -> list[ObservedModel]:
    out = []
    for key in sorted(observed):
        o = observed[key]
        m = registry.models.get(o.name)
        if m is not None and m.managed and o.awake_replicas:
            out.append(o)
    return out


def _minimal_eviction(
    registry: Registry, target: str, wanted: tuple[int, ...],
    others: Sequence[ObservedModel], movable: Sequence[ObservedModel],
) -> tuple[ObservedModel, ...] | None:
    """The best set of `movable` models to evict so the target fits beside the rest of
    `others` (see `plan_switch`); None when evicting all of them is not enough."""
    idle = [o for o in movable if not o.busy]
    busy = [o for o in movable if o.busy]

    def fits(evicted: Collection[ObservedModel]) -> bool:
        out = {o.name for o in evicted}
        remaining = {o.name: o.awake_replicas for o in others if o.name not in out}
        return not check_placement(registry, {**remaining, target: wanted})

    def lru_key(group: Sequence[ObservedModel]) -> tuple[tuple[float, ...], tuple[str, ...]]:
        newest_first = tuple(sorted((o.last_used for o in group), reverse=True))
        return newest_first, tuple(sorted(o.name for o in group))

    for n_busy in range(len(busy) + 1):
        for n_idle in range(len(idle) + 1):
            candidates = [
                (*i, *b)
                for b in itertools.combinations(busy, n_busy)
                for i in itertools.combinations(idle, n_idle)
            ]
            fitting = [c for c in candidates if fits(c)]
            if fitting:
                best = min(fitting, key=lru_key)
                # Act idle first, least recently used first; busy models last.
                return tuple(sorted(best, key=lambda o: (o.busy, o.last_used, o.name)))
    return None


def _eviction(registry: Registry, o: ObservedModel, target: ModelSpec) -> Eviction:
    m = registry.models[o.name]
    action: Literal["sleep", "stop"] = (
        "sleep" if m.sleep_mode and o.state in (ReplicaState.RUNNING, ReplicaState.HEALTHY)
        else "stop")
    shared = sorted(set(m.gpus) & set(target.gpus))
    if shared and (m.dedicated or target.dedicated):
        owner = target.name if target.dedicated else m.name
        reason = f"GPU(s) {shared} cannot be shared: {owner} is dedicated"
    elif shared:
        reason = f"GPU(s) {shared}: not enough memory for {target.name} beside it"
    else:
        reason = f"CPU cores: not enough for {target.name} beside it"
    if o.busy:
        reason += " (busy: forced)"
    return Eviction(o.name, action, reason)


def describe_plan(plan: SwitchPlan) -> str:
    """Human text for a plan (what `fleet switch --dry-run` prints)."""
    if plan.violations:
        lines = [f"cannot switch to {plan.target}:"]
        lines += [f"  - [{v.kind}] {v.message}" for v in plan.violations]
        return "\n".join(lines)
    lines = [f"switch to {plan.target}:"]
    lines += [f"  {e.action} {e.model}: {e.reason}" for e in plan.evict]
    lines.append({"none": f"  {plan.target} is already up",
                  "wake": f"  wake {plan.target}",
                  "start": f"  start {plan.target}"}[plan.start_action])
    return "\n".join(lines)
