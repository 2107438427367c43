"""DockerEngine against a fake docker-py client: records, kwargs and Docker errors mapped to
clear, actionable messages (the real daemon produces the same errors in the docker tier)."""

from __future__ import annotations

from typing import Any

import docker.errors
import docker.types
import pytest
import requests

from fleet.containers import record_from_attrs
from fleet.engine import DockerEngine
from fleet.errors import (
    DockerUnreachable,
    EngineError,
    ImageMissing,
    NameConflict,
    NoGpuRuntime,
    PortInUse,
)
from fleet.registry import parse_registry
from fleet.spec import container_spec, docker_run_kwargs

pytestmark = pytest.mark.unit


def api_error(status: int, explanation: str, cls: type = docker.errors.APIError) -> Exception:
    response = requests.Response()
    response.status_code = status
    return cls(f"{status} Server Error", response=response, explanation=explanation)


def attrs(name: str = "vllm-fleet-a", *, status: str = "running", labels: dict | None = None,
          health: str | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"Status": status, "StartedAt": "2024-05-01T10:00:00.123456789Z",
                             "ExitCode": 0 if status == "running" else 3}
    if health:
        state["Health"] = {"Status": health}
    return {
        "Id": "abc123def456", "Name": "/" + name, "RestartCount": 2, "State": state,
        "Config": {"Image": "vllm-fleet/sim:dev", "Labels": labels if labels is not None else {
            "io.vllm-fleet.managed": "true", "io.vllm-fleet.model": "a",
            "io.vllm-fleet.spec-hash": "h1"}},
        "HostConfig": {"PortBindings": {"18001/tcp": [{"HostIp": "127.0.0.1",
                                                       "HostPort": "18001"}]}},
    }


class FakeContainer:
    def __init__(self, a: dict[str, Any], client: FakeClient) -> None:
        self.attrs = a
        self.name = a["Name"].lstrip("/")
        self.short_id = a["Id"][:10]
        self.client = client
        self.start_error: Exception | None = None

    def start(self) -> None:
        self.client.calls.append(("start", self.name))
        if self.start_error is not None:
            raise self.start_error

    def stop(self, timeout: int) -> None:
        self.client.calls.append(("stop", self.name, timeout))

    def remove(self, force: bool = False) -> None:
        self.client.calls.append(("remove", self.name, force))

    def reload(self) -> None:
        pass

    def logs(self, **kw: Any) -> bytes:
        self.client.calls.append(("logs", self.name, kw.get("tail")))
        return b"line 1\nline 2\n"


class FakeContainers:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    def list(self, all: bool, filters: dict[str, Any],
             ignore_removed: bool = False) -> list[FakeContainer]:
        self.client.calls.append(("list", all, filters, ignore_removed))
        return [FakeContainer(a, self.client) for a in self.client.existing]

    def get(self, name: str) -> FakeContainer:
        for a in self.client.existing:
            if a["Name"].lstrip("/") == name or a["Id"] == name:
                return FakeContainer(a, self.client)
        raise api_error(404, f"No such container: {name}", docker.errors.NotFound)

    def create(self, **kwargs: Any) -> FakeContainer:
        self.client.calls.append(("create", kwargs))
        if self.client.create_error is not None:
            raise self.client.create_error
        c = FakeContainer(attrs(kwargs["name"], labels=kwargs["labels"]), self.client)
        c.start_error = self.client.start_error
        return c


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.existing: list[dict[str, Any]] = []
        self.create_error: Exception | None = None
        self.start_error: Exception | None = None
        self.containers = FakeContainers(self)

    def info(self) -> dict[str, Any]:
        return {"Runtimes": {"runc": {}}}

    def close(self) -> None:
        pass


REGISTRY = """
[host]
gpus = [{ id = 0 }, { id = 1 }]
[defaults]
image = "vllm-fleet/sim:dev"
hf_cache = ""
[models.a]
source = "org/a"
port = 18001
gpus = [0, 1]
gpu_memory_utilization = 0.5
"""


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def engine(client: FakeClient) -> DockerEngine:
    return DockerEngine("unix:///run/test.sock", client_factory=lambda: client)


@pytest.fixture
def kwargs() -> dict[str, Any]:
    spec = container_spec(parse_registry(REGISTRY), "a")
    return docker_run_kwargs(spec, {"HF_TOKEN": "hf_x"})


def test_record_from_inspect_attrs() -> None:
    r = record_from_attrs(attrs(health="starting"))
    assert (r.id, r.name, r.model, r.state, r.health, r.spec_hash) == \
        ("abc123def456", "vllm-fleet-a", "a", "running", "starting", "h1")
    assert r.ports == (18001,) and r.restart_count == 2 and r.exit_code is None
    assert r.started_at == pytest.approx(1714557600.123456)
    stopped = record_from_attrs(attrs(status="exited"))
    assert (stopped.running, stopped.exit_code, stopped.started_at) == (False, 3, None)


def test_list_managed_filters_by_labels(engine: DockerEngine, client: FakeClient) -> None:
    client.existing = [attrs()]
    (rec,) = engine.list_managed({"io.vllm-fleet.test": "r1"})
    assert rec.model == "a"
    # ignore_removed: a container removed while docker-py inspects the listed ones is skipped
    # (seen as "No such container" from a listing racing a concurrent `fleet down`)
    assert client.calls[0] == ("list", True, {"label": ["io.vllm-fleet.managed=true",
                                                        "io.vllm-fleet.test=r1"]}, True)


def test_run_converts_device_requests_and_starts(engine: DockerEngine, client: FakeClient,
                                                 kwargs: dict[str, Any]) -> None:
    rec = engine.run(kwargs)
    assert rec.name == "vllm-fleet-a"
    (_, created), (start, _) = client.calls
    assert start == "start"
    (req,) = created["device_requests"]
    assert isinstance(req, docker.types.DeviceRequest)
    assert (req.driver, req.device_ids, req.capabilities) == ("nvidia", ["0", "1"], [["gpu"]])
    assert created["environment"]["HF_TOKEN"] == "hf_x"
    assert kwargs["device_requests"][0] == {"Driver": "nvidia", "DeviceIDs": ["0", "1"],
                                            "Capabilities": [["gpu"]]}  # caller's untouched


def test_unreachable_daemon_says_where_and_how_to_start_it() -> None:
    def factory() -> Any:
        raise docker.errors.DockerException(
            "Error while fetching server API version: ('Connection aborted.', "
            "FileNotFoundError(2, 'No such file or directory'))")

    engine = DockerEngine("unix:///var/run/docker.sock", client_factory=factory)
    with pytest.raises(DockerUnreachable) as exc:
        engine.list_managed()
    msg = str(exc.value)
    assert "cannot reach the Docker daemon at unix:///var/run/docker.sock" in msg
    assert "No such file or directory" in msg and "is dockerd running?" in msg
    assert "DOCKER_HOST" in msg


def test_connection_lost_mid_call_is_unreachable(engine: DockerEngine,
                                                 client: FakeClient) -> None:
    def boom(**_: Any) -> Any:
        raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")

    client.containers.list = boom  # type: ignore[method-assign, assignment]
    with pytest.raises(DockerUnreachable, match=r"\[Errno 111\] Connection refused"):
        engine.list_managed()


def test_missing_image_says_how_to_build_it(engine: DockerEngine, client: FakeClient,
                                            kwargs: dict[str, Any]) -> None:
    client.create_error = api_error(404, "No such image: vllm-fleet/sim:dev",
                                    docker.errors.ImageNotFound)
    with pytest.raises(ImageMissing) as exc:
        engine.run(kwargs)
    assert str(exc.value) == (
        "image vllm-fleet/sim:dev not found locally (model 'a'); build it with "
        "scripts/build-images.sh or `docker pull vllm-fleet/sim:dev`")


def test_port_in_use_names_port_model_and_how_to_find_the_user(
        engine: DockerEngine, client: FakeClient, kwargs: dict[str, Any]) -> None:
    client.start_error = api_error(500, (
        "driver failed programming external connectivity on endpoint vllm-fleet-a (0123): "
        "Bind for 127.0.0.1:18001 failed: port is already allocated"))
    with pytest.raises(PortInUse) as exc:
        engine.run(kwargs)
    msg = str(exc.value)
    assert "port 18001 of model 'a' is already in use on 127.0.0.1" in msg
    assert "ss -ltnp 'sport = :18001'" in msg and "docker ps --filter publish=18001" in msg
    assert ("remove", "vllm-fleet-a", True) in client.calls  # the never-started container


def test_port_in_use_from_userland_proxy_wording(engine: DockerEngine, client: FakeClient,
                                                 kwargs: dict[str, Any]) -> None:
    client.start_error = api_error(500, (
        "driver failed programming external connectivity on endpoint x: Error starting "
        "userland proxy: listen tcp4 127.0.0.1:18001: bind: address already in use"))
    with pytest.raises(PortInUse, match="port 18001 of model 'a'"):
        engine.run(kwargs)


def test_no_gpu_runtime_is_explained(engine: DockerEngine, client: FakeClient,
                                     kwargs: dict[str, Any]) -> None:
    client.start_error = api_error(
        500, 'could not select device driver "nvidia" with capabilities: [[gpu]]')
    with pytest.raises(NoGpuRuntime) as exc:
        engine.run(kwargs)
    msg = str(exc.value)
    assert msg.startswith("model 'a' requests GPUs [0, 1] but Docker has no NVIDIA runtime")
    assert "install the NVIDIA Container Toolkit" in msg and "gpus = []" in msg
    assert not engine.gpu_runtime_available()


@pytest.mark.parametrize("managed, expected", [
    (False, "which vllm-fleet does not manage"),
    (True, "outside this fleet's label scope"),
])
def test_name_conflict_says_whose_container_it_is(engine: DockerEngine, client: FakeClient,
                                                  kwargs: dict[str, Any], managed: bool,
                                                  expected: str) -> None:
    labels = {"io.vllm-fleet.managed": "true"} if managed else {"com.example": "x"}
    client.existing = [attrs("vllm-fleet-a", labels=labels)]
    client.create_error = api_error(409, (
        'Conflict. The container name "/vllm-fleet-a" is already in use by container '
        '"abc123". You have to remove (or rename) that container to be able to reuse that '
        'name.'))
    with pytest.raises(NameConflict) as exc:
        engine.run(kwargs)
    msg = str(exc.value)
    assert "container name 'vllm-fleet-a' is already in use by container abc123def4" in msg
    assert expected in msg and "docker rm -f vllm-fleet-a" in msg
    assert "FLEET_NAME_PREFIX" in msg


def test_other_api_errors_keep_dockers_text(engine: DockerEngine, client: FakeClient,
                                            kwargs: dict[str, Any]) -> None:
    client.create_error = api_error(500, "invalid mount config")
    with pytest.raises(EngineError, match="Docker create failed for model 'a': invalid mount"):
        engine.run(kwargs)


def test_stop_remove_logs(engine: DockerEngine, client: FakeClient) -> None:
    client.existing = [attrs()]
    engine.stop("vllm-fleet-a", 12.4)
    engine.remove("vllm-fleet-a", force=True)
    engine.remove("no-such", force=True)  # already gone: fine
    assert engine.logs("vllm-fleet-a", tail=5) == "line 1\nline 2\n"
    assert client.calls == [("stop", "vllm-fleet-a", 12), ("remove", "vllm-fleet-a", True),
                            ("logs", "vllm-fleet-a", 5)]
    assert engine.inspect("no-such") is None


def test_start_of_an_existing_container_maps_port_errors(engine: DockerEngine,
                                                         client: FakeClient) -> None:
    client.existing = [attrs()]
    original_get = client.containers.get

    def get(name: str) -> FakeContainer:
        c = original_get(name)
        c.start_error = api_error(500, "Bind for 127.0.0.1:18001 failed: port is already "
                                       "allocated")
        return c

    client.containers.get = get  # type: ignore[method-assign]
    with pytest.raises(PortInUse, match="port 18001 of model 'a'"):
        engine.start("vllm-fleet-a")
