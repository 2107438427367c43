"""The stack file: a Swarm registry rendered for `docker stack deploy` (`fleet compose --stack`).

Pure. Every service comes from the same service shape the fleet creates (`fleet.swarm_spec.
service_spec` over `fleet.spec`'s container specs), written in the compose file format that
`docker stack deploy` reads (version 3.8):

- one service per model replica (`vllm-<name>`, `vllm-<name>-r<i>`), `deploy.replicas` 1,
  or 0 for models without `autostart` and autoscaling slots (scale them with
  `docker service scale` or the fleet);
- `deploy.placement.constraints`: the node labels the fleet sets on the registry's nodes
  (`fleet up` labels them; on a swarm the fleet never touched, label them first:
  `docker node update --label-add io.vllm-fleet.managed=true --label-add
  io.vllm-fleet.node=NAME ...`);
- `deploy.endpoint_mode: dnsrr` and `ports` in `mode: host` (no routing mesh);
- `deploy.restart_policy` (any, after 5 s), `deploy.resources.reservations.generic_resources`
  with `gpu_mode = "generic-resource"`, else `NVIDIA_VISIBLE_DEVICES` in `environment`;
- the health check, bind mounts, `/dev/shm` as a sized tmpfs;
- `deploy.labels`: the fleet's labels (model, replica, spec hash), so the fleet finds and
  adopts the services the stack made.

`stack_drift` compares an existing file with what the registry renders, as
`fleet.compose.compose_drift` does for compose.yaml. No gateway service: the gateway runs
where it reaches the nodes (see README).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from typing import Any

import yaml

from fleet.registry import Registry, replica_service_name
from fleet.spec import DEFAULT_NAME_PREFIX, docker_run_kwargs, replica_specs
from fleet.swarm_spec import service_spec

STACK_VERSION = "3.8"


def _duration(ns: int) -> str:
    seconds = ns / 1_000_000_000
    return f"{seconds:g}s"


def _service(kwargs: dict[str, Any], replicas: int) -> dict[str, Any]:
    task = kwargs["task_template"]
    container = task["ContainerSpec"]
    env = dict(e.split("=", 1) for e in container["Env"])
    out: dict[str, Any] = {"image": container["Image"], "command": container["Args"]}
    if env:
        out["environment"] = env
    health = container.get("Healthcheck")
    if health:
        out["healthcheck"] = {
            "test": health["Test"], "interval": _duration(health["Interval"]),
            "timeout": _duration(health["Timeout"]), "retries": health["Retries"],
            "start_period": _duration(health["StartPeriod"])}
    volumes: list[dict[str, Any]] = []
    for m in container["Mounts"]:
        if m["Type"] == "tmpfs":
            volumes.append({"type": "tmpfs", "target": m["Target"],
                            "tmpfs": {"size": m["TmpfsOptions"]["SizeBytes"]}})
        else:
            volumes.append({"type": "bind", "source": m["Source"], "target": m["Target"],
                            "read_only": m["ReadOnly"]})
    out["volumes"] = volumes
    out["ports"] = [{"target": p["TargetPort"], "published": p["PublishedPort"],
                     "protocol": p["Protocol"], "mode": p["PublishMode"]}
                    for p in kwargs["endpoint_spec"]["Ports"]]
    out["stop_grace_period"] = _duration(container["StopGracePeriod"])
    deploy: dict[str, Any] = {
        "mode": "replicated",
        "replicas": replicas,
        "endpoint_mode": kwargs["endpoint_spec"]["Mode"],
        "placement": {"constraints": task["Placement"]["Constraints"]},
        "restart_policy": {"condition": task["RestartPolicy"]["Condition"],
                           "delay": _duration(task["RestartPolicy"]["Delay"])},
        "labels": kwargs["labels"],
    }
    generic = ((task.get("Resources") or {}).get("Reservations") or {}).get("GenericResources")
    if generic:
        deploy["resources"] = {"reservations": {"generic_resources": [
            {"discrete_resource_spec": {"kind": g["DiscreteResourceSpec"]["Kind"],
                                        "value": g["DiscreteResourceSpec"]["Value"]}}
            for g in generic]}}
    out["deploy"] = deploy
    if task.get("Networks"):
        out["networks"] = [n["Target"] for n in task["Networks"]]
    return out


def render_stack(registry: Registry, *, models: Collection[str] | None = None,
                 name_prefix: str = DEFAULT_NAME_PREFIX) -> str:
    """The stack file text for the managed models of a Swarm `registry` (or only `models`);
    deterministic: same registry, same bytes. ValueError for a registry without
    `[cluster] engine = "swarm"`."""
    if not registry.swarm:
        raise ValueError(f"{registry.source}: a stack file needs [cluster] engine = \"swarm\" "
                         f"and [nodes.NAME] tables; for one host use `fleet compose`")
    specs = replica_specs(registry, name_prefix=name_prefix)
    services: dict[str, Any] = {}
    for name, replicas in specs.items():
        if models is not None and name not in models:
            continue
        m = registry.models[name]
        for spec in replicas:
            kwargs = service_spec(docker_run_kwargs(spec, {}), registry)
            up = spec.replica < m.initial_replicas and (m.autostart or models is not None)
            services[replica_service_name(name, spec.replica)] = _service(kwargs, int(up))
    doc: dict[str, Any] = {"version": STACK_VERSION, "services": services}
    net = registry.cluster.network if registry.cluster else None
    if net:
        doc["networks"] = {net: {"external": True}}
    header = (f"# Rendered by `fleet compose --stack` from {registry.source}; do not edit.\n"
              f"# Deploy: docker stack deploy -c THIS_FILE vllm-fleet\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=100)


def stack_drift(registry: Registry, existing_text: str, **kw: Any) -> str | None:
    """None when `existing_text` is what `render_stack` gives, else a unified diff."""
    rendered = render_stack(registry, **kw)
    if rendered == existing_text:
        return None
    diff = difflib.unified_diff(existing_text.splitlines(keepends=True),
                                rendered.splitlines(keepends=True),
                                fromfile="stack file (existing)",
                                tofile=f"stack file (rendered from {registry.source})")
    text = "".join(line if line.endswith("\n") else line + "\n" for line in diff)
    return text or "the stack file differs from the rendered one (whitespace only)\n"
