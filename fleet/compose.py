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

- Model services get `restart: unless-stopped` (a crashed server comes back; one the fleet
  stopped stays stopped) and bounded json-file logs (`fleet.spec.LOG_OPTIONS`, as the
  containers the fleet creates).

The project's network is named after the project. A `gateway` service (built from
docker/gateway.Dockerfile) publishes 127.0.0.1:${VLLM_FLEET_GATEWAY_PORT:-8000}, reads the
registry mounted read-only and reaches each model by its service name, for its traffic and for
the health waits of its fleet (`FLEET_UPSTREAM_HOST=service`). It does not wait for the models:
it starts at once, answers 503 with the reason for a model that is not up, and has its own
health check (its `/health`). Containers its fleet creates (on-demand activation) join the
project's network under their service name and carry the project's labels
(`compose_member_labels`), so `docker compose --profile '*' down` removes them too. The switch
lock directory is mounted from the host (`${FLEET_LOCK_DIR:-/run/vllm-fleet}`, see
`fleet.lock.default_lock_path`), so `fleet switch` on the host and activations in the gateway
take turns.

The Docker socket is not mounted: `render_socket_override` gives the opt-in override file that
adds it (and the secrets the fleet passes to the models it creates).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any, Protocol

import yaml

from fleet.planner import gateway_cpuset, replica_specs
from fleet.registry import REGISTRY_ENV, Registry, replica_service_name
from fleet.spec import (
    LOG_DRIVER,
    LOG_OPTIONS,
    SECRET_ENV,
    ContainerSpec,
    device_requests,
    is_named_volume,
)

GATEWAY_SERVICE = "gateway"
GATEWAY_IMAGE = "vllm-fleet/gateway:dev"
GATEWAY_DOCKERFILE = "docker/gateway.Dockerfile"
GATEWAY_PORT = 8000
GATEWAY_REGISTRY_PATH = "/etc/vllm-fleet/models.toml"
GATEWAY_PORT_ENV = "VLLM_FLEET_GATEWAY_PORT"
LOCK_DIR_IN_CONTAINER = "/run/vllm-fleet"
HOST_LOCK_DIR = "${FLEET_LOCK_DIR:-/run/vllm-fleet}"
ON_DEMAND_PROFILE = "on-demand"
AUTOSCALE_PROFILE = "autoscale"
RESTART_POLICY = "unless-stopped"
DOCKER_SOCKET = "/var/run/docker.sock"
SOCKET_OVERRIDE_NAME = "compose.docker-socket.yaml"

# Compose's own labels: a container carrying them is one of the project's (ps, down).
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_ONEOFF_LABEL = "com.docker.compose.oneoff"
COMPOSE_CONFIG_HASH_LABEL = "com.docker.compose.config-hash"
FLEET_CONFIG_HASH = "made-by-vllm-fleet"


class _Attached(Protocol):
    @property
    def labels(self) -> Mapping[str, str]: ...

    @property
    def networks(self) -> tuple[str, ...]: ...


def compose_member_labels(project: str, service: str) -> dict[str, str]:
    """Labels that make a container the fleet creates one of compose project `project`'s
    containers for `service` (compose lists only containers with a config hash; ours is a
    marker, so a later `docker compose up` of that service recreates it its own way)."""
    return {COMPOSE_PROJECT_LABEL: project, COMPOSE_SERVICE_LABEL: service,
            COMPOSE_ONEOFF_LABEL: "False", COMPOSE_CONFIG_HASH_LABEL: FLEET_CONFIG_HASH}


def project_on_network(records: Iterable[_Attached], network: str) -> str | None:
    """The compose project of the containers on `network` (None when none belongs to one)."""
    for rec in records:
        project = rec.labels.get(COMPOSE_PROJECT_LABEL)
        if project and network in rec.networks:
            return project
    return None


def compose_file_for(registry_path: str | PurePath) -> str:
    """The compose file named after a registry, written beside it: `models.toml` ->
    `compose.yaml`, `models.<x>.toml` -> `compose.<x>.yaml`, any other `<stem>.toml` ->
    `<stem>.compose.yaml` (so rendering one registry never overwrites another's file)."""
    name = PurePath(registry_path).name
    stem = name.rsplit(".", 1)[0] if "." in name else name
    if stem == "models":
        return "compose.yaml"
    if stem.startswith("models."):
        return f"compose.{stem.removeprefix('models.')}.yaml"
    return f"{stem}.compose.yaml"


def generated_from(compose_text: str) -> str | None:
    """The registry path a rendered compose file names in its header (None if it has none)."""
    first = compose_text.split("\n", 1)[0]
    prefix, suffix = "# generated from ", " by `fleet compose`; do not edit"
    if first.startswith(prefix) and first.endswith(suffix):
        return first[len(prefix):-len(suffix)]
    return None


def render_compose(
    registry: Registry,
    *,
    registry_path_in_repo: str = "models.toml",
    project: str = "vllm-fleet",
    name_prefix: str | None = None,
    output_name: str | None = None,
) -> str:
    """The compose.yaml text for `registry` (deterministic: same registry, same bytes).

    `registry_path_in_repo` is the registry's path relative to compose.yaml (mounted into the
    gateway); `project` is the compose project name; `name_prefix` the container-name prefix
    (default: the project name), which the fleet must share to adopt the containers;
    `output_name` the file's name in its header (default: `compose_file_for` the registry).
    """
    specs = replica_specs(registry, name_prefix=name_prefix or project)
    services: dict[str, Any] = {}
    named_volumes: list[str] = []
    for name, replicas in specs.items():
        model = registry.models[name]
        for spec in replicas:
            service = _model_service(spec)
            service_id = replica_service_name(name, spec.replica)
            if spec.replica >= model.initial_replicas:
                service["profiles"] = [AUTOSCALE_PROFILE]
            elif not model.autostart:
                service["profiles"] = [ON_DEMAND_PROFILE]
            services[service_id] = service
            named_volumes += [h for h in spec.volumes if is_named_volume(h)]
    services[GATEWAY_SERVICE] = _gateway_service(registry, registry_path_in_repo, project,
                                                 name_prefix or project)

    document: dict[str, Any] = {"name": project, "services": services,
                                "networks": {"default": {"name": project}}}
    if named_volumes:
        document["volumes"] = {v: {"name": v} for v in dict.fromkeys(named_volumes)}
    output = output_name or compose_file_for(registry_path_in_repo)
    header = (f"# generated from {registry_path_in_repo} by `fleet compose`; do not edit\n"
              f"# (re-render with `fleet compose --registry {registry_path_in_repo}`, which "
              f"writes {output}; `--check` fails on drift)\n"
              f"# up: docker compose -f {output} up -d     (on-demand activation: add "
              f"-f {SOCKET_OVERRIDE_NAME})\n"
              f"# down: docker compose -f {output} --profile '*' down\n")
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
    output_name: str | None = None,
) -> str | None:
    """None when `existing_text` is what render_compose gives, else a unified diff."""
    rendered = render_compose(registry, registry_path_in_repo=registry_path_in_repo,
                              project=project, name_prefix=name_prefix, output_name=output_name)
    if rendered == existing_text:
        return None
    output = output_name or compose_file_for(registry_path_in_repo)
    diff = difflib.unified_diff(
        existing_text.splitlines(keepends=True), rendered.splitlines(keepends=True),
        fromfile=f"{output} (existing)",
        tofile=f"{output} (rendered from {registry_path_in_repo})")
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
        "restart": RESTART_POLICY,
        "logging": {"driver": LOG_DRIVER, "options": dict(LOG_OPTIONS)},
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


def _gateway_service(registry: Registry, registry_path: str, project: str,
                     name_prefix: str) -> dict[str, Any]:
    source = registry_path if registry_path.startswith(("/", ".")) else f"./{registry_path}"
    service: dict[str, Any] = {
        "build": {"context": ".", "dockerfile": GATEWAY_DOCKERFILE},
        "image": GATEWAY_IMAGE,
        "ports": [{"target": GATEWAY_PORT, "published": f"${{{GATEWAY_PORT_ENV}:-{GATEWAY_PORT}}}",
                   "host_ip": "127.0.0.1", "protocol": "tcp"}],
        "volumes": [_esc(f"{source}:{GATEWAY_REGISTRY_PATH}:ro"),
                    f"{HOST_LOCK_DIR}:{LOCK_DIR_IN_CONTAINER}"],
        "environment": {
            REGISTRY_ENV: GATEWAY_REGISTRY_PATH,
            "GATEWAY_UPSTREAM_HOST": "service",
            "GATEWAY_HOST": "0.0.0.0",
            # The gateway's fleet (on-demand activation): same containers, network, lock.
            "FLEET_UPSTREAM_HOST": "service",
            "FLEET_NETWORK": project,
            "FLEET_COMPOSE_PROJECT": project,
            "FLEET_NAME_PREFIX": name_prefix,
            "FLEET_LOCK_DIR": LOCK_DIR_IN_CONTAINER,
            # Relative bind paths of the models it creates are host paths: the registry's
            # directory on the host (compose is run from there, or set FLEET_BASE_DIR).
            "FLEET_BASE_DIR": "${FLEET_BASE_DIR:-${PWD}}",
        },
        "restart": RESTART_POLICY,
        "logging": {"driver": LOG_DRIVER, "options": dict(LOG_OPTIONS)},
        "healthcheck": {
            "test": ["CMD", "curl", "-fsS", "-o", "/dev/null",
                     f"http://127.0.0.1:{GATEWAY_PORT}/health"],
            "interval": "5s", "timeout": "3s", "retries": 3, "start_period": "30s",
        },
    }
    cpuset = gateway_cpuset(registry)
    if cpuset is not None:
        service["cpuset"] = cpuset
    return service


def render_socket_override() -> str:
    """The opt-in override that gives the compose gateway the Docker socket (on-demand
    activation, idle sleep, autoscaling) and the secrets its fleet passes to the models."""
    document = {"services": {GATEWAY_SERVICE: {
        "volumes": [f"{DOCKER_SOCKET}:{DOCKER_SOCKET}"],
        "environment": {name: f"${{{name}:-}}" for name in SECRET_ENV},
    }}}
    header = (
        "# generated by `fleet compose`; do not edit. Opt-in: use it with any rendered file,\n"
        f"#   docker compose -f compose.yaml -f {SOCKET_OVERRIDE_NAME} up -d\n"
        "# It mounts the Docker socket into the gateway so that the gateway's fleet can create,\n"
        "# start, stop, sleep and wake model containers (on-demand activation, idle ttl,\n"
        "# autoscaling). That grants the gateway process full control of the Docker daemon,\n"
        "# which is root on this host: anyone who can run code in the gateway container\n"
        "# (or reach an admin route with the admin key) can do anything Docker can. Without\n"
        "# it, a request for a model that is not up gets a 503 saying the daemon is unreachable.\n"
        f"# It also hands {', '.join(SECRET_ENV)} to the gateway, which passes it to the models it creates.\n")
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=1000)


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

