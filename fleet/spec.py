"""Container specs: one registry model -> the exact container the fleet (or compose) runs.

Pure: no Docker, no network, no files. `container_spec` derives everything from the registry;
`docker_run_kwargs` turns a spec into keyword arguments for docker-py's `containers.create` /
`containers.run`, adding the only machine-dependent bits (the caller's secrets and home
directory) at the last moment.

Rules worth knowing:

- The container runs the image's own entrypoint (`vllm/vllm-openai` runs the OpenAI server);
  `command` holds only vLLM flags, in this order: `--model`, `--served-model-name NAME
  ALIASES...`, `--host 0.0.0.0`, `--port PORT`, `--gpu-memory-utilization`,
  `--max-model-len` (when set), `--tensor-parallel-size` (when more than one GPU),
  `--enable-sleep-mode` (when `sleep_mode`), then `[defaults].args` and the model's `args`.
- The container listens on its registry port and is published on `host_ip:port`.
- Replicas: replica `i` of a model (0 <= i < `replica_slots`) is its own container, named
  `<prefix>-<model>` for replica 0 (the name a single-replica model always had) and
  `<prefix>-<model>-r<i>` otherwise, listening and published on `port + i`, labelled
  `io.vllm-fleet.replica=<i>`, with the same image, GPUs and fraction as its siblings.
- `source`: an HF repo id is passed as is. A local path is mapped into the read-only
  `/models` mount of `[defaults].models_dir`: `./x` (relative to models_dir) -> `/models/x`;
  `/models/x` is already the in-container path and is kept; an absolute host path under
  models_dir (`/srv/models/x`) -> `/models/x`. Any other absolute path is passed unchanged
  (it must exist in the image or come from the model's own `volumes`).
- Volumes: the HF cache (`[defaults].hf_cache`) read-write at `/root/.cache/huggingface`,
  models_dir read-only at `/models` (every managed model, when set), then the model's
  `volumes` entries `host:container[:ro|:rw]`. Host paths are kept as written (`~` and
  relative paths unexpanded) so the spec hash does not depend on the machine;
  `docker_run_kwargs` expands them.
- `ipc_host` (the registry default) -> `ipc_mode="host"`; otherwise a private IPC namespace
  with `shm_size` (the registry value, else `DEFAULT_SHM_SIZE`): Docker's 64 MiB default
  kills vLLM's workers.
- Secrets: `HF_TOKEN` is never in the spec, its labels, its environment or its hash; it is
  named in `passthrough_env` and copied from the caller's environment by
  `docker_run_kwargs`. A registry that sets a secret variable in `env` is refused.
- `sleep_mode` also sets `VLLM_SERVER_DEV_MODE=1`: vLLM serves `/sleep`, `/wake_up` and
  `/is_sleeping` only in that mode (ports are published on loopback by default). A CPU-only
  model (`gpus = []`) gets the dev mode without `--enable-sleep-mode`, which vLLM's CPU
  build refuses at start.
- Health check: `curl -fsS http://127.0.0.1:PORT/health` inside the container (the
  `vllm/vllm-openai` image and the project's local images ship curl), with a start period
  of the model's `health_timeout`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

from fleet.placement import assign_replica_cpusets
from fleet.registry import ModelSpec, Registry

LABEL_MANAGED = "io.vllm-fleet.managed"
LABEL_MODEL = "io.vllm-fleet.model"
LABEL_SPEC_HASH = "io.vllm-fleet.spec-hash"
LABEL_REPLICA = "io.vllm-fleet.replica"

DEFAULT_NAME_PREFIX = "vllm-fleet"
DEFAULT_SHM_SIZE = "8g"
HF_CACHE_TARGET = "/root/.cache/huggingface"
MODELS_TARGET = "/models"
# Variables whose values are secrets: copied from the caller's environment at create time,
# never stored in the registry, the spec, labels or compose.yaml.
SECRET_ENV = ("HF_TOKEN",)
# Bounded container logs (Docker's json-file driver): the same for containers the fleet
# creates and for compose's services, so a chatty server never fills the disk.
LOG_DRIVER = "json-file"
LOG_OPTIONS: Mapping[str, str] = {"max-size": "20m", "max-file": "3"}
_REFUSED_ENV = frozenset({*SECRET_ENV, "HUGGING_FACE_HUB_TOKEN"})
SLEEP_MODE_ENV = "VLLM_SERVER_DEV_MODE"

HEALTH_INTERVAL_S = 5.0
HEALTH_PROBE_TIMEOUT_S = 5.0
HEALTH_RETRIES = 3
_NS = 1_000_000_000


class SpecError(ValueError):
    """A registry model cannot be turned into a container (the message says how to fix it)."""


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one model's container; compare by `spec_hash`."""

    name: str
    model: str
    image: str
    command: tuple[str, ...]
    labels: Mapping[str, str]
    environment: Mapping[str, str]
    passthrough_env: tuple[str, ...]
    ports: Mapping[str, tuple[str, int]]
    gpu_device_ids: tuple[str, ...]
    volumes: Mapping[str, Mapping[str, str]]
    shm_size: str | None
    ipc_mode: str | None
    healthcheck: Mapping[str, Any]
    cpuset_cpus: str | None
    spec_hash: str
    replica: int = 0

    @property
    def port(self) -> int:
        """The registry port: the container listens on it and publishes it."""
        (container_port,) = self.ports
        return int(container_port.split("/", 1)[0])


def container_name(model_name: str, name_prefix: str = DEFAULT_NAME_PREFIX,
                   replica: int = 0) -> str:
    """The deterministic container name of a managed model's replica (shared by fleet and
    compose): `<prefix>-<model>` for replica 0, `<prefix>-<model>-r<i>` for replica i."""
    base = f"{name_prefix}-{model_name}"
    return base if replica == 0 else f"{base}-r{replica}"


def container_spec(
    registry: Registry,
    model_name: str,
    *,
    replica: int = 0,
    cpuset: str | None = None,
    name_prefix: str = DEFAULT_NAME_PREFIX,
) -> ContainerSpec:
    """The container spec of replica `replica` of managed model `model_name` (a name, not an
    alias).

    Raises KeyError for an unknown name, SpecError for a remote (`url`) model, a replica
    index outside the model's `replica_slots`, or a model whose source/volumes/env cannot be
    turned into a container.
    """
    model = registry.models[model_name]
    where = f"model {model_name!r}"
    if not model.managed:
        raise SpecError(f"{where} is a remote model (url = {model.url!r}); the fleet never "
                        f"runs a container for it")
    assert model.port is not None and model.source is not None  # validated by the registry
    if not 0 <= replica < model.replica_slots:
        raise SpecError(f"{where} has {model.replica_slots} replica slot(s) (0-"
                        f"{model.replica_slots - 1}); there is no replica {replica}")

    env = registry.env(model)
    refused = sorted(k for k in env if k in _REFUSED_ENV)
    if refused:
        raise SpecError(f"{where}: env sets {', '.join(refused)} in the registry; remove it "
                        f"and export HF_TOKEN in the environment that runs `fleet` (it is "
                        f"passed to the container, never written down)")
    environment = dict(sorted(env.items()))
    if model.sleep_mode:
        environment.setdefault(SLEEP_MODE_ENV, "1")

    port = model.replica_port(replica)
    spec = ContainerSpec(
        name=container_name(model_name, name_prefix, replica),
        model=model_name,
        image=registry.image(model),
        command=vllm_args(registry, model, replica),
        labels=_frozen({LABEL_MANAGED: "true", LABEL_MODEL: model_name,
                        LABEL_REPLICA: str(replica)}),
        environment=_frozen(environment),
        passthrough_env=SECRET_ENV,
        ports=_frozen({f"{port}/tcp": (registry.host_ip(model), port)}),
        gpu_device_ids=tuple(str(g) for g in model.gpus),
        volumes=_frozen(_volumes(registry, model)),
        shm_size=None if registry.ipc_host(model) else (registry.shm_size(model)
                                                        or DEFAULT_SHM_SIZE),
        ipc_mode="host" if registry.ipc_host(model) else None,
        healthcheck=_frozen(_healthcheck(port, registry.health_timeout(model))),
        cpuset_cpus=cpuset,
        spec_hash="",
        replica=replica,
    )
    digest = spec_hash(spec)
    return replace(spec, spec_hash=digest,
                   labels=_frozen({**spec.labels, LABEL_SPEC_HASH: digest}))


def vllm_args(registry: Registry, model: ModelSpec, replica: int = 0) -> tuple[str, ...]:
    """The vLLM server flags for a managed model's replica (the container's command)."""
    assert model.port is not None and model.source is not None
    args: list[str] = [
        "--model", model_source(registry, model),
        "--served-model-name", *model.served_names,
        "--host", "0.0.0.0",
        "--port", str(model.replica_port(replica)),
        "--gpu-memory-utilization", _num(registry.gpu_fraction(model)),
    ]
    if model.max_model_len is not None:
        args += ["--max-model-len", str(model.max_model_len)]
    if model.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(model.tensor_parallel_size)]
    if model.sleep_mode and model.gpus:
        # vLLM's CPU build refuses the flag ("Sleep mode is not supported on current
        # platform") but serves the sleep endpoints in dev mode (set in the environment).
        args.append("--enable-sleep-mode")
    args += registry.args(model)
    return tuple(args)


def model_source(registry: Registry, model: ModelSpec) -> str:
    """`--model`: an HF repo id as is, or a local path mapped under the `/models` mount."""
    source = model.source
    assert source is not None
    local = source.startswith(("/", "./"))
    if not local:
        return source
    models_dir = registry.defaults.models_dir
    if models_dir is None:
        raise SpecError(f"model {model.name!r}: source {source!r} is a local path but "
                        f"[defaults].models_dir is not set; set it to the host directory "
                        f"holding your weights (mounted read-only at {MODELS_TARGET})")
    if source.startswith("./"):
        rel = posixpath.normpath(source)
        if rel == "." or rel.startswith("../"):
            raise SpecError(f"model {model.name!r}: source {source!r} leaves models_dir")
        return f"{MODELS_TARGET}/{rel}"
    norm = posixpath.normpath(source)
    if norm == MODELS_TARGET or norm.startswith(MODELS_TARGET + "/"):
        return norm
    host_dir = posixpath.normpath(models_dir)
    if norm.startswith(host_dir.rstrip("/") + "/"):
        return MODELS_TARGET + norm[len(host_dir.rstrip("/")):]
    return source


def spec_hash(spec: ContainerSpec) -> str:
    """A stable hash of everything that, if changed, requires recreating the container.

    Covers name, image, command, labels (except the hash label itself), registry
    environment, the *names* of passthrough variables (never their values), ports, GPUs,
    volumes (host paths as written in the registry), IPC/shm, health check and cpuset.
    The replica index (field and label) is left out: name, port and command already tell
    replicas apart, and so replica 0 hashes as a single-replica model's container did before
    replicas existed (such containers are adopted, not recreated).
    """
    material = {f.name: _plain(getattr(spec, f.name)) for f in fields(spec)
                if f.name not in ("spec_hash", "replica")}
    material["labels"] = {k: v for k, v in spec.labels.items()
                          if k not in (LABEL_SPEC_HASH, LABEL_REPLICA)}
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def device_requests(spec: ContainerSpec) -> list[dict[str, Any]]:
    """docker-py device requests as plain dicts (empty for a CPU-only model)."""
    if not spec.gpu_device_ids:
        return []
    return [{"Driver": "nvidia", "DeviceIDs": list(spec.gpu_device_ids),
             "Capabilities": [["gpu"]]}]


def docker_run_kwargs(
    spec: ContainerSpec,
    environ: Mapping[str, str],
    *,
    base_dir: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for docker-py `containers.create(**kw)` / `containers.run(**kw)`.

    `environ` is the caller's environment: passthrough variables (HF_TOKEN) present in it are
    added to the container's environment, and its HOME expands `~` in volume host paths.
    Relative host paths (`./x`) are resolved against `base_dir` (default: the current
    directory; the CLI passes the registry file's directory, as compose resolves them
    against compose.yaml's). `device_requests` are plain dicts that docker-py accepts.
    """
    environment = dict(spec.environment)
    for name in spec.passthrough_env:
        if name in environ:
            environment[name] = environ[name]
    volumes: dict[str, dict[str, str]] = {}
    for host, bind in spec.volumes.items():
        volumes[resolve_host_path(host, environ, base_dir)] = dict(bind)
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "name": spec.name,
        "labels": dict(spec.labels),
        "environment": environment,
        "ports": dict(spec.ports),
        "device_requests": device_requests(spec) or None,
        "volumes": volumes,
        "shm_size": spec.shm_size,
        "ipc_mode": spec.ipc_mode,
        "healthcheck": dict(spec.healthcheck),
        "cpuset_cpus": spec.cpuset_cpus,
        "log_config": {"type": LOG_DRIVER, "config": dict(LOG_OPTIONS)},
        "detach": True,
    }
    return {k: v for k, v in kwargs.items() if v is not None}


def resolve_host_path(host: str, environ: Mapping[str, str], base_dir: str | None = None) -> str:
    """Expand `~` (from environ's HOME) and make `./x` absolute; named volumes unchanged."""
    if host == "~" or host.startswith("~/"):
        home = environ.get("HOME") or os.path.expanduser("~")
        return posixpath.normpath(home + host[1:])
    if is_named_volume(host) or posixpath.isabs(host):
        return host
    return posixpath.normpath(posixpath.join(base_dir or os.getcwd(), host))


def is_named_volume(host: str) -> bool:
    """Docker's rule: a bind source that is not a path is a named volume."""
    return not host.startswith(("/", ".", "~"))


def _volumes(registry: Registry, model: ModelSpec) -> dict[str, dict[str, str]]:
    where = f"model {model.name!r}"
    entries: list[tuple[str, str, str]] = []
    if registry.defaults.hf_cache:
        entries.append((registry.defaults.hf_cache, HF_CACHE_TARGET, "rw"))
    if registry.defaults.models_dir:
        entries.append((registry.defaults.models_dir, MODELS_TARGET, "ro"))
    for raw in model.volumes:
        entries.append(parse_volume(raw, where))
    volumes: dict[str, dict[str, str]] = {}
    targets: dict[str, str] = {}
    for host, target, mode in entries:
        if target in targets:
            raise SpecError(f"{where}: field 'volumes': {target} is already mounted from "
                            f"{targets[target]!r}; mount each container path once")
        if host in volumes:
            raise SpecError(f"{where}: field 'volumes': {host!r} is mounted twice; mount it "
                            f"once (docker cannot bind one host path to two places)")
        targets[target] = host
        volumes[host] = {"bind": target, "mode": mode}
    return volumes


def parse_volume(raw: str, where: str = "volume") -> tuple[str, str, str]:
    """`host:container[:ro|:rw]` -> (host, container, mode)."""
    parts = raw.split(":")
    mode = "rw"
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        mode = parts.pop()
    if len(parts) != 2 or not parts[0] or not parts[1].startswith("/"):
        raise SpecError(f"{where}: field 'volumes': {raw!r} is not 'HOST:/CONTAINER_PATH' "
                        f"or 'HOST:/CONTAINER_PATH:ro'")
    return parts[0], posixpath.normpath(parts[1]), mode


def _healthcheck(port: int, health_timeout: float) -> dict[str, Any]:
    return {
        "test": ["CMD", "curl", "-fsS", "-o", "/dev/null", f"http://127.0.0.1:{port}/health"],
        "interval": int(HEALTH_INTERVAL_S * _NS),
        "timeout": int(HEALTH_PROBE_TIMEOUT_S * _NS),
        "retries": HEALTH_RETRIES,
        "start_period": int(health_timeout * _NS),
    }


def _num(value: float) -> str:
    return f"{value:g}"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def replica_specs(registry: Registry, *, name_prefix: str = DEFAULT_NAME_PREFIX,
                  ) -> dict[str, tuple[ContainerSpec, ...]]:
    """The container spec of every replica slot of every managed model, pinned with
    `assign_replica_cpusets` over all of them: the one set of specs both the fleet and
    compose.yaml are made from."""
    managed = [n for n, m in registry.models.items() if m.managed]
    cpusets = assign_replica_cpusets(registry, managed)
    return {n: tuple(container_spec(registry, n, replica=i, cpuset=cpusets.get((n, i)),
                                    name_prefix=name_prefix)
                     for i in range(registry.models[n].replica_slots))
            for n in managed}


def fleet_specs(registry: Registry, *,
                name_prefix: str = DEFAULT_NAME_PREFIX) -> dict[str, ContainerSpec]:
    """Replica 0's container spec of every managed model (see `replica_specs`)."""
    return {n: specs[0] for n, specs in replica_specs(registry, name_prefix=name_prefix).items()}
