"""The `fleet` CLI against the real Docker daemon with the simulator image.

Every container is scoped by FLEET_EXTRA_LABELS (the session's `io.vllm-fleet.test=<run_id>`
plus a per-test label) and named with a per-test FLEET_NAME_PREFIX, so the tests run beside
anything else; the `docker_ready` fixture removes everything labelled with the run id.

Budget: the test registries declare `[host] cpus = 1, gateway_cpus = 0` and give every model
`cpus = 1`, so two models cannot be awake together (cpu-oversubscribed): a real placement
constraint that this GPU-less machine can honour (cpuset "0").
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from fleet.engine import DockerEngine
from support.docker_fixtures import DockerSession, docker_cli
from support.fleet_faults import CASE_LABEL, REPO_ROOT, FleetRunner
from support.ports import consecutive_free_ports, free_ports
from support.registries import SIM_FLEET

pytestmark = pytest.mark.docker


REGISTRY = SIM_FLEET + """
[models.sim-b]
source = "sim/b"
port = {port_b}
autostart = false

[models.sim-crash]
source = "sim/crash"
port = {port_c}
autostart = false
env = {{ VLLM_SIM_FAIL_AT_START = "1" }}
"""


@pytest.fixture
def make_fleet(docker_ready: DockerSession, tmp_path: Path) -> Iterator[Callable[..., FleetRunner]]:
    made: list[FleetRunner] = []

    def make(registry_text: str | None = None, **ports: int) -> FleetRunner:
        if registry_text is None:
            pa, pb, pc = free_ports(3)
            registry_text = REGISTRY.format(image=docker_ready.sim_image, port_a=pa,
                                            port_b=pb, port_c=pc)
        where = tmp_path / f"fleet{len(made)}"
        where.mkdir()
        run = FleetRunner(docker_ready, where, registry_text)
        made.append(run)
        return run

    yield make
    for run in made:  # each test leaves nothing behind (the session fixture double-checks)
        r = run("down")
        assert r.returncode == 0, r.stderr
        assert run.containers() == []


def timings(stderr: str, op: str) -> dict[str, float]:
    line = next(x for x in stderr.splitlines() if x.startswith(f"{op}: ") or
                x.startswith(f"{op} "))
    parts = line.split(": ", 1)[1].split(", ")
    return {k: float(v.rstrip("s")) for k, v in (p.split(" ") for p in parts)}


def test_up_status_switch_sleep_wake_logs_down(make_fleet: Callable[..., FleetRunner]) -> None:
    fleet = make_fleet()
    r = fleet.ok("up")
    assert "awake: sim-a" in r.stdout
    rows = fleet.status()
    assert rows["sim-a"]["state"] == "healthy" and rows["sim-a"]["health"] == "ok"
    assert rows["sim-a"]["uptime"] is not None and rows["sim-b"]["state"] == "absent"
    assert fleet.containers() == [f"{fleet.prefix}-sim-a"]
    port_b = rows["sim-b"]["port"]

    r = fleet.ok("switch", "sim-b")
    t = timings(r.stderr, "switch sim-b")
    assert set(t) == {"evict", "start", "healthy", "total"}, r.stderr
    print(f"\nswitch sim-a -> sim-b (sleep, create): {t}")
    assert fleet.states() == {"sim-a": "sleeping", "sim-b": "healthy", "sim-crash": "absent"}
    models = httpx.get(f"http://127.0.0.1:{port_b}/v1/models", timeout=5).json()
    assert models["data"][0]["id"] == "sim-b"

    r = fleet.ok("switch", "sim-a", "--json")
    report = json.loads(r.stdout)
    assert [(a["model"], a["action"]) for a in report["actions"]] == [("sim-b", "stop"),
                                                                      ("sim-a", "wake")]
    print(f"switch sim-b -> sim-a (stop, wake): {report['timings']}")
    assert fleet.states() == {"sim-a": "healthy", "sim-b": "stopped", "sim-crash": "absent"}

    r = fleet.ok("switch", "sim-b")  # a stopped container is started again, not recreated
    assert "sim-b: start" in r.stdout
    print(f"switch sim-a -> sim-b (sleep, start): {timings(r.stderr, 'switch sim-b')}")

    fleet.ok("sleep", "sim-b")  # no sleep_mode: stopped
    assert fleet.states()["sim-b"] == "stopped"
    fleet.ok("wake", "sim-a")
    assert fleet.states()["sim-a"] == "healthy"

    r = fleet.ok("logs", "sim-a", "--tail", "20")
    assert "vLLM API server version" in r.stdout

    r = fleet.ok("down")
    assert fleet.containers() == []
    assert set(fleet.states().values()) == {"absent"}


def test_adopts_containers_made_by_docker_compose(make_fleet: Callable[..., FleetRunner],
                                                  tmp_path: Path) -> None:
    fleet = make_fleet()
    project = fleet.prefix
    compose_file = tmp_path / "compose.yaml"
    fleet.ok("compose", "--project", project, "--output", str(compose_file))
    assert fleet("compose", "--project", project, "--output", str(compose_file),
                 "--check").returncode == 0
    # Scope the compose containers like the fleet's (test labels are not part of the spec).
    doc = yaml.safe_load(compose_file.read_text())
    for service in doc["services"].values():
        service.setdefault("labels", {}).update(fleet.labels)
    compose_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    compose = ["compose", "-p", project, "-f", str(compose_file)]
    try:
        docker_cli(*compose, "up", "-d", "--wait", "vllm-sim-a", timeout=120)
        before = docker_cli("inspect", "--format", "{{.Id}}", f"{fleet.prefix}-sim-a").stdout
        assert fleet.states()["sim-a"] == "healthy"  # same spec hash: not drifted

        r = fleet.ok("up")
        assert "sim-a: none (adopted (healthy))" in r.stdout
        after = docker_cli("inspect", "--format", "{{.Id}}", f"{fleet.prefix}-sim-a").stdout
        assert after == before

        # A model the fleet starts joins the compose network under its service name.
        fleet.ok("switch", "sim-b")
        nets = json.loads(docker_cli("inspect", "--format", "{{json .NetworkSettings.Networks}}",
                                     f"{fleet.prefix}-sim-b").stdout)
        assert list(nets) == [project]  # the rendered file names the network after the project
        assert "vllm-sim-b" in nets[project]["Aliases"]
        # ... and as one of the project's containers, so `docker compose down` removes it
        labels = json.loads(docker_cli("inspect", "--format", "{{json .Config.Labels}}",
                                       f"{fleet.prefix}-sim-b").stdout)
        assert labels["com.docker.compose.project"] == project
        assert fleet.states()["sim-a"] == "sleeping"
        fleet.ok("down")
    finally:
        docker_cli(*compose, "down", "--remove-orphans", timeout=120, check=False)


def test_a_model_that_crashes_at_start_exits_1_with_its_logs(
        make_fleet: Callable[..., FleetRunner]) -> None:
    fleet = make_fleet()
    fleet.ok("up")
    r = fleet("switch", "sim-crash")
    assert r.returncode == 1
    assert "model 'sim-crash' failed to start: its container exited (exit code 1)" in r.stderr
    assert "EngineCore failed to start (VLLM_SIM_FAIL_AT_START)" in r.stderr
    assert "fleet state now: sim-a sleeping, sim-crash stopped; awake: none" in r.stderr
    assert "`fleet switch sim-a` to go back" in r.stderr
    assert fleet.states() == {"sim-a": "sleeping", "sim-b": "absent", "sim-crash": "stopped"}
    fleet.ok("switch", "sim-a")  # the stated way back works
    assert fleet.states()["sim-a"] == "healthy"


def test_docker_unreachable_exits_1_with_a_clear_message(
        make_fleet: Callable[..., FleetRunner]) -> None:
    fleet = make_fleet()
    r = fleet("status", DOCKER_HOST="tcp://127.0.0.1:1")
    assert r.returncode == 1
    assert r.stderr.startswith("fleet: cannot reach the Docker daemon at tcp://127.0.0.1:1 "
                               "([Errno 111] Connection refused): is dockerd running?")


def test_gpu_request_without_nvidia_runtime_is_explained(
        make_fleet: Callable[..., FleetRunner], docker_ready: DockerSession) -> None:
    (port,) = free_ports(1)
    fleet = make_fleet(f"""
[host]
gpus = [{{ id = 0 }}]
[defaults]
image = "{docker_ready.sim_image}"
hf_cache = ""
ipc_host = false
shm_size = "64m"
[models.sim-gpu]
source = "sim/g"
port = {port}
gpus = [0]
gpu_memory_utilization = 0.5
""")
    assert "nvidia" not in docker_cli("info", "--format", "{{json .Runtimes}}").stdout
    r = fleet("up")
    assert r.returncode == 1
    assert ("model 'sim-gpu' requests GPUs [0] but Docker has no NVIDIA runtime "
            "(could not select device driver \"nvidia\" with capabilities: [[gpu]]): install "
            "the NVIDIA Container Toolkit") in r.stderr, r.stderr
    assert fleet.containers() == []  # the never-started container was removed
    assert "fleet state now: no containers; awake: none" in r.stderr


def test_port_in_use_and_foreign_container_name_are_explained(
        make_fleet: Callable[..., FleetRunner], docker_ready: DockerSession) -> None:
    fleet = make_fleet()
    port_b = fleet.status()["sim-b"]["port"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port_b))
        holder.listen()
        r = fleet("up", "sim-b")
    assert r.returncode == 1
    assert f"port {port_b} of model 'sim-b' is already in use on 127.0.0.1" in r.stderr
    assert f"ss -ltnp 'sport = :{port_b}'" in r.stderr
    assert fleet.containers() == []

    name = f"{fleet.prefix}-sim-b"
    docker_cli("create", "--name", name, "--label", docker_ready.label,
               "--label", f"{CASE_LABEL}={fleet.case}", docker_ready.sim_image)
    r = fleet("up", "sim-b")
    assert r.returncode == 1
    assert f"container name '{name}' is already in use by container" in r.stderr
    assert "which vllm-fleet does not manage" in r.stderr and f"docker rm -f {name}" in r.stderr
    docker_cli("rm", "-f", name)


def test_a_model_with_two_replicas_is_two_containers_on_two_ports(
        make_fleet: Callable[..., FleetRunner], docker_ready: DockerSession) -> None:
    port = consecutive_free_ports(2)
    fleet = make_fleet(f"""
[host]
cpus = 2
gateway_cpus = 0

[defaults]
image = "{docker_ready.sim_image}"
hf_cache = ""
ipc_host = false
shm_size = "64m"
health_timeout = 30
cpus = 1

[models.sim-pair]
source = "sim/pair"
port = {port}
replicas = 2
""")
    r = fleet.ok("up")
    print(f"\nup of 2 replicas: {timings(r.stderr, 'up')}")
    names = [f"{fleet.prefix}-sim-pair", f"{fleet.prefix}-sim-pair-r1"]
    assert fleet.containers() == names
    rows = json.loads(fleet.ok("status", "--json").stdout)
    assert [(x["name"], x["replica"], x["port"], x["state"], x["container"]) for x in rows] == [
        ("sim-pair", 0, port, "healthy", names[0]), ("sim-pair", 1, port + 1, "healthy", names[1])]
    for i, name in enumerate(names):
        served = httpx.get(f"http://127.0.0.1:{port + i}/v1/models", timeout=5).json()
        assert served["data"][0]["id"] == "sim-pair"
        inspected = json.loads(docker_cli("inspect", name).stdout)[0]
        assert inspected["Config"]["Labels"]["io.vllm-fleet.replica"] == str(i)
        assert inspected["HostConfig"]["CpusetCpus"] == str(i)   # each replica its own core
        assert inspected["State"]["Health"]["Status"] in ("starting", "healthy")

    r = fleet.ok("scale", "sim-pair", "1")
    assert r.stdout.splitlines()[0] == "sim-pair[1]: stop (scaled to 1)"
    assert [x["state"] for x in fleet.status_rows()] == ["healthy", "stopped"]
    r = fleet.ok("scale", "sim-pair", "2")
    print(f"scale 1 -> 2 (docker start): {timings(r.stderr, 'scale')}")
    assert [x["state"] for x in fleet.status_rows()] == ["healthy", "healthy"]

    fleet.ok("down")
    assert fleet.containers() == []


def test_concurrent_switches_end_consistent_and_never_over_budget(
        make_fleet: Callable[..., FleetRunner]) -> None:
    fleet = make_fleet()
    engine = DockerEngine.from_env(timeout=30)
    over: list[list[str]] = []
    samples = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal samples
        while not stop.is_set():
            running = [r.model for r in engine.list_managed(fleet.labels) if r.running]
            samples += 1
            if len(running) > 1:
                over.append(running)
            stop.wait(0.02)

    # Race a stop-only pair (sim-b has no sleep_mode): "over budget" is then simply two
    # running containers at once, which the sampler sees without any HTTP call.
    fleet.registry.write_text(fleet.registry.read_text().replace(
        "sleep_mode = true", "sleep_mode = false").replace(
        'env = { VLLM_SIM_FAIL_AT_START = "1" }', ""))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    waited = 0
    try:
        for round_ in range(3):
            procs = [subprocess.Popen(fleet.cmd("switch", target), env=fleet.env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO_ROOT)
                     for target in (("sim-a", "sim-b") if round_ % 2 == 0
                                    else ("sim-b", "sim-crash"))]
            results = [p.communicate(timeout=120) for p in procs]
            for p, (_, err) in zip(procs, results, strict=True):
                assert p.returncode == 0, err
                waited += "waiting for the switch lock" in err
            healthy = [n for n, s in fleet.states().items() if s == "healthy"]
            assert len(healthy) == 1, fleet.status()
    finally:
        stop.set()
        sampler.join(10)
    print(f"\nconcurrent switches: {samples} samples, {waited} of 6 switches waited for the lock")
    assert samples > 10
    assert over == []
