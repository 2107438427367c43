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

The service shape and the reading of services and tasks are pure: `fleet.swarm_spec`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fleet.cluster import (
    NODE_NAME_LABEL,
    candidate_nodes,
    node_address,
    node_hostname,
)
from fleet.containers import ContainerRecord
from fleet.engine import DockerEngine
from fleet.errors import EngineError, ProbeError
from fleet.health import HealthResult, Probe
from fleet.registry import Registry
from fleet.spec import LABEL_MANAGED
from fleet.swarm_spec import (
    _COMING,
    LABEL_SWARM_NODE,
    current_task,
    record_from_service,
    service_spec,
)


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

