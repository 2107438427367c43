"""Placement rules: which replicas may be awake together, and which cores each is pinned to.

Pure: registry in, plain data out; nothing here touches Docker. `fleet.planner` uses these
rules to plan a switch; the gateway's scheduler asks `fits`.

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
from typing import TypeAlias

from fleet.cluster import Node, planning_node
from fleet.errors import Violation as Violation  # defined beside PlacementRefused
from fleet.inventory import Gpu, Host
from fleet.registry import ModelSpec, Registry
from fleet.states import ViolationKind

# What may be awake: names (each with its initial replicas), or name -> count / indices.
AwakeSet: TypeAlias = Collection[str] | Mapping[str, int | Collection[int]]


# ---------------------------------------------------------------------------------------
# Placement rules
# ---------------------------------------------------------------------------------------


def fits(registry: Registry, awake: AwakeSet) -> bool:
    """Whether the replicas `awake` can be awake together on this host (no placement rule
    broken): what a scheduler asks before it plans. `awake` as for `check_placement`, e.g.
    {"qwen-7b": 1, "llama-8b": 2} (model name -> awake replica count)."""
    return not check_placement(registry, awake)


def check_placement(registry: Registry, awake: AwakeSet) -> list[Violation]:
    """Every rule broken when the replicas `awake` are awake together.

    `awake`: model names (each counted with its `initial_replicas`), or a mapping of model
    name to a replica count (replicas 0..n-1) or to awake replica indices. Names not in the
    registry are reported (unknown-model); remote models are ignored. On a Swarm registry
    the rules apply node by node (`check_per_node`).
    """
    if registry.nodes:
        return check_per_node(registry, awake)
    violations: list[Violation] = []
    units: list[tuple[ModelSpec, tuple[int, ...]]] = []
    for name, indices in _normalize(registry, awake).items():
        model = registry.models.get(name)
        if model is None:
            violations.append(Violation(ViolationKind.UNKNOWN_MODEL,
                                        f"{name!r} is not a model of the "
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
            out.append(Violation(ViolationKind.TENSOR_PARALLEL,
                                 f"model {m.name!r}: gpus {list(m.gpus)} "
                                 f"lists a GPU twice; tensor parallel needs distinct GPUs"))
        unknown = sorted({g for g in m.gpus if declared and g not in declared})
        if unknown:
            out.append(Violation(ViolationKind.UNKNOWN_GPU,
                                 f"model {m.name!r}: GPU(s) {unknown} not in "
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
            out.append(Violation(ViolationKind.GPU_OVERCOMMIT,
                                 f"GPU {gpu}: {parts} = {total:.3g} > "
                                 f"gpu_memory_ceiling {ceiling:g}"))
        dedicated = [(m, n) for m, n in on_gpu if m.dedicated]
        if dedicated and (len(on_gpu) > 1 or dedicated[0][1] > 1):
            owner, count = dedicated[0]
            others = [m.name for m, _ in on_gpu if m is not owner]
            if count > 1:
                others.append(f"{count - 1} more replica(s) of {owner.name}")
            out.append(Violation(ViolationKind.DEDICATED_CONFLICT,
                                 f"GPU {gpu}: {owner.name} is dedicated "
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
        return [Violation(ViolationKind.CPU_OVERSUBSCRIBED,
                          f"CPU: {parts} = {need} cores > [host].cpus "
                          f"{host_cpus}")]
    # The budget fits; the cpusets (fixed per replica, see assign_cpusets) must not collide.
    cpusets = _core_sets(registry, registry.names())
    seen: dict[int, str] = {}
    for m, indices in budgeted:
        for i in indices:
            who = _unit_text(m, i)
            for core in sorted(cpusets.get((m.name, i), ())):
                if core in seen:
                    return [Violation(ViolationKind.CPU_OVERSUBSCRIBED,
                                      f"CPU: {who} and {seen[core]} are "
                                      f"both pinned to core {core} (the cores of models that "
                                      f"can be awake together are fragmented); add cores or "
                                      f"lower `cpus`")]
                seen[core] = who
    return []


def _unit_text(m: ModelSpec, replica: int) -> str:
    return m.name if m.replica_slots == 1 else f"{m.name} replica {replica}"


# ---------------------------------------------------------------------------------------
# On a Swarm: the same rules node by node. A model is budgeted on its planning node
# (`fleet.cluster.planning_node`); each node is checked as `[host]` is on one machine, on a
# view of the registry whose host is that node's inventory and whose models are the ones
# planned there. Violations name the node.
# ---------------------------------------------------------------------------------------


def node_view(registry: Registry, node_name: str) -> Registry:
    """`registry` as one host: `node_name`'s inventory as `[host]`, only the managed models
    planned on it, no cluster (so the planner treats it as a single machine)."""
    node = registry.nodes[node_name]
    return registry.model_copy(update={
        "host": _host_of(node),
        "models": {n: m for n, m in registry.models.items()
                   if m.managed and planning_node(registry.nodes, m) == node_name},
        "cluster": None,
        "nodes": {},
    })


def _host_of(node: Node) -> Host:
    return Host(gpus=tuple(Gpu(id=g.id, memory_gib=g.memory_gib) for g in node.gpus),
                cpus=node.cpus, gateway_cpus=node.gateway_cpus,
                gpu_memory_ceiling=node.gpu_memory_ceiling)


def models_by_node(registry: Registry, names: Collection[str]) -> dict[str | None, list[str]]:
    """The managed models among `names`, grouped by planning node (None: no node fits)."""
    out: dict[str | None, list[str]] = {}
    for name in names:
        m = registry.models.get(name)
        if m is not None and m.managed:
            out.setdefault(planning_node(registry.nodes, m), []).append(name)
    return out


def check_per_node(registry: Registry, awake: AwakeSet) -> list[Violation]:
    """`fleet.placement.check_placement` for a Swarm registry: the rules per node."""
    names = list(awake)
    out: list[Violation] = []
    unknown = [n for n in names if n not in registry.models]
    for n in unknown:
        out.append(Violation(ViolationKind.UNKNOWN_MODEL,
                             f"{n!r} is not a model of the registry ({registry.source})"))
    for node_name, group in models_by_node(registry, names).items():
        if node_name is None:
            out += [Violation(ViolationKind.UNKNOWN_NODE,
                              f"model {n!r}: no [nodes.NAME] table can run it (check its node, "
                              f"node_labels and gpus)")
                    for n in group]
            continue
        view = node_view(registry, node_name)
        part: AwakeSet
        part = {n: awake[n] for n in group} if isinstance(awake, Mapping) else group
        for v in check_placement(view, part):
            out.append(Violation(v.kind, f"node {node_name}: {v.message}"))
    return out


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
            taken: set[int] = set()
            for (other, _), given in assigned.items():
                if not _gpu_exclusive(registry, m, registry.models[other]):
                    taken.update(given)
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
    return any(v.kind in (ViolationKind.GPU_OVERCOMMIT, ViolationKind.DEDICATED_CONFLICT)
               for v in _gpu_violations(registry, units))


def _cpuset_string(cores: Sequence[int]) -> str:
    ranges: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(cores)), key=lambda p: p[1] - p[0]):
        run = [c for _, c in group]
        ranges.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(ranges)


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
