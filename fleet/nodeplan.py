"""Placement on a Swarm: the planner's per-host rules, applied node by node.

Pure. A model is budgeted on its planning node (`fleet.cluster.planning_node`); each node is
checked as `[host]` is on one machine (`fleet.planner.check_placement` on a view of the
registry whose host is that node's inventory and whose models are the ones planned there).
Violations name the node. `fleet.planner.check_placement` hands a Swarm registry here, so
`fleet check`, `switch`, `up`, `wake` and `scale` budget per node without knowing it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from fleet.cluster import Node, planning_node
from fleet.planner import AwakeSet, Violation, check_placement
from fleet.registry import Gpu, Host, Registry


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
    """`fleet.planner.check_placement` for a Swarm registry: the rules per node."""
    names = list(awake)
    out: list[Violation] = []
    unknown = [n for n in names if n not in registry.models]
    for n in unknown:
        out.append(Violation("unknown-model", f"{n!r} is not a model of the registry "
                                              f"({registry.source})"))
    for node_name, group in models_by_node(registry, names).items():
        if node_name is None:
            out += [Violation("unknown-node", f"model {n!r}: no [nodes.NAME] table can run it "
                                              f"(check its node, node_labels and gpus)")
                    for n in group]
            continue
        view = node_view(registry, node_name)
        part: AwakeSet
        part = {n: awake[n] for n in group} if isinstance(awake, Mapping) else group
        for v in check_placement(view, part):
            out.append(Violation(v.kind, f"node {node_name}: {v.message}"))
    return out
