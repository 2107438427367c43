"""compose.yaml rendered from the registry: a derived view, never edited by hand.

Pure: registry in, YAML text out. Each replica slot of each managed model becomes one service
(`replica_service_name`: `vllm-<name>` for replica 0, `vllm-<name>-r<i>` for replica i) made
from the same `ContainerSpec` the fleet uses (`replica_specs`), so compose and `fleet` agree on
the
container name, labels (spec hash included), command, ports, GPUs, volumes, IPC/shm, health
check and cpuset; the fleet therefore adopts containers made by `docker compose up`.
Differences from `docker_run_kwargs`, by design:

- `HF_TOKEN: ${HF_TOKEN:-}`: compose copies the value from the shell at `up` (empty if
  unset); the file never holds it.
- `$` in registry strings is written `$$` (compose would otherwise interpolate it).
- Host paths are written as in the registry (`~` and `./x` are resolved by compose, the
  latter against the directory of compose.yaml, which sits beside models.toml).
- Models with `autostart = false` get `profiles: [on-demand]`: `docker compose up` leaves
  them to `fleet switch`.
- Replicas beyond a model's `initial_replicas` (the autoscaling slots up to `max_replicas`)
  get `profiles: [autoscale]`: `docker compose up` starts what `fleet up` starts, and the
  fleet (`fleet scale`) brings the other slots up when asked.

A `gateway` service (built from docker/gateway.Dockerfile) publishes 127.0.0.1:8000, reads
the registry mounted read-only, reaches each model by its service name, and waits for the
autostart models to be healthy.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml

from fleet.planner import gateway_cpuset, replica_specs
from fleet.registry import REGISTRY_ENV, Registry, replica_service_name
from fleet.spec import ContainerSpec, device_requests, is_named_volume

GATEWAY_SERVICE = "gateway"
GATEWAY_IMAGE = "vllm-fleet/gateway:dev"
GATEWAY_DOCKERFILE = "docker/gateway.Dockerfile"
GATEWAY_PORT = 8000
GATEWAY_REGISTRY_PATH = "/etc/vllm-fleet/models.toml"
ON_DEMAND_PROFILE = "on-demand"
AUTOSCALE_PROFILE = "autoscale"


def render_compose(
    registry: Registry,
    *,
    registry_path_in_repo: str = "models.toml",
    project: str = "vllm-fleet",
    name_prefix: str | None = None,
) -> str:
    """The compose.yaml text for `registry` (deterministic: same registry, same bytes).

    `registry_path_in_repo` is the registry's path relative to compose.yaml (mounted into the
    gateway); `project` is the compose project name; `name_prefix` the container-name prefix
    (default: the project name), which the fleet must share to adopt the containers.
    """
    specs = replica_specs(registry, name_prefix=name_prefix or project)
    services: dict[str, Any] = {}
    named_volumes: list[str] = []
    autostart: list[str] = []
    for name, replicas in specs.items():
        model = registry.models[name]
        for spec in replicas:
            service = _model_service(spec)
            service_id = replica_service_name(name, spec.replica)
            if spec.replica >= model.initial_replicas:
                service["profiles"] = [AUTOSCALE_PROFILE]
            elif not model.autostart:
                service["profiles"] = [ON_DEMAND_PROFILE]
            else:
                autostart.append(service_id)
            services[service_id] = service
            named_volumes += [h for h in spec.volumes if is_named_volume(h)]
    services[GATEWAY_SERVICE] = _gateway_service(registry, registry_path_in_repo, autostart)

    document: dict[str, Any] = {"name": project, "services": services}
    if named_volumes:
        document["volumes"] = {v: {"name": v} for v in dict.fromkeys(named_volumes)}
    header = (f"# generated from {registry_path_in_repo} by `fleet compose`; do not edit\n"
              f"# (re-render with `fleet compose --output compose.yaml`; "
              f"`fleet compose --check` fails on drift)\n")
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=1000,
                          allow_unicode=True)
    return header + body


def compose_drift(
    registry: Registry,
    existing_text: str,
    *,
    registry_path_in_repo: str = "models.toml",
    project: str = "vllm-fleet",
    name_prefix: str | None = None,
) -> str | None:
    """None when `existing_text` is what render_compose gives, else a unified diff."""
    rendered = render_compose(registry, registry_path_in_repo=registry_path_in_repo,
                              project=project, name_prefix=name_prefix)
    if rendered == existing_text:
        return None
    diff = difflib.unified_diff(
        existing_text.splitlines(keepends=True), rendered.splitlines(keepends=True),
        fromfile="compose.yaml (existing)",
        tofile=f"compose.yaml (rendered from {registry_path_in_repo})")
    text = "".join(line if line.endswith("\n") else line + "\n" for line in diff)
    return text or "compose.yaml differs from the rendered file (whitespace only)\n"


def _model_service(spec: ContainerSpec) -> dict[str, Any]:
    environment: dict[str, str] = {k: _esc(v) for k, v in spec.environment.items()}
    for secret in spec.passthrough_env:
        environment[secret] = f"${{{secret}:-}}"
    service: dict[str, Any] = {
        "image": _esc(spec.image),
        "container_name": spec.name,
        "command": [_esc(a) for a in spec.command],
        "labels": dict(spec.labels),
        "environment": environment,
        "ports": [
            {"target": int(container_port.split("/", 1)[0]), "published": str(host_port),
             "host_ip": host_ip, "protocol": container_port.split("/", 1)[1]}
            for container_port, (host_ip, host_port) in spec.ports.items()
        ],
        "volumes": [_esc(f"{host}:{bind['bind']}:{bind['mode']}")
                    for host, bind in spec.volumes.items()],
    }
    if spec.ipc_mode is not None:
        service["ipc"] = spec.ipc_mode
    if spec.shm_size is not None:
        service["shm_size"] = spec.shm_size
    if spec.cpuset_cpus is not None:
        service["cpuset"] = spec.cpuset_cpus
    hc = spec.healthcheck
    service["healthcheck"] = {
        "test": [_esc(t) for t in hc["test"]],
        "interval": _duration(hc["interval"]),
        "timeout": _duration(hc["timeout"]),
        "retries": hc["retries"],
        "start_period": _duration(hc["start_period"]),
    }
    requests = device_requests(spec)
    if requests:
        service["deploy"] = {"resources": {"reservations": {"devices": [
            {"driver": r["Driver"], "device_ids": list(r["DeviceIDs"]),
             "capabilities": [c for caps in r["Capabilities"] for c in caps]}
            for r in requests
        ]}}}
    return service


def _gateway_service(registry: Registry, registry_path: str, autostart: list[str]) -> dict[str, Any]:
    source = registry_path if registry_path.startswith(("/", ".")) else f"./{registry_path}"
    service: dict[str, Any] = {
        "build": {"context": ".", "dockerfile": GATEWAY_DOCKERFILE},
        "image": GATEWAY_IMAGE,
        "ports": [{"target": GATEWAY_PORT, "published": str(GATEWAY_PORT),
                   "host_ip": "127.0.0.1", "protocol": "tcp"}],
        "volumes": [_esc(f"{source}:{GATEWAY_REGISTRY_PATH}:ro")],
        "environment": {
            REGISTRY_ENV: GATEWAY_REGISTRY_PATH,
            "GATEWAY_UPSTREAM_HOST": "service",
            "GATEWAY_HOST": "0.0.0.0",
        },
        "restart": "unless-stopped",
    }
    cpuset = gateway_cpuset(registry)
    if cpuset is not None:
        service["cpuset"] = cpuset
    if autostart:
        service["depends_on"] = {s: {"condition": "service_healthy"} for s in autostart}
    return service


def _esc(text: str) -> str:
    """Escape compose interpolation: a literal `$` is written `$$`."""
    return text.replace("$", "$$")


def _duration(ns: int) -> str:
    """Nanoseconds -> a compose duration ("5s", "1500ms")."""
    if ns % 1_000_000_000 == 0:
        return f"{ns // 1_000_000_000}s"
    if ns % 1_000_000 == 0:
        return f"{ns // 1_000_000}ms"
    return f"{ns // 1000}us"

