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

Replicas: every replica is a vLLM server of its own, with the model's GPUs and fraction, so
2 awake replicas at 0.3 on GPU 0 take 0.6 of it, and each replica has its own `cpus` cores.
The awake set is therefore a set of replicas: `check_placement` takes model names (each
counted with its `initial_replicas`, what `fleet up` starts) or a mapping of model name to a
replica count (replicas 0..n-1) or to the replica indices that are awake.

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
from typing import Literal, TypeAlias

from fleet.registry import ModelSpec, Registry
from fleet.spec import DEFAULT_NAME_PREFIX, ContainerSpec, SpecError, container_spec

# What may be awake: names (each with its initial replicas), or name -> count / indices.
AwakeSet: TypeAlias = Collection[str] | Mapping[str, int | Collection[int]]

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

    state: running | healthy | loading | sleeping | stopped | absent | drifted (for a model
    with replicas, `model_state` of its replicas' states). busy: it has requests in flight.
    last_used: seconds (any monotonic-enough clock, the same for every model) of its last
    request; 0 = never. replicas: the indices of its awake replicas; None means replica 0
    alone when `state` is awake, none otherwise.
    """

    name: str
    state: str
    busy: bool = False
    last_used: float = 0.0
    replicas: tuple[int, ...] | None = None

    @property
    def awake_replicas(self) -> tuple[int, ...]:
        if self.replicas is not None:
            return tuple(sorted(set(self.replicas)))
        return (0,) if self.state in AWAKE_STATES else ()


def model_state(replica_states: Sequence[str]) -> str:
    """One word for a model from its replicas' states (the replicas that matter: those that
    should be up). All ready: the least ready of them (loading, then running, then healthy);
    otherwise drifted, sleeping, stopped, absent, the first present in that order."""
    states = list(replica_states)
    if not states:
        return "absent"
    if all(s in READY_STATES for s in states):
        return next(s for s in ("loading", "running", "healthy") if s in states)
    for s in ("drifted", "sleeping", "stopped"):
        if s in states:
            return s
    return "absent"


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


def check_placement(registry: Registry, awake: AwakeSet) -> list[Violation]:
    """Every rule broken when the replicas `awake` are awake together.

    `awake`: model names (each counted with its `initial_replicas`), or a mapping of model
    name to a replica count (replicas 0..n-1) or to awake replica indices. Names not in the
    registry are reported (unknown-model); remote models are ignored. On a Swarm registry
    the rules apply node by node (`fleet.nodeplan`).
    """
    if registry.nodes:
        from fleet.nodeplan import check_per_node
        return check_per_node(registry, awake)
    violations: list[Violation] = []
    units: list[tuple[ModelSpec, tuple[int, ...]]] = []
    for name, indices in _normalize(registry, awake).items():
        model = registry.models.get(name)
        if model is None:
            violations.append(Violation("unknown-model", f"{name!r} is not a model of the "
                                        f"registry ({registry.source})"))
        elif model.managed and indices:
            units.append((model, indices))
    violations += _gpu_violations(registry, units)
    violations += _cpu_violations(registry, units)
    return violations


def _normalize(registry: Registry, awake: AwakeSet) -> dict[str, tuple[int, ...]]:
    if isinstance(awake, Mapping):
        out: dict[str, tuple[int, ...]] = {}
        for name, value in awake.items():
            out[name] = tuple(range(value)) if isinstance(value, int) else \
                tuple(sorted(set(value)))
        return out
    return {name: tuple(range(m.initial_replicas)) if (m := registry.models.get(name)) else (0,)
            for name in _unique(awake)}


def _count_text(m: ModelSpec, n: int, value: str) -> str:
    return f"{m.name} {value}" if n == 1 else f"{m.name} {n}x{value}"


def _gpu_violations(registry: Registry,
                    units: Sequence[tuple[ModelSpec, Sequence[int]]]) -> list[Violation]:
    out: list[Violation] = []
    declared = {g.id for g in registry.host.gpus}
    users: dict[int, list[tuple[ModelSpec, int]]] = {}
    for m, indices in units:
        if len(set(m.gpus)) != len(m.gpus):
            out.append(Violation("tensor-parallel", f"model {m.name!r}: gpus {list(m.gpus)} "
                                 f"lists a GPU twice; tensor parallel needs distinct GPUs"))
        unknown = sorted({g for g in m.gpus if declared and g not in declared})
        if unknown:
            out.append(Violation("unknown-gpu", f"model {m.name!r}: GPU(s) {unknown} not in "
                                 f"[host].gpus (declared: {sorted(declared)})"))
        for g in dict.fromkeys(m.gpus):
            users.setdefault(g, []).append((m, len(indices)))
    ceiling = registry.host.gpu_memory_ceiling
    for gpu in sorted(users):
        on_gpu = users[gpu]
        total = sum(registry.gpu_fraction(m) * n for m, n in on_gpu)
        if total > ceiling + 1e-9:
            parts = " + ".join(_count_text(m, n, f"{registry.gpu_fraction(m):g}")
                               for m, n in on_gpu)
            out.append(Violation("gpu-overcommit", f"GPU {gpu}: {parts} = {total:.3g} > "
                                 f"gpu_memory_ceiling {ceiling:g}"))
        dedicated = [(m, n) for m, n in on_gpu if m.dedicated]
        if dedicated and (len(on_gpu) > 1 or dedicated[0][1] > 1):
            owner, count = dedicated[0]
            others = [m.name for m, _ in on_gpu if m is not owner]
            if count > 1:
                others.append(f"{count - 1} more replica(s) of {owner.name}")
            out.append(Violation("dedicated-conflict", f"GPU {gpu}: {owner.name} is dedicated "
                                 f"(owns GPU(s) {list(owner.gpus)}) but {', '.join(others)} "
                                 f"would share it"))
    return out


def _cpu_violations(registry: Registry,
                    units: Sequence[tuple[ModelSpec, Sequence[int]]]) -> list[Violation]:
    host_cpus = registry.host.cpus
    if host_cpus is None:
        return []
    budgeted = [(m, idx) for m, idx in units if registry.cpus(m)]
    need = sum((registry.cpus(m) or 0) * len(idx) for m, idx in budgeted) + \
        registry.host.gateway_cpus
    if need > host_cpus:
        parts = " + ".join(_count_text(m, len(idx), str(registry.cpus(m))) for m, idx in budgeted)
        parts = f"{parts} + gateway {registry.host.gateway_cpus}" if parts else \
            f"gateway {registry.host.gateway_cpus}"
        return [Violation("cpu-oversubscribed", f"CPU: {parts} = {need} cores > [host].cpus "
                          f"{host_cpus}")]
    # The budget fits; the cpusets (fixed per replica, see assign_cpusets) must not collide.
    cpusets = _core_sets(registry, registry.names())
    seen: dict[int, str] = {}
    for m, indices in budgeted:
        for i in indices:
            who = _unit_text(m, i)
            for core in sorted(cpusets.get((m.name, i), ())):
                if core in seen:
                    return [Violation("cpu-oversubscribed", f"CPU: {who} and {seen[core]} are "
                                      f"both pinned to core {core} (the cores of models that "
                                      f"can be awake together are fragmented); add cores or "
                                      f"lower `cpus`")]
                seen[core] = who
    return []


def _unit_text(m: ModelSpec, replica: int) -> str:
    return m.name if m.replica_slots == 1 else f"{m.name} replica {replica}"


def check_registry(registry: Registry, *, name_prefix: str = DEFAULT_NAME_PREFIX) -> list[Violation]:
    """What `fleet check` prints: every model alone must fit with its initial replicas and
    with all its replica slots (else they can never all be used), and all autostart models
    awake together (initial replicas) must fit; plus any model that cannot be turned into a
    container (kind spec)."""
    found: list[Violation] = []
    managed = [n for n, m in registry.models.items() if m.managed]
    for name in managed:
        model = registry.models[name]
        try:
            container_spec(registry, name, name_prefix=name_prefix)
        except SpecError as exc:
            found.append(Violation("spec", str(exc)))
        alone = check_placement(registry, [name])
        for v in alone:
            found.append(Violation(v.kind, f"{name} alone: {v.message}"))
        if not alone and model.replica_slots > model.initial_replicas:
            for v in check_placement(registry, {name: model.replica_slots}):
                found.append(Violation(v.kind, f"{name} alone with all {model.replica_slots} "
                                       f"replicas (max_replicas): {v.message}"))
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
    replicas: Collection[int] | None = None,
) -> SwitchPlan:
    """Plan `fleet switch target`: the minimal set of awake models to evict so it fits.

    `target` may be a name or an alias; an unknown or remote target is a violation (not an
    exception), so callers report every refusal the same way. Models in `observed` that are
    not managed models of the registry are ignored. `replicas`: the target's replica
    indices that will be awake (default: 0..initial_replicas-1 plus those awake now); every
    awake replica of every model counts against the budget.

    Minimal, precisely: among the sets of other awake models whose eviction lets the target
    fit (check_placement passes for the remaining awake replicas plus the target's), choose
    by (1) fewest busy models (a busy model is only a candidate with `force`), then (2)
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
    if replicas is None:
        now_awake = current.awake_replicas if current is not None else ()
        replicas = {*range(model.initial_replicas), *now_awake}
    wanted = tuple(sorted(set(replicas)))

    # The target alone must fit; otherwise no eviction helps.
    alone = check_placement(registry, {name: wanted})
    if alone:
        return SwitchPlan(name, (), start_action, tuple(alone))

    others = [o for o in _awake(registry, observed) if o.name != name]
    idle = [o for o in others if not o.busy]
    busy = [o for o in others if o.busy]
    chosen = _minimal_eviction(registry, name, wanted, idle, busy)
    if chosen is None:  # cannot happen when the target alone fits; kept as a guard
        return SwitchPlan(name, (), start_action, tuple(check_placement(
            registry, {**{o.name: o.awake_replicas for o in others}, name: wanted})))
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
        if m is not None and m.managed and o.awake_replicas:
            out.append(o)
    return out


def _minimal_eviction(
    registry: Registry, target: str, wanted: tuple[int, ...],
    idle: Sequence[ObservedModel], busy: Sequence[ObservedModel],
) -> tuple[ObservedModel, ...] | None:
    everyone = [*idle, *busy]

    def fits(evicted: Collection[ObservedModel]) -> bool:
        out = {o.name for o in evicted}
        remaining = {o.name: o.awake_replicas for o in everyone if o.name not in out}
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
    """A cpuset string (e.g. "2-9") for replica 0 of each of `models` that has a `cpus`
    budget (`assign_replica_cpusets` gives every replica's).

    Deterministic and independent of what is running, so a model's spec (and hash) does not
    change between switches: call it with every managed model (`registry.names()`), as
    `fleet_specs` does. Returns {} when `[host].cpus` is not declared (unknown cores: no
    pinning).
    """
    return {name: cpuset for (name, replica), cpuset in
            assign_replica_cpusets(registry, models).items() if replica == 0}


def assign_replica_cpusets(registry: Registry, models: Sequence[str]) -> dict[tuple[str, int], str]:
    """A cpuset string for every replica slot (model, index) of `models` with a `cpus`
    budget; {} when `[host].cpus` is not declared.

    Cores 0..gateway_cpus-1 are kept for the gateway; replicas get the others, model by
    model in the order given and replica by replica, each the lowest-numbered cores not
    already given to a replica that may be awake beside it (replicas of models that exclude
    each other on a GPU may share cores; a model's own replicas never do unless they cannot
    be awake together). When no such cores are left, the least-loaded cores are reused:
    check_placement reports that as cpu-oversubscribed whenever such replicas are awake
    together.
    """
    return {unit: _cpuset_string(cores)
            for unit, cores in _core_sets(registry, models).items()}


def gateway_cpuset(registry: Registry) -> str | None:
    """The cores kept for the gateway (0..gateway_cpus-1), or None when not pinned."""
    host_cpus, keep = registry.host.cpus, registry.host.gateway_cpus
    if host_cpus is None or keep <= 0:
        return None
    return _cpuset_string(range(min(keep, host_cpus)))


def _core_sets(registry: Registry, models: Iterable[str]) -> dict[tuple[str, int], tuple[int, ...]]:
    host_cpus = registry.host.cpus
    if host_cpus is None:
        return {}
    pool = list(range(min(registry.host.gateway_cpus, host_cpus), host_cpus)) or \
        list(range(host_cpus))
    assigned: dict[tuple[str, int], tuple[int, ...]] = {}
    for name in _unique(models):
        m = registry.models[name]
        want = registry.cpus(m) if m.managed else None
        if not want:
            continue
        for replica in range(m.replica_slots):
            taken = set()
            for (other, _), cores in assigned.items():
                if not _gpu_exclusive(registry, m, registry.models[other]):
                    taken.update(cores)
            free = [c for c in pool if c not in taken]
            if len(free) >= want:
                cores = free[:want]
            else:
                load = {c: sum(c in cs for cs in assigned.values()) for c in pool}
                rest = sorted((c for c in pool if c not in free), key=lambda c: (load[c], c))
                cores = sorted(free + rest[:want - len(free)])
            assigned[(name, replica)] = tuple(cores[:len(pool)])
    return assigned


def _gpu_exclusive(registry: Registry, a: ModelSpec, b: ModelSpec) -> bool:
    """True when a replica of a and one of b can never be awake together for GPU reasons
    (a and b may be the same model: two of its replicas)."""
    units = [(a, (0, 1))] if a.name == b.name else [(a, (0,)), (b, (0,))]
    return any(v.kind in ("gpu-overcommit", "dedicated-conflict")
               for v in _gpu_violations(registry, units))


def _cpuset_string(cores: Sequence[int]) -> str:
    ranges: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(cores)), key=lambda p: p[1] - p[0]):
        run = [c for _, c in group]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(ranges)


def replica_specs(registry: Registry, *,
                  name_prefix: str = DEFAULT_NAME_PREFIX) -> dict[str, tuple[ContainerSpec, ...]]:
    """The container spec of every replica slot of every managed model, pinned with
    `assign_replica_cpusets` over all of them: the one set of specs both the fleet and
    compose.yaml are made from."""
    managed = [n for n, m in registry.models.items() if m.managed]
    cpusets = assign_replica_cpusets(registry, managed)
    return {n: tuple(container_spec(registry, n, replica=i, cpuset=cpusets.get((n, i)),
                                    name_prefix=name_prefix)
                     for i in range(registry.models[n].replica_slots))
            for n in managed}


def fleet_specs(registry: Registry, *, name_prefix: str = DEFAULT_NAME_PREFIX) -> dict[str, ContainerSpec]:
    """Replica 0's container spec of every managed model (see `replica_specs`)."""
    return {n: specs[0] for n, specs in replica_specs(registry, name_prefix=name_prefix).items()}


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
