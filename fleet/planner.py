"""Placement: which models may be awake together, what to evict for a switch, which cores.

Pure: registry + observed state in, plain data out. The engine observes, the lifecycle acts;
nothing here touches Docker.

The rules (what `check_placement` enforces for a set of *awake* models):

- gpu-overcommit: on every GPU, the sum of `gpu_memory_utilization` of the awake models
  using it stays <= `[host].gpu_memory_ceiling`. A tensor-parallel model counts its fraction
  on each of its GPUs (vLLM's flag is per GPU).
- dedicated-conflict: a `dedicated` model shares none of its GPUs with another awake model.
- unknown-gpu / tensor-parallel: a model's GPUs are distinct and, when `[host].gpus` is
  declared, declared there (the registry already refuses both; kept for specs built by
  hand). Whether the tensor-parallel size divides the model's attention heads is vLLM's
  check, at load time.
- cpu-oversubscribed (only when `[host].cpus` is declared): the cores of the awake models
  (`cpus`, from the model or `[defaults]`) plus `[host].gateway_cpus` fit in `[host].cpus`,
  and the cpusets `assign_cpusets` gives them do not overlap. A model without `cpus` is not
  pinned and not budgeted.

"Awake" means running, healthy, loading or drifted (a drifted container may be running and
holding memory). A sleeping model counts 0 against the GPU budget: vLLM's sleep level 1
moves the weights to CPU RAM and frees the GPU memory of weights and KV cache. It still
keeps its CUDA context (a few hundred MiB per GPU), which the margin between the ceiling
and 1.0 is meant to absorb. It also counts 0 CPU cores (an idle process).

Remote (`url`) models are routed to, never planned: they are ignored here.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from fleet.registry import ModelSpec, Registry
from fleet.spec import DEFAULT_NAME_PREFIX, ContainerSpec, SpecError, container_spec

AWAKE_STATES = frozenset({"running", "healthy", "loading", "drifted"})
READY_STATES = frozenset({"running", "healthy", "loading"})
# Violations that evicting other models can cure; the rest are about the target alone.
_PLACEMENT_KINDS = frozenset({"gpu-overcommit", "dedicated-conflict", "cpu-oversubscribed"})


@dataclass(frozen=True)
class Violation:
    """One broken placement rule. kind: gpu-overcommit, dedicated-conflict, unknown-gpu,
    tensor-parallel, cpu-oversubscribed, unknown-model, remote-model, busy, spec."""

    kind: str
    message: str


@dataclass(frozen=True)
class ObservedModel:
    """What the engine saw of one model.

    state: running | healthy | loading | sleeping | stopped | absent | drifted.
    busy: it has requests in flight. last_used: seconds (any monotonic-enough clock, the
    same for every model) of its last request; 0 = never.
    """

    name: str
    state: str
    busy: bool = False
    last_used: float = 0.0


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


# ---------------------------------------------------------------------------------------
# Placement rules
# ---------------------------------------------------------------------------------------


def check_placement(registry: Registry, awake: Collection[str]) -> list[Violation]:
    """Every rule broken when the managed models `awake` are awake together.

    Names not in the registry are reported (unknown-model); remote models are ignored.
    """
    violations: list[Violation] = []
    models: list[ModelSpec] = []
    for name in _unique(awake):
        model = registry.models.get(name)
        if model is None:
            violations.append(Violation("unknown-model", f"{name!r} is not a model of the "
                                        f"registry ({registry.source})"))
        elif model.managed:
            models.append(model)
    violations += _gpu_violations(registry, models)
    violations += _cpu_violations(registry, models)
    return violations


def _gpu_violations(registry: Registry, models: Sequence[ModelSpec]) -> list[Violation]:
    out: list[Violation] = []
    declared = {g.id for g in registry.host.gpus}
    users: dict[int, list[ModelSpec]] = {}
    for m in models:
        if len(set(m.gpus)) != len(m.gpus):
            out.append(Violation("tensor-parallel", f"model {m.name!r}: gpus {list(m.gpus)} "
                                 f"lists a GPU twice; tensor parallel needs distinct GPUs"))
        unknown = sorted({g for g in m.gpus if declared and g not in declared})
        if unknown:
            out.append(Violation("unknown-gpu", f"model {m.name!r}: GPU(s) {unknown} not in "
                                 f"[host].gpus (declared: {sorted(declared)})"))
        for g in dict.fromkeys(m.gpus):
            users.setdefault(g, []).append(m)
    ceiling = registry.host.gpu_memory_ceiling
    for gpu in sorted(users):
        on_gpu = users[gpu]
        total = sum(registry.gpu_fraction(m) for m in on_gpu)
        if total > ceiling + 1e-9:
            parts = " + ".join(f"{m.name} {registry.gpu_fraction(m):g}" for m in on_gpu)
            out.append(Violation("gpu-overcommit", f"GPU {gpu}: {parts} = {total:.3g} > "
                                 f"gpu_memory_ceiling {ceiling:g}"))
        dedicated = [m for m in on_gpu if m.dedicated]
        if dedicated and len(on_gpu) > 1:
            owner = dedicated[0]
            others = ", ".join(m.name for m in on_gpu if m is not owner)
            out.append(Violation("dedicated-conflict", f"GPU {gpu}: {owner.name} is dedicated "
                                 f"(owns GPU(s) {list(owner.gpus)}) but {others} would "
                                 f"share it"))
    return out


def _cpu_violations(registry: Registry, models: Sequence[ModelSpec]) -> list[Violation]:
    host_cpus = registry.host.cpus
    if host_cpus is None:
        return []
    budgeted = [m for m in models if registry.cpus(m)]
    need = sum(registry.cpus(m) or 0 for m in budgeted) + registry.host.gateway_cpus
    if need > host_cpus:
        parts = " + ".join(f"{m.name} {registry.cpus(m)}" for m in budgeted)
        parts = f"{parts} + gateway {registry.host.gateway_cpus}" if parts else \
            f"gateway {registry.host.gateway_cpus}"
        return [Violation("cpu-oversubscribed", f"CPU: {parts} = {need} cores > [host].cpus "
                          f"{host_cpus}")]
    # The budget fits; the cpusets (fixed per model, see assign_cpusets) must not collide.
    cpusets = _core_sets(registry, registry.names())
    seen: dict[int, str] = {}
    for m in budgeted:
        for core in sorted(cpusets.get(m.name, ())):
            if core in seen:
                return [Violation("cpu-oversubscribed", f"CPU: {m.name} and {seen[core]} are "
                                  f"both pinned to core {core} (the cores of models that can "
                                  f"be awake together are fragmented); add cores or lower "
                                  f"`cpus`")]
            seen[core] = m.name
    return []


def check_registry(registry: Registry, *, name_prefix: str = DEFAULT_NAME_PREFIX) -> list[Violation]:
    """What `fleet check` prints: every model alone must fit, and all autostart models awake
    together must fit; plus any model that cannot be turned into a container (kind spec)."""
    found: list[Violation] = []
    managed = [n for n, m in registry.models.items() if m.managed]
    for name in managed:
        try:
            container_spec(registry, name, name_prefix=name_prefix)
        except SpecError as exc:
            found.append(Violation("spec", str(exc)))
        for v in check_placement(registry, [name]):
            found.append(Violation(v.kind, f"{name} alone: {v.message}"))
    autostart = [n for n in managed if registry.models[n].autostart]
    for v in check_placement(registry, autostart):
        found.append(Violation(v.kind, f"autostart models together ({', '.join(autostart)}): "
                               f"{v.message}"))
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------
# Switch planning
# ---------------------------------------------------------------------------------------


def plan_switch(
    registry: Registry,
    observed: Mapping[str, ObservedModel],
    target: str,
    *,
    force: bool = False,
) -> SwitchPlan:
    """Plan `fleet switch target`: the minimal set of awake models to evict so it fits.

    `target` may be a name or an alias; an unknown or remote target is a violation (not an
    exception), so callers report every refusal the same way. Models in `observed` that are
    not managed models of the registry are ignored.

    Minimal, precisely: among the sets of other awake models whose eviction lets the target
    fit (check_placement passes for the remaining awake models plus the target), choose by
    (1) fewest busy models (a busy model is only a candidate with `force`), then (2) fewest
    models, then (3) least recently used: the set whose most recently used member is the
    oldest wins, comparing the members' `last_used` from newest to oldest, then names.

    Each eviction is "sleep" for a `sleep_mode` model that is running/healthy, else "stop"
    (a loading or drifted container cannot be put to sleep). start_action: "none" when the
    target is already running, healthy or loading, "wake" when sleeping, "start" otherwise
    (stopped, absent, drifted: the lifecycle recreates a drifted container).
    """
    model = registry.get(target)
    if model is None:
        return SwitchPlan(target, (), "none", (Violation(
            "unknown-model", f"{target!r} is not a model or alias of the registry "
                             f"({registry.source})"),))
    name = model.name
    if not model.managed:
        return SwitchPlan(name, (), "none", (Violation(
            "remote-model", f"{name!r} is a remote model ({model.url}): routed to, never "
                            f"started or stopped by the fleet"),))

    current = observed.get(name)
    state = current.state if current is not None else "absent"
    start_action: Literal["start", "wake", "none"]
    if state in READY_STATES:
        return SwitchPlan(name, (), "none", ())
    start_action = "wake" if state == "sleeping" else "start"

    # The target alone must fit; otherwise no eviction helps.
    alone = check_placement(registry, [name])
    if alone:
        return SwitchPlan(name, (), start_action, tuple(alone))

    others = [o for o in _awake(registry, observed) if o.name != name]
    idle = [o for o in others if not o.busy]
    busy = [o for o in others if o.busy]
    chosen = _minimal_eviction(registry, name, idle, busy)
    if chosen is None:  # cannot happen when the target alone fits; kept as a guard
        return SwitchPlan(name, (), start_action, tuple(
            check_placement(registry, [name, *(o.name for o in others)])))
    blocking = [o for o in chosen if o.busy]
    if blocking and not force:
        names = ", ".join(o.name for o in blocking)
        needed = ", ".join(o.name for o in chosen)
        return SwitchPlan(name, (), start_action, (Violation(
            "busy", f"switching to {name} needs to evict {needed}; {names} "
                    f"{'is' if len(blocking) == 1 else 'are'} serving requests; retry when "
                    f"idle or force it (their in-flight requests will fail)"),))
    evictions = tuple(_eviction(registry, o, registry.models[name]) for o in chosen)
    return SwitchPlan(name, evictions, start_action, ())


def _awake(registry: Registry, observed: Mapping[str, ObservedModel]) -> list[ObservedModel]:
    out = []
    for key in sorted(observed):
        o = observed[key]
        m = registry.models.get(o.name)
        if m is not None and m.managed and o.state in AWAKE_STATES:
            out.append(o)
    return out


def _minimal_eviction(
    registry: Registry, target: str, idle: Sequence[ObservedModel], busy: Sequence[ObservedModel]
) -> tuple[ObservedModel, ...] | None:
    everyone = [*idle, *busy]

    def fits(evicted: Collection[ObservedModel]) -> bool:
        out = {o.name for o in evicted}
        remaining = [o.name for o in everyone if o.name not in out]
        return not check_placement(registry, [*remaining, target])

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
        "sleep" if m.sleep_mode and o.state in ("running", "healthy") else "stop")
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


# ---------------------------------------------------------------------------------------
# CPU pinning
# ---------------------------------------------------------------------------------------


def assign_cpusets(registry: Registry, models: Sequence[str]) -> dict[str, str]:
    """A cpuset string (e.g. "2-9") for each of `models` that has a `cpus` budget.

    Deterministic and independent of what is running, so a model's spec (and hash) does not
    change between switches: call it with every managed model (`registry.names()`), as
    `fleet_specs` does. Returns {} when `[host].cpus` is not declared (unknown cores: no
    pinning). Cores 0..gateway_cpus-1 are kept for the gateway; models get the others, in
    the order given, each the lowest-numbered cores not already given to a model that may
    be awake beside it (models that exclude each other on a GPU may share cores). When no
    such cores are left, the least-loaded cores are reused: check_placement reports that
    as cpu-oversubscribed whenever such models are awake together.
    """
    return {name: _cpuset_string(cores)
            for name, cores in _core_sets(registry, models).items()}


def gateway_cpuset(registry: Registry) -> str | None:
    """The cores kept for the gateway (0..gateway_cpus-1), or None when not pinned."""
    host_cpus, keep = registry.host.cpus, registry.host.gateway_cpus
    if host_cpus is None or keep <= 0:
        return None
    return _cpuset_string(range(min(keep, host_cpus)))


def _core_sets(registry: Registry, models: Iterable[str]) -> dict[str, tuple[int, ...]]:
    host_cpus = registry.host.cpus
    if host_cpus is None:
        return {}
    pool = list(range(min(registry.host.gateway_cpus, host_cpus), host_cpus)) or \
        list(range(host_cpus))
    assigned: dict[str, tuple[int, ...]] = {}
    for name in _unique(models):
        m = registry.models[name]
        want = registry.cpus(m) if m.managed else None
        if not want:
            continue
        taken = set()
        for other, cores in assigned.items():
            if not _gpu_exclusive(registry, m, registry.models[other]):
                taken.update(cores)
        free = [c for c in pool if c not in taken]
        if len(free) >= want:
            cores = free[:want]
        else:
            load = {c: sum(c in cs for cs in assigned.values()) for c in pool}
            rest = sorted((c for c in pool if c not in free), key=lambda c: (load[c], c))
            cores = sorted(free + rest[:want - len(free)])
        assigned[name] = tuple(cores[:len(pool)])
    return assigned


def _gpu_exclusive(registry: Registry, a: ModelSpec, b: ModelSpec) -> bool:
    """True when a and b can never be awake together for GPU reasons."""
    return any(v.kind in ("gpu-overcommit", "dedicated-conflict")
               for v in _gpu_violations(registry, [a, b]))


def _cpuset_string(cores: Sequence[int]) -> str:
    ranges: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(cores)), key=lambda p: p[1] - p[0]):
        run = [c for _, c in group]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(ranges)


def fleet_specs(registry: Registry, *, name_prefix: str = DEFAULT_NAME_PREFIX) -> dict[str, ContainerSpec]:
    """The container spec of every managed model, pinned with `assign_cpusets` over all of
    them: the one set of specs both the fleet and compose.yaml are made from."""
    managed = [n for n, m in registry.models.items() if m.managed]
    cpusets = assign_cpusets(registry, managed)
    return {n: container_spec(registry, n, cpuset=cpusets.get(n), name_prefix=name_prefix)
            for n in managed}


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
