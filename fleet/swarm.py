"""The fleet on a Docker Swarm: each model replica is one Swarm service constrained to the
nodes the registry allows, driven through the Docker SDK's services API.

`SwarmEngine` implements `fleet.engine.Engine`, so `fleet.lifecycle.Fleet` (up, down,
switch, sleep, wake, scale, status, logs) runs on a Swarm unchanged: a "container" is a
service; `run` creates it (1 replica), `stop` scales it to 0 (kept, like a stopped
container), `start` scales it back to 1, `remove` removes it. A service's record says on
which node its task runs (`name@node`, and the `io.vllm-fleet.swarm-node` label).

It never imports `docker`: it drives `fleet.engine.DockerEngine`'s SDK client (the one
module that imports `docker`) and that engine's error mapping (`DockerEngine.mapped`).

`SwarmProbe` wraps the HTTP probe: the fleet addresses a replica as `http://HOST_IP:PORT`
(one host); on a Swarm the port is published in host mode on the node where the task runs,
so the probe sends the call to that node's address instead.

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
  its task.
- Restart policy `any` after 5 s: a crashed replica or a lost node is replaced by Swarm.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fleet.cluster import (
    NODE_NAME_LABEL,
    Cluster,
    candidate_nodes,
    node_address,
    node_hostname,
)
from fleet.containers import ContainerRecord, parse_time
from fleet.engine import DockerEngine
from fleet.errors import EngineError, ProbeError
from fleet.health import HealthResult, Probe
from fleet.registry import Registry
from fleet.spec import LABEL_MANAGED, LABEL_MODEL, LABEL_SPEC_HASH

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
        task["Networks"] = [{"Target": cluster.network}]
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


class SwarmEngine:
    """`fleet.engine.Engine` over a Swarm manager's services API."""

    def __init__(self, docker: DockerEngine, registry: Registry, *,
                 stop_timeout: float = 30.0, poll_interval: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.docker = docker
        self.registry = registry
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self._sleep = sleep
        self._monotonic = monotonic
        self._labelled = False

    @property
    def _api(self) -> Any:
        return self.docker.client.api

    # -- nodes -----------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """The Swarm's nodes as the API gives them."""
        with self.docker.mapped("list nodes"):
            return list(self._api.nodes())

    def _node_names(self) -> dict[str, str]:
        """Swarm node id -> the registry's node name (else the node's hostname)."""
        by_host = {node_hostname(n, node): n for n, node in self.registry.nodes.items()}
        out = {}
        for n in self.nodes():
            host = str(((n.get("Description") or {}).get("Hostname")) or "")
            out[str(n.get("ID"))] = by_host.get(host, host)
        return out

    def node_addresses(self) -> dict[str, str]:
        """Swarm node id -> where its published ports are reached: the registry's
        `address`, else the address the node joined the Swarm with."""
        by_host = {node_hostname(n, node): node_address(n, node)
                   for n, node in self.registry.nodes.items() if node.address}
        out = {}
        for n in self.nodes():
            host = str(((n.get("Description") or {}).get("Hostname")) or "")
            out[str(n.get("ID"))] = by_host.get(host) or str((n.get("Status") or {})
                                                             .get("Addr") or host)
        return out

    def sync_node_labels(self) -> list[str]:
        """Label every Swarm node the registry declares (`io.vllm-fleet.managed=true`, its
        registry name, its `labels`); return what changed. An undeclared node is left
        alone; a declared node missing from the Swarm is an EngineError."""
        changed: list[str] = []
        found = {str(((n.get("Description") or {}).get("Hostname")) or ""): n
                 for n in self.nodes()}
        missing = [n for n, node in self.registry.nodes.items()
                   if node_hostname(n, node) not in found]
        if missing:
            raise EngineError(
                f"node(s) {', '.join(missing)} of the registry are not in the Swarm of "
                f"{self.docker.base_url} (its nodes: {', '.join(sorted(found)) or 'none'}): "
                f"join them (`docker swarm join`) or fix [nodes.NAME].hostname")
        for name, node in self.registry.nodes.items():
            sw = found[node_hostname(name, node)]
            spec = dict(sw.get("Spec") or {})
            want = {**dict(spec.get("Labels") or {}), LABEL_MANAGED: "true",
                    NODE_NAME_LABEL: name, **node.labels}
            if want != (spec.get("Labels") or {}):
                spec["Labels"] = want
                with self.docker.mapped("update node"):
                    self._api.update_node(sw["ID"], (sw.get("Version") or {}).get("Index"),
                                          spec)
                changed.append(name)
        return changed

    # -- services --------------------------------------------------------------------

    def _services(self, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        wanted = [f"{LABEL_MANAGED}=true", *(f"{k}={v}" for k, v in (labels or {}).items())]
        with self.docker.mapped("list services"):
            return list(self._api.services(filters={"label": wanted}))

    def _tasks(self, service_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {s: [] for s in service_ids}
        if not service_ids:
            return out
        with self.docker.mapped("list tasks"):
            for t in self._api.tasks(filters={"service": list(service_ids)}):
                out.setdefault(str(t.get("ServiceID")), []).append(t)
        return out

    def list_managed(self, labels: Mapping[str, str] | None = None) -> list[ContainerRecord]:
        services = self._services(labels)
        tasks = self._tasks([str(s["ID"]) for s in services])
        names = self._node_names() if services else {}
        return [record_from_service(s, tasks.get(str(s["ID"]), []), names) for s in services]

    def inspect(self, container: str) -> ContainerRecord | None:
        service = self._service(container)
        if service is None:
            return None
        sid = str(service["ID"])
        return record_from_service(service, self._tasks([sid])[sid], self._node_names())

    def _service(self, ident: str) -> dict[str, Any] | None:
        with self.docker.mapped("inspect service"):
            found = [s for s in self._api.services(filters={"id": ident})
                     if str(s["ID"]).startswith(ident)] or \
                [s for s in self._api.services(filters={"name": ident})
                 if (s.get("Spec") or {}).get("Name") == ident]
        return found[0] if found else None

    def has_image(self, image: str) -> bool:
        """Always True: each node pulls the image when its task starts (a pull failure shows
        as the task's error in `fleet status`)."""
        return True

    def pull(self, image: str, on_event: Callable[[Mapping[str, Any]], None]) -> None:
        """Nothing here: each node pulls the image when its task starts."""

    def run(self, run_kwargs: Mapping[str, Any]) -> ContainerRecord:
        if not self._labelled:
            self.sync_node_labels()
            self._labelled = True
        kwargs = service_spec(run_kwargs, self.registry, stop_timeout=self.stop_timeout)
        with self.docker.mapped("create service", run_kwargs):
            created = self._api.create_service(**kwargs)
        record = self.inspect(str(created.get("ID", kwargs["name"])))
        if record is None:
            raise EngineError(f"service {kwargs['name']} was created but is not listed")
        return record

    def _scale(self, container: str, replicas: int) -> None:
        service = self._service(container)
        if service is None:
            raise EngineError(f"service {container} does not exist (removed meanwhile?)")
        spec = service["Spec"]
        with self.docker.mapped("scale service"):
            self._api.update_service(
                service["ID"], service["Version"]["Index"], task_template=spec["TaskTemplate"],
                name=spec["Name"], labels=spec.get("Labels"),
                mode={"Replicated": {"Replicas": replicas}},
                endpoint_spec=spec.get("EndpointSpec"), fetch_current_spec=False)

    def start(self, container: str) -> None:
        self._scale(container, 1)

    def stop(self, container: str, timeout: float) -> None:
        """Scale to 0 and wait until no task of it runs (what it held on its node is free)."""
        self._scale(container, 0)
        self._wait_tasks_gone(container, timeout + 30.0)

    def _wait_tasks_gone(self, container: str, within: float) -> None:
        end = self._monotonic() + within
        while True:
            service = self._service(container)
            if service is None:
                return
            sid = str(service["ID"])
            # A task on a node that is down never reports again: it holds nothing there.
            ready = {str(n.get("ID")) for n in self.nodes()
                     if (n.get("Status") or {}).get("State") == "ready"}
            live = [t for t in self._tasks([sid])[sid]
                    if (t.get("Status") or {}).get("State") in (_COMING | {"running"})
                    and (not t.get("NodeID") or str(t.get("NodeID")) in ready)]
            if not live:
                return
            if self._monotonic() >= end:
                raise EngineError(f"service {container}: its task still runs {within:g}s after "
                                  f"it was scaled to 0; check `docker service ps {container}`")
            self._sleep(self.poll_interval)

    def remove(self, container: str, *, force: bool = False) -> None:
        service = self._service(container)
        if service is None:
            return
        with self.docker.mapped("remove service"):
            self._api.remove_service(service["ID"])

    def logs(self, container: str, tail: int = 50) -> str:
        with self.docker.mapped("service logs"):
            chunks = self._api.service_logs(container, stdout=True, stderr=True, tail=tail,
                                            follow=False)
            return b"".join(chunks).decode("utf-8", errors="replace")

    def follow_logs(self, container: str, tail: int = 50) -> Iterator[str]:
        with self.docker.mapped("service logs"):
            stream = self._api.service_logs(container, stdout=True, stderr=True, tail=tail,
                                            follow=True)
        buffer = b""
        for chunk in stream:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line.decode("utf-8", errors="replace")
        if buffer:
            yield buffer.decode("utf-8", errors="replace")

    # -- where replicas are ------------------------------------------------------------

    def address_for_port(self, port: int) -> str | None:
        """The address of the node where the managed service publishing `port` has its
        task now; None when no such task is placed."""
        services = [s for s in self._services()
                    if port in record_from_service(s, [], {}).ports]
        if not services:
            return None
        tasks = self._tasks([str(s["ID"]) for s in services])
        for s in services:
            task = current_task(tasks[str(s["ID"])])
            state = ((task or {}).get("Status") or {}).get("State")
            if task is not None and task.get("NodeID") and state in (_COMING | {"running"}):
                return self.node_addresses().get(str(task["NodeID"]))
        return None

    def where(self) -> dict[str, str]:
        """Model name -> the node its replica 0 runs on now (for status lines)."""
        return {r.model: r.labels.get(LABEL_SWARM_NODE, "-") for r in self.list_managed()}

    def candidates(self, model: str) -> list[str]:
        return candidate_nodes(self.registry.nodes, self.registry.models[model])


def _retarget(url: str, host: str) -> str:
    parts = urlsplit(url)
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class SwarmProbe:
    """A `Probe` that sends each call to the node where the replica's port is published."""

    def __init__(self, inner: Probe, engine: SwarmEngine) -> None:
        self.inner = inner
        self.engine = engine

    def _url(self, base_url: str) -> str | None:
        port = urlsplit(base_url).port
        if port is None:
            return base_url
        try:
            host = self.engine.address_for_port(port)
        except EngineError:
            return None
        return None if host is None else _retarget(base_url, host)

    def health(self, base_url: str) -> HealthResult:
        url = self._url(base_url)
        if url is None:
            return HealthResult(False, "its task is not placed on a node yet")
        return self.inner.health(url)

    def is_sleeping(self, base_url: str) -> bool | None:
        url = self._url(base_url)
        return None if url is None else self.inner.is_sleeping(url)

    def sleep(self, base_url: str, level: int = 1) -> None:
        url = self._url(base_url)
        if url is None:
            raise ProbeError(f"{base_url}: no task of it runs on a node")
        self.inner.sleep(url, level)

    def wake_up(self, base_url: str) -> None:
        url = self._url(base_url)
        if url is None:
            raise ProbeError(f"{base_url}: no task of it runs on a node")
        self.inner.wake_up(url)

