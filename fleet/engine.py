"""The container engine: the one module that imports `docker`.

`DockerEngine` implements `fleet.containers.Engine` (the small interface `fleet.lifecycle`
drives) with the Docker SDK. It never decides anything; it executes and reports, and turns
Docker's errors into the `fleet.errors.EngineError` kinds, whose messages say what to do:

- `DockerUnreachable`: the daemon cannot be reached (named address, how to start it).
- `ImageMissing`: the image is not present locally (how to build or pull it).
- `PullFailed`: a pull failed (the image, the registry's answer, what to do).
- `PortInUse`: the model's host port is taken (which port, which model, how to find the user).
- `NoGpuRuntime`: GPUs were requested but Docker has no NVIDIA runtime.
- `NameConflict`: the container name is taken by a container the fleet does not manage.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import docker.errors
import docker.types
import docker.utils
import requests.exceptions

from fleet.containers import ContainerRecord, parse_time, record_from_attrs
from fleet.engine_text import (
    PORT_RE,
    START_DOCKER_HINT,
    gpu_ids,
    host_ports,
    is_gpu_driver_error,
    is_port_error,
    model_of,
    short_reason,
)
from fleet.errors import (
    ContainerMissing,
    DockerUnreachable,
    EngineError,
    ImageMissing,
    NameConflict,
    NoGpuRuntime,
    PortInUse,
    PullFailed,
)
from fleet.pull import pull_failed_message
from fleet.spec import LABEL_MANAGED

DEFAULT_DOCKER_SOCKET = "unix:///var/run/docker.sock"
DEFAULT_DOCKER_TIMEOUT = 60.0
DEFAULT_PULL_SILENCE = 300.0  # seconds a pull may go without a progress event

# ---------------------------------------------------------------------------------------
# Docker
# ---------------------------------------------------------------------------------------

def _device_requests(raw: Sequence[Any]) -> list[docker.types.DeviceRequest]:
    out: list[docker.types.DeviceRequest] = []
    for req in raw:
        if isinstance(req, docker.types.DeviceRequest):
            out.append(req)
            continue
        def get(*keys: str, req: Mapping[str, Any] = req) -> Any:
            return next((req[k] for k in keys if k in req), None)

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


class DockerEngine:
    """`Engine` over the Docker SDK. The client is created on first use."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = DEFAULT_DOCKER_TIMEOUT,
        client_factory: Callable[[], Any] | None = None,
        pull_silence: float = DEFAULT_PULL_SILENCE,
    ) -> None:
        self.base_url = base_url or DEFAULT_DOCKER_SOCKET
        self.timeout = timeout
        self.pull_silence = pull_silence
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
        reason = short_reason(str(exc))
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
                f"image {image} not found locally (model {model_of(kwargs or {})!r}); build it "
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
        model = model_of(kwargs)
        if is_gpu_driver_error(text):
            gpus = gpu_ids(kwargs)
            return NoGpuRuntime(
                f"model {model!r} requests GPUs [{', '.join(gpus)}] but Docker has no NVIDIA "
                f"runtime ({text.strip()}): install the NVIDIA Container Toolkit and restart "
                f"dockerd, or set gpus = [] for a CPU image"
            )
        if is_port_error(text):
            m = PORT_RE.search(text)
            if m:
                ip, port = m.group(1) or "0.0.0.0", int(m.group(2))
            else:
                bound = host_ports(kwargs)
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
            image = (other.attrs.get("Config") or {}).get("Image", "?")
            who = f"container {other.short_id} (image {image})"
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
            # A container removed between the listing and its inspection (another fleet
            # process, compose) is gone, not an error.
            containers = self.client.containers.list(all=True, filters={"label": wanted},
                                                     ignore_removed=True)
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

    def pull(self, image: str, on_event: Callable[[Mapping[str, Any]], None]) -> None:
        """Pull `image`, passing each of Docker's progress events to `on_event`.

        Credentials are Docker's own: the SDK reads the Docker config (`~/.docker/config.json`
        or `$DOCKER_CONFIG`, with its credential helpers) as `docker pull` does. A failure
        is PullFailed with the registry's answer. The stream is read by a helper thread, so
        a daemon silent for `pull_silence` seconds (Docker reports progress far more often)
        is an error, not a hang.
        """
        repo, tag = docker.utils.parse_repository_tag(image)
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def read() -> None:
            try:
                with self._mapped("pull", {"image": image}):
                    try:
                        for event in self.client.api.pull(repo, tag=tag or "latest",
                                                           stream=True, decode=True):
                            events.put(("event", event))
                    except docker.errors.APIError as exc:
                        answer = str(exc.explanation or exc)
                        raise PullFailed(pull_failed_message(image, answer), image=image,
                                         answer=answer) from exc
                events.put(("done", None))
            except BaseException as exc:  # handed to the caller's thread
                events.put(("error", exc))

        threading.Thread(target=read, name=f"pull {image}", daemon=True).start()
        while True:
            try:
                kind, value = events.get(timeout=self.pull_silence)
            except queue.Empty:
                self.close()  # drops the connection: the reader ends
                raise EngineError(
                    f"the Docker daemon at {self.base_url} reported nothing for "
                    f"{self.pull_silence:g}s while pulling {image}; check `docker info` and "
                    f"the registry, then retry") from None
            if kind == "done":
                return
            if kind == "error":
                raise value
            if value.get("error"):
                answer = str((value.get("errorDetail") or {}).get("message") or value["error"])
                raise PullFailed(pull_failed_message(image, answer), image=image, answer=answer)
            on_event(value)

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
            with contextlib.suppress(Exception):
                container.remove(force=True)
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
            self.client.containers.get(container).stop(timeout=max(0, round(timeout)))

    def remove(self, container: str, *, force: bool = False) -> None:
        with self._mapped("remove"):
            try:
                self.client.containers.get(container).remove(force=force)
            except docker.errors.NotFound:
                return

    def logs(self, container: str, tail: int = 50) -> str:
        with self._mapped("logs"):
            raw = self.client.containers.get(container).logs(stdout=True, stderr=True, tail=tail)
        return bytes(raw).decode("utf-8", errors="replace")

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
                        parsed = parse_time(ts)
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
