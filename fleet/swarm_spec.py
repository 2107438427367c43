"""The Swarm service shape and the reading of services and tasks (pure, unit-tested).

The service shape (`service_spec`), pure and unit-tested:
- ContainerSpec: the image, vLLM's flags as `Args` (the image's entrypoint runs the server),
  `Env`, labels, bind `Mounts` (host paths must exist on every node the model may run on),
  `/dev/shm` as a tmpfs of the model's `shm_size` (Swarm services have no `--ipc host` nor
  `--shm-size`), the registry's health check, `StopGracePeriod`.
- Placement: `node.labels.io.vllm-fleet.managed==true` (a node the registry declares: `fleet
  up` labels them), plus `node.labels.io.vllm-fleet.node==NAME` for a model with `node`, or
  `node.labels.K==V` for each of its `node_labels`. Swarm reschedules on another allowed node
  when one is drained or lost.
- GPUs (`[cluster] gpu_mode`, NVIDIA's two documented ways for Swarm): `visible-devices`
  sets `NVIDIA_VISIBLE_DEVICES` to the model's GPU ids (the nodes run the NVIDIA runtime as
  their default runtime; the planner budgets fractions per GPU as on one host);
  `generic-resource` reserves `len(gpus)` units of the generic resource the nodes advertise
  (`node-generic-resources` in daemon.json, kind `[cluster] gpu_resource`, default `gpu`,
  which the NVIDIA runtime reads as `DOCKER_RESOURCE_GPU` with `swarm-resource` set in its
  config.toml): Swarm picks the GPUs, so use it for whole-GPU (`dedicated`) models.
- Ports: published in host mode on the replica's port (no routing mesh: it needs IPVS),
  endpoint mode `dnsrr` (no virtual IP), so an overlay network resolves the service name to
  its task; on `[cluster] network` the task also answers to the replica's compose name
  (`vllm-<name>`, `vllm-<name>-r<i>`), the name a gateway with `GATEWAY_UPSTREAM_HOST=service`
  uses.
- Restart policy `any` after 5 s: a crashed replica or a lost node is replaced by Swarm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fleet.cluster import (
    NODE_NAME_LABEL,
    Cluster,
)
from fleet.containers import ContainerRecord, parse_time
from fleet.registry import Registry, replica_service_name
from fleet.spec import LABEL_MANAGED, LABEL_MODEL, LABEL_REPLICA, LABEL_SPEC_HASH

LABEL_SWARM_NODE = "io.vllm-fleet.swarm-node"
NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
NVIDIA_DRIVER_CAPABILITIES = "NVIDIA_DRIVER_CAPABILITIES"
DEFAULT_SHM_BYTES = 8 << 30
RESTART_DELAY_NS = 5_000_000_000
_NS = 1_000_000_000
# Task states before "running" (Swarm's task lifecycle); "starting" waits for the health check.
_COMING = frozenset({"new", "allocated", "pending", "assigned", "accepted", "preparing",
                     "ready", "starting"})
_FAILED = frozenset({"failed", "rejected"})
CRASH_LOOP_FAILURES = 3


# ---------------------------------------------------------------------------------------
# Pure: service specs
# ---------------------------------------------------------------------------------------


def parse_size(text: str | None) -> int:
    """Docker's size strings ("64m", "8g", "1024") in bytes; the 8 GiB default for None."""
    if not text:
        return DEFAULT_SHM_BYTES
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*", text.lower())
    if m is None:
        raise ValueError(f"{text!r} is not a size like 64m or 8g")
    scale = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def placement_constraints(registry: Registry, model_name: str) -> list[str]:
    """Swarm constraints that keep a model on the nodes its registry entry allows."""
    m = registry.models[model_name]
    out = [f"node.labels.{LABEL_MANAGED}==true"]
    if m.node is not None:
        out.append(f"node.labels.{NODE_NAME_LABEL}=={m.node}")
    for key, value in sorted(m.node_labels.items()):
        out.append(f"node.labels.{key}=={value}")
    return out


def gpu_settings(gpu_ids: Sequence[str], cluster: Cluster) -> tuple[dict[str, str],
                                                                    list[dict[str, Any]]]:
    """(environment, generic resource reservations) that give a service its GPUs."""
    if not gpu_ids:
        return {}, []
    if cluster.gpu_mode == "generic-resource":
        return {}, [{"DiscreteResourceSpec": {"Kind": cluster.gpu_resource,
                                              "Value": len(gpu_ids)}}]
    return ({NVIDIA_VISIBLE_DEVICES: ",".join(gpu_ids),
             NVIDIA_DRIVER_CAPABILITIES: "compute,utility"}, [])


def _gpu_ids(run_kwargs: Mapping[str, Any]) -> list[str]:
    ids: list[str] = []
    for req in run_kwargs.get("device_requests") or []:
        ids += [str(i) for i in (req.get("DeviceIDs") or req.get("device_ids") or [])]
    return ids


def _healthcheck(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not raw:
        return None
    keys = {"test": "Test", "interval": "Interval", "timeout": "Timeout", "retries": "Retries",
            "start_period": "StartPeriod"}
    return {keys.get(k, k): v for k, v in raw.items()}


def _published_ports(run_kwargs: Mapping[str, Any]) -> list[int]:
    out: list[int] = []
    for key, binding in (run_kwargs.get("ports") or {}).items():
        if isinstance(binding, tuple):
            out.append(int(binding[1]))
        else:
            out.append(int(str(key).split("/", 1)[0]))
    return sorted(set(out))


def service_spec(run_kwargs: Mapping[str, Any], registry: Registry, *,
                 stop_timeout: float = 30.0) -> dict[str, Any]:
    """Keyword arguments for the SDK's `APIClient.create_service` (Docker Engine API shapes,
    as plain dicts) from `fleet.spec.docker_run_kwargs` of a model replica."""
    labels = dict(run_kwargs.get("labels") or {})
    model = labels[LABEL_MODEL]
    cluster = registry.cluster or Cluster(engine="swarm")
    gpu_env, generic = gpu_settings(_gpu_ids(run_kwargs), cluster)
    env = {**dict(run_kwargs.get("environment") or {}), **gpu_env}
    mounts: list[dict[str, Any]] = [
        {"Type": "bind", "Source": host, "Target": bind["bind"],
         "ReadOnly": bind.get("mode") == "ro"}
        for host, bind in (run_kwargs.get("volumes") or {}).items()]
    mounts.append({"Type": "tmpfs", "Target": "/dev/shm",
                   "TmpfsOptions": {"SizeBytes": parse_size(run_kwargs.get("shm_size"))}})
    container: dict[str, Any] = {
        "Image": run_kwargs["image"],
        "Args": list(run_kwargs.get("command") or []),
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "Labels": labels,
        "Mounts": mounts,
        "StopGracePeriod": int(stop_timeout * _NS),
    }
    health = _healthcheck(run_kwargs.get("healthcheck"))
    if health:
        container["Healthcheck"] = health
    task: dict[str, Any] = {
        "ContainerSpec": container,
        "RestartPolicy": {"Condition": "any", "Delay": RESTART_DELAY_NS, "MaxAttempts": 0},
        "Placement": {"Constraints": placement_constraints(registry, model)},
        "Resources": {"Reservations": {"GenericResources": generic}} if generic else {},
    }
    if cluster.network:
        # the replica's compose name on the overlay: a gateway on it with
        # GATEWAY_UPSTREAM_HOST=service reaches `vllm-<name>` (`vllm-<name>-r<i>`), as in compose
        alias = replica_service_name(model, int(labels.get(LABEL_REPLICA, 0)))
        task["Networks"] = [{"Target": cluster.network, "Aliases": [alias]}]
    return {
        "name": run_kwargs["name"],
        "labels": labels,
        "task_template": task,
        "mode": {"Replicated": {"Replicas": 1}},
        "endpoint_spec": {"Mode": "dnsrr", "Ports": [
            {"Protocol": "tcp", "TargetPort": p, "PublishedPort": p, "PublishMode": "host"}
            for p in _published_ports(run_kwargs)]},
    }


# ---------------------------------------------------------------------------------------
# Pure: services and tasks -> records
# ---------------------------------------------------------------------------------------


def _task_time(task: Mapping[str, Any]) -> float:
    return parse_time((task.get("Status") or {}).get("Timestamp")) or \
        parse_time(task.get("CreatedAt")) or 0.0


def current_task(tasks: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The task that stands for the service now: the newest one Swarm wants running."""
    wanted = [t for t in tasks if t.get("DesiredState") == "running"]
    pool = wanted or list(tasks)
    return max(pool, key=_task_time) if pool else None


def record_from_service(service: Mapping[str, Any], tasks: Sequence[Mapping[str, Any]],
                        node_names: Mapping[str, str]) -> ContainerRecord:
    """A `ContainerRecord` for one service: state from its replicas and newest task.

    Desired replicas 0: `exited` (a stopped replica). Otherwise `running` while its task
    runs or is on its way (pending, preparing, starting: the fleet's /health probe tells
    loading from healthy), `restarting` when its last `CRASH_LOOP_FAILURES` tasks failed
    and none is coming. `node_names` maps Swarm node ids to the names shown."""
    spec = service.get("Spec") or {}
    labels = dict(spec.get("Labels") or {})
    replicas = int(((spec.get("Mode") or {}).get("Replicated") or {}).get("Replicas", 0))
    ports = tuple(sorted(int(p["PublishedPort"]) for p in
                         ((spec.get("EndpointSpec") or {}).get("Ports") or [])
                         if p.get("PublishedPort")))
    ordered = sorted(tasks, key=_task_time, reverse=True)
    task = current_task(tasks)
    status = (task or {}).get("Status") or {}
    tstate = str(status.get("State", ""))
    node = node_names.get(str((task or {}).get("NodeID", "")), "")
    failures = sum(1 for t in ordered if ((t.get("Status") or {}).get("State")) in _FAILED)
    started_at: float | None = None
    exit_code: int | None = None
    health: str | None = None
    if replicas == 0:
        state = "exited"
        code = ((status.get("ContainerStatus") or {}).get("ExitCode"))
        exit_code = int(code) if code is not None else 0
        node = ""
    elif tstate == "running":
        state, health = "running", "healthy"
        started_at = parse_time((task or {}).get("CreatedAt"))
    elif tstate in _COMING or task is None:
        state, health = "running", "starting"
        started_at = parse_time((task or {}).get("CreatedAt"))
    else:
        recent = [(t.get("Status") or {}).get("State") for t in ordered[:CRASH_LOOP_FAILURES]]
        crash = len(recent) >= CRASH_LOOP_FAILURES and all(s in _FAILED for s in recent)
        state = "restarting" if crash else "running"
        health = "starting"
        started_at = parse_time((task or {}).get("CreatedAt"))
    if node:
        labels[LABEL_SWARM_NODE] = node
    name = str(spec.get("Name", ""))
    return ContainerRecord(
        id=str(service.get("ID", "")),
        name=f"{name}@{node}" if node else name,
        model=labels.get(LABEL_MODEL, ""),
        state=state,
        health=health,
        spec_hash=labels.get(LABEL_SPEC_HASH),
        image=str(((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image", "")),
        ports=ports,
        started_at=started_at,
        exit_code=exit_code,
        restart_count=failures,
        labels=labels,
    )


def task_error(tasks: Sequence[Mapping[str, Any]]) -> str:
    """The newest task's error or message ("no suitable node ...", a pull failure)."""
    task = current_task(tasks)
    status = (task or {}).get("Status") or {}
    return str(status.get("Err") or status.get("Message") or "")


# ---------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------


