"""The container engine: the one module that imports `docker`.

`Engine` is the small interface `fleet.lifecycle` drives: list the managed containers (by
label), create+start one from `docker_run_kwargs`, start, stop, remove, read logs. The engine
never decides anything; it executes and reports. `DockerEngine` implements it with the Docker
SDK and turns Docker's errors into `EngineError`s whose messages say what to do:

- `DockerUnreachable`: the daemon cannot be reached (named address, how to start it).
- `ImageMissing`: the image is not present locally (how to build or pull it).
- `PortInUse`: the model's host port is taken (which port, which model, how to find the user).
- `NoGpuRuntime`: GPUs were requested but Docker has no NVIDIA runtime.
- `NameConflict`: the container name is taken by a container the fleet does not manage.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import docker
import docker.errors
import docker.types
import requests.exceptions

from fleet.spec import LABEL_MANAGED, LABEL_MODEL, LABEL_SPEC_HASH

DEFAULT_DOCKER_SOCKET = "unix:///var/run/docker.sock"
DEFAULT_DOCKER_TIMEOUT = 60.0

START_DOCKER_HINT = (
    "is dockerd running? start it with `sudo systemctl start docker` (or `sudo dockerd &` "
    "where there is no systemd), or point --docker-host / DOCKER_HOST at a running daemon"
)


class EngineError(RuntimeError):
    """A container-engine operation failed; the message says what to do about it."""


class DockerUnreachable(EngineError):
    pass


class ImageMissing(EngineError):
    pass


class PortInUse(EngineError):
    pass


class NoGpuRuntime(EngineError):
    pass


class NameConflict(EngineError):
    pass


class ContainerMissing(EngineError):
    pass


@dataclass(frozen=True)
class ContainerRecord:
    """What the engine observed about one container."""

    id: str
    name: str
    model: str
    state: str  # Docker's State.Status: created, running, paused, restarting, exited, dead
    health: str | None = None  # Docker healthcheck: starting, healthy, unhealthy; None if none
    spec_hash: str | None = None
    image: str = ""
    ports: tuple[int, ...] = ()
    started_at: float | None = None  # epoch seconds of the last start
    exit_code: int | None = None
    restart_count: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    networks: tuple[str, ...] = ()  # user-defined networks (not bridge/host/none)
    oom_killed: bool = False  # Docker's State.OOMKilled: the kernel's OOM killer struck

    @property
    def running(self) -> bool:
        return self.state in ("running", "restarting", "paused")


class Engine(Protocol):
    """What the lifecycle needs from a container engine (real: `DockerEngine`)."""

    def list_managed(self, labels: Mapping[str, str] | None = None) -> list[ContainerRecord]:
        """Containers labelled managed (and with every label in `labels`), stopped ones too."""

    def inspect(self, container: str) -> ContainerRecord | None: ...

    def has_image(self, image: str) -> bool:
        """Whether `image` is present locally (what a create would need)."""

    def run(self, run_kwargs: Mapping[str, Any]) -> ContainerRecord:
        """Create and start a container from `containers.create` keyword arguments."""

    def start(self, container: str) -> None: ...

    def stop(self, container: str, timeout: float) -> None: ...

    def remove(self, container: str, *, force: bool = False) -> None: ...

    def logs(self, container: str, tail: int = 50) -> str: ...

    def follow_logs(self, container: str, tail: int = 50) -> Iterator[str]: ...


# ---------------------------------------------------------------------------------------
# Docker
# ---------------------------------------------------------------------------------------

_PORT_RE = re.compile(
    r"(?:Bind for|listen tcp[46]?|bind) \[?([0-9a-fA-F.:]*?)\]?:(\d+)(?: failed|: bind)", re.I
)


def _is_gpu_driver_error(text: str) -> bool:
    t = text.lower()
    return "could not select device driver" in t or "unknown or invalid runtime name: nvidia" in t


def _is_port_error(text: str) -> bool:
    t = text.lower()
    return "port is already allocated" in t or "address already in use" in t


def _short_reason(text: str) -> str:
    """The useful part of a requests/urllib3 connection error ("[Errno 111] Connection refused")."""
    m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if m:
        return m.group(0).strip()
    m = re.search(r"(No such file or directory|Connection refused|Name or service not known|"
                  r"timed out|Permission denied|Remote end closed connection without response)",
                  text)
    if m:
        return m.group(1)
    text = text.removeprefix("Error while fetching server API version: ")
    return re.sub(r"\s+", " ", text)[:200]


def _parse_time(value: str | None) -> float | None:
    if not value or value.startswith("0001-01-01"):
        return None
    text = value.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        digits = re.match(r"\d*", frac)
        frac_digits = digits.group(0)[:6] if digits else ""
        rest = frac[len(digits.group(0)) if digits else 0:]
        text = f"{head}.{frac_digits or '0'}{rest}"
    if not re.search(r"[+-]\d\d:\d\d$", text):
        text += "+00:00"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def record_from_attrs(attrs: Mapping[str, Any]) -> ContainerRecord:
    """A `ContainerRecord` from Docker's inspect JSON."""
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    host_config = attrs.get("HostConfig") or {}
    labels = dict(config.get("Labels") or {})
    ports: set[int] = set()
    for bindings in (host_config.get("PortBindings") or {}).values():
        for b in bindings or []:
            if str(b.get("HostPort") or "").isdigit():
                ports.add(int(b["HostPort"]))
    health = (state.get("Health") or {}).get("Status") or None
    running = state.get("Status") == "running"
    nets = ((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    networks = tuple(sorted(n for n in nets if n not in ("bridge", "host", "none")))
    return ContainerRecord(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        model=labels.get(LABEL_MODEL, ""),
        state=str(state.get("Status", "unknown")),
        health=health,
        spec_hash=labels.get(LABEL_SPEC_HASH),
        image=str(config.get("Image", "")),
        ports=tuple(sorted(ports)),
        started_at=_parse_time(state.get("StartedAt")) if running else None,
        exit_code=None if running else state.get("ExitCode"),
        restart_count=int(attrs.get("RestartCount") or 0),
        labels=labels,
        networks=networks,
        oom_killed=bool(state.get("OOMKilled")),
    )


def _device_requests(raw: Sequence[Any]) -> list[docker.types.DeviceRequest]:
    out: list[docker.types.DeviceRequest] = []
    for req in raw:
        if isinstance(req, docker.types.DeviceRequest):
            out.append(req)
            continue
        get = (lambda *keys: next((req[k] for k in keys if k in req), None))  # noqa: E731
        out.append(
            docker.types.DeviceRequest(
                driver=get("Driver", "driver") or "",
                count=get("Count", "count") or 0,
                device_ids=get("DeviceIDs", "device_ids"),
                capabilities=get("Capabilities", "capabilities"),
                options=get("Options", "options"),
            )
        )
    return out


def _model_of(kwargs: Mapping[str, Any]) -> str:
    return str((kwargs.get("labels") or {}).get(LABEL_MODEL, kwargs.get("name", "?")))


def _gpu_ids(kwargs: Mapping[str, Any]) -> list[str]:
    ids: list[str] = []
    for req in kwargs.get("device_requests") or []:
        got = req.get("DeviceIDs") or req.get("device_ids") or []
        ids.extend(str(i) for i in got)
    return ids


def _host_ports(kwargs: Mapping[str, Any]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for binding in (kwargs.get("ports") or {}).values():
        items = binding if isinstance(binding, list) else [binding]
        for b in items:
            if isinstance(b, tuple) and len(b) == 2:
                out.append((str(b[0]), int(b[1])))
            elif isinstance(b, int | str) and str(b).isdigit():
                out.append(("0.0.0.0", int(b)))
    return out


class DockerEngine:
    """`Engine` over the Docker SDK. The client is created on first use."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = DEFAULT_DOCKER_TIMEOUT,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.base_url = base_url or DEFAULT_DOCKER_SOCKET
        self.timeout = timeout
        self._explicit_url = base_url
        self._factory = client_factory or self._default_factory
        self._client: Any = None

    @classmethod
    def from_env(
        cls, docker_host: str | None = None, environ: Mapping[str, str] | None = None,
        *, timeout: float = DEFAULT_DOCKER_TIMEOUT,
    ) -> DockerEngine:
        """`docker_host`, else `$DOCKER_HOST`, else the local socket."""
        import os

        env = os.environ if environ is None else environ
        return cls(docker_host or env.get("DOCKER_HOST") or None, timeout=timeout)

    def _default_factory(self) -> Any:
        return docker.DockerClient(base_url=self.base_url, timeout=int(self.timeout))

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._mapped("connect"):
                self._client = self._factory()
        return self._client

    def mapped(self, op: str, kwargs: Mapping[str, Any] | None = None) -> Any:
        """A context manager turning the Docker SDK's errors during `op` into EngineErrors,
        for `fleet.swarm`, which drives this engine's `client` (the services API) without
        importing `docker` itself."""
        return self._mapped(op, kwargs)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- error mapping ---------------------------------------------------------------

    def _unreachable(self, exc: BaseException) -> DockerUnreachable:
        reason = _short_reason(str(exc))
        return DockerUnreachable(
            f"cannot reach the Docker daemon at {self.base_url} ({reason}): {START_DOCKER_HINT}"
        )

    @contextmanager
    def _mapped(self, op: str, kwargs: Mapping[str, Any] | None = None) -> Iterator[None]:
        try:
            yield
        except EngineError:
            raise
        except docker.errors.ImageNotFound as exc:
            image = (kwargs or {}).get("image", "?")
            raise ImageMissing(
                f"image {image} not found locally (model {_model_of(kwargs or {})!r}); build it "
                f"with scripts/build-images.sh or `docker pull {image}`"
            ) from exc
        except docker.errors.APIError as exc:
            raise self._api_error(op, exc, kwargs or {}) from exc
        except requests.exceptions.ConnectionError as exc:
            raise self._unreachable(exc) from exc
        except requests.exceptions.Timeout as exc:
            raise EngineError(
                f"the Docker daemon at {self.base_url} did not answer {op} within "
                f"{self.timeout:g}s; it may be overloaded (check `docker info`) or hung"
            ) from exc
        except docker.errors.DockerException as exc:
            text = str(exc)
            if "fetching server API version" in text or "Connection" in text:
                raise self._unreachable(exc) from exc
            raise EngineError(f"Docker {op} failed: {text}") from exc

    def _api_error(
        self, op: str, exc: docker.errors.APIError, kwargs: Mapping[str, Any]
    ) -> EngineError:
        text = str(exc.explanation or exc)
        model = _model_of(kwargs)
        if _is_gpu_driver_error(text):
            gpus = _gpu_ids(kwargs)
            return NoGpuRuntime(
                f"model {model!r} requests GPUs [{', '.join(gpus)}] but Docker has no NVIDIA "
                f"runtime ({text.strip()}): install the NVIDIA Container Toolkit and restart "
                f"dockerd, or set gpus = [] for a CPU image"
            )
        if _is_port_error(text):
            m = _PORT_RE.search(text)
            if m:
                ip, port = m.group(1) or "0.0.0.0", int(m.group(2))
            else:
                bound = _host_ports(kwargs)
                ip, port = bound[0] if bound else ("?", 0)
            return PortInUse(
                f"port {port} of model {model!r} is already in use on {ip}: find who holds it "
                f"with `ss -ltnp 'sport = :{port}'` or `docker ps --filter publish={port}`, then "
                f"stop that or give the model another `port` in the registry"
            )
        if exc.status_code == 409 and "already in use" in text:
            return self._name_conflict(kwargs, text)
        if exc.status_code == 404 and "network" in text.lower():
            net = kwargs.get("network", "?")
            return EngineError(f"Docker {op} failed for model {model!r}: {text}; create the "
                               f"network (`docker network create {net}`) or unset FLEET_NETWORK")
        if exc.status_code == 404:
            return ContainerMissing(f"Docker {op}: {text}")
        return EngineError(f"Docker {op} failed for model {model!r}: {text}")

    def _name_conflict(self, kwargs: Mapping[str, Any], text: str) -> NameConflict:
        name = str(kwargs.get("name", "?"))
        who = "another container"
        managed = False
        try:
            other = self.client.containers.get(name)
            labels = (other.attrs.get("Config") or {}).get("Labels") or {}
            managed = labels.get(LABEL_MANAGED) == "true"
            who = f"container {other.short_id} (image {(other.attrs.get('Config') or {}).get('Image', '?')})"
        except Exception:  # best effort: the message is still useful without the details
            pass
        if managed:
            why = ("a vllm-fleet container outside this fleet's label scope (another "
                   "FLEET_EXTRA_LABELS / compose project)")
        else:
            why = "which vllm-fleet does not manage"
        return NameConflict(
            f"container name {name!r} is already in use by {who}, {why}; remove or rename it "
            f"(`docker rm -f {name}`), or choose another name prefix with FLEET_NAME_PREFIX"
        )

    # -- Engine ----------------------------------------------------------------------

    def list_managed(self, labels: Mapping[str, str] | None = None) -> list[ContainerRecord]:
        wanted = [f"{LABEL_MANAGED}=true", *(f"{k}={v}" for k, v in (labels or {}).items())]
        with self._mapped("list containers"):
            containers = self.client.containers.list(all=True, filters={"label": wanted})
            return [record_from_attrs(c.attrs) for c in containers]

    def inspect(self, container: str) -> ContainerRecord | None:
        with self._mapped("inspect"):
            try:
                return record_from_attrs(self.client.containers.get(container).attrs)
            except docker.errors.NotFound:
                return None

    def has_image(self, image: str) -> bool:
        try:
            with self._mapped("image inspect", {"image": image}):
                self.client.images.get(image)
        except ImageMissing:
            return False
        return True

    def run(self, run_kwargs: Mapping[str, Any]) -> ContainerRecord:
        kwargs = dict(run_kwargs)
        if kwargs.get("device_requests"):
            kwargs["device_requests"] = _device_requests(kwargs["device_requests"])
        with self._mapped("create", run_kwargs):
            container = self.client.containers.create(**kwargs)
        try:
            with self._mapped("start", run_kwargs):
                container.start()
        except EngineError:
            # A container that never ran would only block the name: take it away again.
            try:
                container.remove(force=True)
            except Exception:
                pass
            raise
        with self._mapped("inspect", run_kwargs):
            container.reload()
            return record_from_attrs(container.attrs)

    def start(self, container: str) -> None:
        with self._mapped("start"):
            c = self.client.containers.get(container)
        labels = (c.attrs.get("Config") or {}).get("Labels") or {}
        context = {"labels": labels, "name": c.name, "ports": self._bound_ports(c.attrs),
                   "device_requests": (c.attrs.get("HostConfig") or {}).get("DeviceRequests")}
        with self._mapped("start", context):
            c.start()

    @staticmethod
    def _bound_ports(attrs: Mapping[str, Any]) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for key, bindings in ((attrs.get("HostConfig") or {}).get("PortBindings") or {}).items():
            out[key] = [(b.get("HostIp") or "0.0.0.0", int(b["HostPort"]))
                        for b in bindings or [] if str(b.get("HostPort") or "").isdigit()]
        return out

    def stop(self, container: str, timeout: float) -> None:
        with self._mapped("stop"):
            self.client.containers.get(container).stop(timeout=max(0, int(round(timeout))))

    def remove(self, container: str, *, force: bool = False) -> None:
        with self._mapped("remove"):
            try:
                self.client.containers.get(container).remove(force=force)
            except docker.errors.NotFound:
                return

    def logs(self, container: str, tail: int = 50) -> str:
        with self._mapped("logs"):
            raw = self.client.containers.get(container).logs(stdout=True, stderr=True, tail=tail)
        return raw.decode("utf-8", errors="replace")

    def follow_logs(self, container: str, tail: int = 50) -> Iterator[str]:
        """Log lines as they come; ends when the container stops.

        A quiet container makes the client's read time out; the stream then re-attaches from
        the last timestamp seen, so no explicit-timeout rule is broken and no line is lost.
        """
        since: float | None = None
        first = True
        while True:
            with self._mapped("logs"):
                c = self.client.containers.get(container)
                stream = c.logs(stream=True, follow=True, timestamps=True,
                                tail=tail if first else "all", since=since)
            first = False
            buffer = b""
            try:
                for chunk in stream:
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        ts, _, text = line.decode("utf-8", errors="replace").partition(" ")
                        parsed = _parse_time(ts)
                        if parsed is not None:
                            since = parsed + 1e-6
                        yield text
                if buffer:
                    yield buffer.decode("utf-8", errors="replace").partition(" ")[2]
                return
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
                # urllib3 reports a read timeout on a stream as a connection error.
                stream.close()
                record = self.inspect(container)
                if record is None or not record.running:
                    return
                if since is None:
                    since = time.time()

    def gpu_runtime_available(self) -> bool:
        """Whether `docker info` lists an `nvidia` runtime (a hint: the toolkit's hook can
        serve GPU requests without it; the start error is the authority)."""
        with self._mapped("info"):
            runtimes = self.client.info().get("Runtimes") or {}
        return "nvidia" in runtimes
