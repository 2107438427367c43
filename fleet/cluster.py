"""The cluster part of the registry: `[cluster]` (which engine runs the models) and
`[nodes.NAME]` (each Swarm node's inventory), plus where a model may run.

Pure: no Docker, no network. `fleet.registry` holds these tables on `Registry.cluster` and
`Registry.nodes`; `fleet.placement.check_per_node` checks placement node by node;
`fleet.swarm` turns a model's allowed nodes into Swarm placement constraints.

- `[cluster]`: `engine` is `docker` (one host, the default: no table means that) or
  `swarm`; `manager` is the Docker API address of a Swarm manager (e.g.
  `tcp://10.0.0.1:2375`; default: `--docker-host` / `$DOCKER_HOST`); `gpu_mode` says how a
  model's GPUs reach its container on a node (see `fleet.swarm_spec.gpu_settings`); `network` an
  attachable overlay network the services join (with `endpoint_mode: dnsrr`, so a gateway
  inside the swarm reaches them by service name).
- `[nodes.NAME]`: one Swarm node. `hostname` (default NAME) matches it to the Swarm node;
  `address` is where its host-mode published ports are reached from the fleet and the
  gateway (default: the hostname); `gpus`, `cpus`, `gateway_cpus`, `gpu_memory_ceiling`
  are that node's inventory, budgeted as `[host]` is on one machine; `labels` are set on the
  Swarm node by `fleet up` and matched by models' `node_labels`.
- A model runs on the nodes it allows (`candidate_nodes`): its `node` if set, else every
  node whose labels include all of its `node_labels`. The planner budgets it on its
  *planning node* (`planning_node`: the first candidate that declares its GPUs, in the
  order the nodes are declared); Swarm may reschedule it on any other candidate when that
  node is drained or lost.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from fleet.inventory import Strict
from fleet.registry_checks import validate_section

if TYPE_CHECKING:
    from fleet.model_spec import ModelSpec

ENGINES = ("docker", "swarm")
GPU_MODES = ("visible-devices", "generic-resource")
# Set on every Swarm node the registry declares (by `fleet up`): the node's registry name.
NODE_NAME_LABEL = "io.vllm-fleet.node"
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


class NodeGpu(Strict):
    """One GPU of a node."""

    id: int = Field(ge=0)
    memory_gib: float | None = Field(default=None, gt=0)


class Cluster(Strict):
    """The `[cluster]` table."""

    engine: Literal["docker", "swarm"] = "docker"
    manager: str | None = Field(default=None, description="Docker API of a Swarm manager")
    gpu_mode: Literal["visible-devices", "generic-resource"] = "visible-devices"
    gpu_resource: str = Field(default="gpu", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                              description="generic resource kind the nodes advertise GPUs as")
    network: str | None = Field(default=None, description="attachable overlay network")


class Node(Strict):
    """One `[nodes.NAME]` table: a Swarm node's inventory."""

    hostname: str | None = None
    address: str | None = None
    gpus: tuple[NodeGpu, ...] = ()
    cpus: int | None = Field(default=None, ge=1)
    gateway_cpus: int = Field(default=0, ge=0)
    gpu_memory_ceiling: float = Field(default=0.95, gt=0, le=1)
    labels: dict[str, str] = Field(default_factory=dict)


def node_hostname(name: str, node: Node) -> str:
    """The Swarm hostname a `[nodes.NAME]` table matches."""
    return node.hostname or name


def node_address(name: str, node: Node) -> str:
    """Where the node's published ports are reached (its `address`, else its hostname)."""
    return node.address or node_hostname(name, node)


def candidate_nodes(nodes: Mapping[str, Node], model: ModelSpec) -> list[str]:
    """The nodes `model` may run on, in declaration order: its `node`, else every node
    whose labels include all of its `node_labels` (every node when it names none)."""
    if model.node is not None:
        return [model.node] if model.node in nodes else []
    return [name for name, n in nodes.items()
            if all(n.labels.get(k) == v for k, v in model.node_labels.items())]


def planning_node(nodes: Mapping[str, Node], model: ModelSpec) -> str | None:
    """The node the planner budgets `model` on: the first candidate that declares every GPU
    the model names (any candidate for a CPU-only model); None when there is none."""
    for name in candidate_nodes(nodes, model):
        declared = {g.id for g in nodes[name].gpus}
        if not model.gpus or not declared or set(model.gpus) <= declared:
            return name
    return None


def cluster_tables(data: Mapping[str, Any],
                   problems: list[str]) -> tuple[Cluster | None, dict[str, Node]]:
    """The `[cluster]` and `[nodes.NAME]` tables of parsed registry data, validated field by
    field (problems appended, as `fleet.registry.build_registry` does for the rest)."""
    cluster = validate_section(Cluster, data["cluster"], "[cluster]", problems) \
        if "cluster" in data else None
    nodes: dict[str, Node] = {}
    raw_nodes = data.get("nodes", {})
    if not isinstance(raw_nodes, Mapping):
        problems.append("[nodes]: must be a table of [nodes.NAME] tables")
        raw_nodes = {}
    for node_name, raw_node in raw_nodes.items():
        node = validate_section(Node, raw_node, f"[nodes.{node_name}]", problems)
        if node is not None:
            nodes[node_name] = node
    return cluster, nodes


def cluster_problems(cluster: Cluster | None, nodes: Mapping[str, Node],
                     models: Mapping[str, ModelSpec]) -> list[str]:
    """What is wrong with `[cluster]`, `[nodes]` and the models' `node`/`node_labels`, each
    saying how to fix it (registry validation calls this)."""
    problems: list[str] = []
    swarm = cluster is not None and cluster.engine == "swarm"
    if nodes and not swarm:
        problems.append("[nodes]: node inventories only apply to a Swarm; add [cluster] "
                        "with engine = \"swarm\" or remove the [nodes.NAME] tables")
    if swarm and not nodes:
        problems.append("[cluster]: engine = \"swarm\" needs at least one [nodes.NAME] table "
                        "(each Swarm node's inventory: gpus, cpus, labels, address)")
    hostnames: dict[str, str] = {}
    for name, n in nodes.items():
        where = f"[nodes.{name}]"
        host = node_hostname(name, n)
        if not _HOST_RE.match(host):
            problems.append(f"{where}: hostname {host!r} is not a valid host name")
        elif host in hostnames:
            problems.append(f"{where}: hostname {host!r} is already node {hostnames[host]!r}; "
                            f"each table is one Swarm node")
        else:
            hostnames[host] = name
        ids = [g.id for g in n.gpus]
        if len(set(ids)) != len(ids):
            problems.append(f"{where}: field 'gpus' lists a GPU id twice")
        for key in n.labels:
            if not _LABEL_KEY_RE.match(key) or key == NODE_NAME_LABEL:
                problems.append(f"{where}: field 'labels': {key!r} is not a usable label key "
                                f"(letters, digits, '.', '_', '-'; {NODE_NAME_LABEL} is the "
                                f"fleet's own)")
    for mname, m in models.items():
        where = f"model {mname!r}"
        wants_node = m.node is not None or bool(m.node_labels)
        if wants_node and not swarm:
            problems.append(f"{where}: fields 'node'/'node_labels' only apply to a Swarm "
                            f"([cluster] engine = \"swarm\"); remove them")
            continue
        if not swarm or not m.managed:
            if wants_node and not m.managed:
                problems.append(f"{where}: 'node'/'node_labels' only apply to managed models")
            continue
        if m.node is not None and m.node_labels:
            problems.append(f"{where}: set 'node' (one node) or 'node_labels' (any node with "
                            f"those labels), not both")
        elif m.node is not None and m.node not in nodes:
            problems.append(f"{where}: field 'node': {m.node!r} is not a [nodes.NAME] table "
                            f"(declared: {', '.join(nodes) or 'none'})")
        elif not candidate_nodes(nodes, m):
            problems.append(f"{where}: field 'node_labels': no node has the labels "
                            f"{dict(m.node_labels)}; label a node in its [nodes.NAME] table")
        elif planning_node(nodes, m) is None:
            problems.append(f"{where}: field 'gpus': none of its nodes "
                            f"({', '.join(candidate_nodes(nodes, m))}) declares GPU(s) "
                            f"{list(m.gpus)}")
    return problems


def node_urls(nodes: Mapping[str, Node], model: ModelSpec) -> list[str]:
    """Every URL where a replica of a Swarm model may answer: each replica's port (port,
    port+1, ...) on each node it may run on (its port is published in host mode on the node
    its task runs on). A router that ejects refusing URLs and probes them back finds the
    replicas wherever Swarm put them."""
    assert model.port is not None
    hosts = [node_address(n, nodes[n]) for n in candidate_nodes(nodes, model)]
    hosts = [f"[{h}]" if ":" in h else h for h in hosts]
    return [f"http://{h}:{model.port + i}" for i in range(model.replica_slots) for h in hosts]
