"""The fleet and the gateway on a real Docker Swarm of three Docker-in-docker nodes.

The registry names the nodes: `sim-a` and `sim-a2` on node 2, whose inventory (`cpus = 1`)
lets only one of them be awake; `sim-b` on any node labelled `pool = "b"` (nodes 1 and 3),
so Swarm may move it. The gateway runs on this host and reaches the replicas on the nodes'
host-mode published ports. The tests run in file order on one swarm: place and serve,
switch on one node while the other serves, drain, `docker stack deploy`, node loss.
Timings go to stdout (`-s`) and .cache/swarm-timings.json.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fleet.cli import main as fleet_main
from support.docker_fixtures import GATEWAY_IMAGE, REPO_ROOT, docker_cli
from support.gateway_fixtures import GatewayProcess
from support.swarm_fixtures import SwarmCluster

pytestmark = pytest.mark.swarm

HEALTH_TIMEOUT = 90
PORTS = {"sim-a": 18301, "sim-a2": 18302, "sim-b": 18303}
TIMINGS: dict[str, float] = {}


def registry_text(c: SwarmCluster) -> str:
    n1, n2, n3 = c.names
    return f"""
[cluster]
engine = "swarm"
manager = "{c.manager_url}"

[nodes.{n1}]
address = "{c.nodes[n1]}"
labels = {{ pool = "b" }}

[nodes.{n2}]
address = "{c.nodes[n2]}"
cpus = 1

[nodes.{n3}]
address = "{c.nodes[n3]}"
labels = {{ pool = "b" }}

[defaults]
image = "{c.image}"
hf_cache = ""
ipc_host = false
shm_size = "64m"
health_timeout = {HEALTH_TIMEOUT}

[models.sim-a]
source = "sim/a"
port = {PORTS["sim-a"]}
node = "{n2}"
cpus = 1
sleep_mode = true

[models.sim-a2]
source = "sim/a2"
port = {PORTS["sim-a2"]}
node = "{n2}"
cpus = 1
autostart = false

[models.sim-b]
source = "sim/b"
port = {PORTS["sim-b"]}
node_labels = {{ pool = "b" }}
"""


class Swarm:
    """One test swarm with its registry file, the fleet CLI and a gateway in front."""

    def __init__(self, cluster: SwarmCluster, path: Path, gateway: GatewayProcess) -> None:
        self.cluster = cluster
        self.path = path
        self.gateway = gateway

    def fleet(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = fleet_main(["--registry", str(self.path), *args], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def fleet_with(self, path: Path, *args: str) -> tuple[int, str, str]:
        """The fleet CLI with another registry file (on the same swarm and lock)."""
        out, err = io.StringIO(), io.StringIO()
        code = fleet_main(["--registry", str(path), *args], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def where_in(self, path: Path) -> dict[str, str | None]:
        rows = json.loads(self.fleet_with(path, "status", "--json")[1])
        places = {r["name"]: r.get("container") or "" for r in rows}
        return {name: c.split("@", 1)[1] if "@" in c else None for name, c in places.items()}

    def ok(self, *args: str) -> str:
        code, out, err = self.fleet(*args)
        assert code == 0, f"fleet {' '.join(args)} exited {code}:\n{err}\n{out}"
        return out

    def where(self) -> dict[str, str | None]:
        """Model -> the node `fleet status` says its replica 0 runs on (None: not placed)."""
        rows = json.loads(self.ok("status", "--json"))
        out: dict[str, str | None] = {}
        for r in rows:
            container = r.get("container") or ""
            out[r["name"]] = container.split("@", 1)[1] if "@" in container else None
        return out

    def chat(self, model: str, timeout: float = 30.0) -> httpx.Response:
        return httpx.post(f"{self.gateway.base_url}/v1/chat/completions", timeout=timeout,
                          json={"model": model, "max_tokens": 4,
                                "messages": [{"role": "user", "content": "hi"}]})

    def served(self, model: str, deadline: float) -> float:
        """Seconds until the gateway answers `model` with 200 (TimeoutError after deadline)."""
        t0 = time.monotonic()
        last = ""
        while True:
            try:
                r = self.chat(model, timeout=10.0)
                if r.status_code == 200:
                    return time.monotonic() - t0
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - t0 > deadline:
                raise TimeoutError(f"{model} not served within {deadline:.0f}s (last: {last})")
            time.sleep(0.5)

    def wait_node(self, model: str, want: Callable[[str | None], bool], deadline: float) -> str:
        end = time.monotonic() + deadline
        while True:
            node = self.where().get(model)
            if want(node):
                assert node is not None
                return node
            if time.monotonic() > end:
                raise TimeoutError(f"{model} still on {node} after {deadline:.0f}s")
            time.sleep(0.5)

    def availability(self, node: str, value: str) -> None:
        self.cluster.on_manager("node", "update", "--availability", value, node)


def record(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 2)
    print(f"swarm timing: {name} {seconds:.2f}s")
    out = REPO_ROOT / ".cache" / "swarm-timings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(TIMINGS, indent=2))


@pytest.fixture(scope="module")
def swarm(swarm_cluster: SwarmCluster, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Swarm]:
    import os
    import subprocess
    import sys

    from support.gateway_fixtures import free_port, wait_until_ok

    tmp = tmp_path_factory.mktemp("swarm-fleet")
    path = tmp / "models.toml"
    path.write_text(registry_text(swarm_cluster))
    lock = str(tmp / "fleet.lock")
    old = os.environ.get("FLEET_LOCK_FILE")
    os.environ["FLEET_LOCK_FILE"] = lock
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FLEET_LOCK_FILE": lock}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--registry", str(path),
                             "--port", str(port), "--log-level", "warning"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        gw = GatewayProcess(f"http://127.0.0.1:{port}", port, proc, path)
        wait_until_ok(f"{gw.base_url}/health", 30, proc)
        yield Swarm(swarm_cluster, path, gw)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if old is None:
            os.environ.pop("FLEET_LOCK_FILE", None)
        else:
            os.environ["FLEET_LOCK_FILE"] = old


def test_models_placed_on_the_named_nodes_and_served_through_one_gateway(swarm: Swarm) -> None:
    n1, n2, n3 = swarm.cluster.names
    assert swarm.fleet("check")[0] == 0, swarm.fleet("check")
    t0 = time.monotonic()
    swarm.ok("up")
    record("deploy (fleet up of 2 models, image pulled from the registry)", time.monotonic() - t0)
    where = swarm.where()
    assert where["sim-a"] == n2
    assert where["sim-b"] in (n1, n3)
    assert where["sim-a2"] is None
    for model in ("sim-a", "sim-b"):
        swarm.served(model, 60)
        r = swarm.chat(model)
        assert r.status_code == 200 and r.json()["model"] == model
    # The services carry the shapes the fleet promises: host-mode port, dnsrr, constraint.
    spec = json.loads(swarm.cluster.on_manager(
        "service", "inspect", "--format", "{{json .Spec}}", "vllm-fleet-sim-a").stdout)
    assert spec["EndpointSpec"]["Mode"] == "dnsrr"
    assert spec["EndpointSpec"]["Ports"] == [{"Protocol": "tcp", "TargetPort": PORTS["sim-a"],
                                              "PublishedPort": PORTS["sim-a"],
                                              "PublishMode": "host"}]
    assert f"node.labels.io.vllm-fleet.node=={n2}" in \
        spec["TaskTemplate"]["Placement"]["Constraints"]


def test_switch_on_one_node_while_another_keeps_serving(swarm: Swarm) -> None:
    n2 = swarm.cluster.names[1]
    failures: list[str] = []
    served = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal served
        while not stop.is_set():
            try:
                r = swarm.chat("sim-b", timeout=15.0)
                if r.status_code == 200:
                    served += 1
                else:
                    failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    try:
        t0 = time.monotonic()
        code, out, err = swarm.fleet("switch", "sim-a2")
        record("switch sim-a -> sim-a2 on one node", time.monotonic() - t0)
        assert code == 0, err
        assert "sim-a: sleep" in out and "sim-b" not in out.split("awake:")[0]
        assert swarm.where()["sim-a2"] == n2
        assert swarm.chat("sim-a2").status_code == 200
        t0 = time.monotonic()
        assert swarm.fleet("switch", "sim-a")[0] == 0
        record("switch back (sim-a woken from sleep)", time.monotonic() - t0)
        assert swarm.chat("sim-a").status_code == 200
    finally:
        stop.set()
        worker.join(timeout=30)
    assert served > 0 and not failures, (served, failures[:5])
    rows = {r["name"]: r["state"] for r in json.loads(swarm.ok("status", "--json"))}
    assert rows == {"sim-a": "healthy", "sim-a2": "stopped", "sim-b": "healthy"}


def test_a_drained_node_moves_its_model_and_it_is_served_again(swarm: Swarm) -> None:
    before = swarm.where()["sim-b"]
    assert before is not None
    t0 = time.monotonic()
    swarm.availability(before, "drain")
    try:
        after = swarm.wait_node("sim-b", lambda n: n not in (None, before), 60)
        # Served by the new node itself (not by the old task while it shuts down).
        _wait_http(f"http://{swarm.cluster.nodes[after]}:{PORTS['sim-b']}/health", HEALTH_TIMEOUT)
        swarm.served("sim-b", HEALTH_TIMEOUT)
        record("drain: model moved and served again", time.monotonic() - t0)
        assert after in swarm.cluster.names
    finally:
        swarm.availability(before, "active")


def test_stack_file_deploys_and_serves(swarm: Swarm, tmp_path: Path) -> None:
    from fleet.registry import load_registry
    from fleet.stack import render_stack

    reg = load_registry(swarm.path)
    # A copy of the registry's models under other ports and node placement, as a stack.
    text = render_stack(reg, models=["sim-a2"])
    stack = tmp_path / "stack.yaml"
    stack.write_text(text)
    docker_cli("cp", str(stack), f"{swarm.cluster.manager}:/tmp/vft-stack.yaml")
    t0 = time.monotonic()
    swarm.cluster.on_manager("stack", "deploy", "-c", "/tmp/vft-stack.yaml", "vftstack",
                             timeout=120.0)
    try:
        url = f"http://{swarm.cluster.nodes[swarm.cluster.names[1]]}:{PORTS['sim-a2']}"
        _wait_http(f"{url}/health", HEALTH_TIMEOUT)
        record("docker stack deploy to healthy", time.monotonic() - t0)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30.0,
                       json={"model": "sim-a2", "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    finally:
        swarm.cluster.on_manager("stack", "rm", "vftstack", timeout=60.0)
        _wait_gone(swarm, "vftstack_vllm-sim-a2", 60)


def _wait_http(url: str, deadline: float) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{url} not 200 within {deadline:.0f}s")
        time.sleep(0.5)


def _wait_gone(swarm: Swarm, service: str, deadline: float) -> None:
    """Until no task of the removed stack still holds its port on a node."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        ps = swarm.cluster.on_manager("ps", "-q", "--filter", f"name={service}", check=False)
        nodes_busy = any(
            docker_cli("exec", n, "docker", "ps", "-q", "--filter", f"name={service}",
                       check=False).stdout.strip() for n in swarm.cluster.names)
        if not ps.stdout.strip() and not nodes_busy:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{service} still runs {deadline:.0f}s after `docker stack rm`")


def overlay_registry(c: SwarmCluster, network: str) -> str:
    """The test registry's cluster and nodes (same labels: `fleet up` keeps them) on the
    overlay `network`, with one model of its own: `sim-net` on node 3."""
    head = registry_text(c).split("[models.sim-a]", 1)[0]
    head = head.replace(f'manager = "{c.manager_url}"\n',
                        f'manager = "{c.manager_url}"\nnetwork = "{network}"\n')
    return head + f'[models.sim-net]\nsource = "sim/net"\nport = 18304\nnode = "{c.names[2]}"\n'


def test_a_gateway_on_the_overlay_reaches_a_model_by_its_compose_name(
        swarm: Swarm, tmp_path: Path) -> None:
    """The gateway's image as a container on node 1, on `[cluster] network` (an attachable
    overlay) with GATEWAY_UPSTREAM_HOST=service: it routes to the model on node 3 by the name
    `vllm-sim-net`, which the fleet gives each replica on the overlay."""
    c = swarm.cluster
    n1, _, n3 = c.names
    network, gateway = f"vft-{c.run_id}-overlay", f"vft-{c.run_id}-gw"
    c.on_manager("network", "create", "--driver", "overlay", "--attachable", network)
    path = tmp_path / "models.toml"
    path.write_text(overlay_registry(c, network))
    code, out, err = -1, "", ""
    try:
        code, out, err = swarm.fleet_with(path, "up", "sim-net")
        assert code == 0, f"fleet up sim-net exited {code}:\n{err}\n{out}"
        image = c.push(GATEWAY_IMAGE)  # the gateway's image, as the nodes pull it
        docker_cli("cp", str(path), f"{n1}:/tmp/vft-overlay.toml")
        t0 = time.monotonic()
        docker_cli("exec", n1, "docker", "run", "-d", "--name", gateway, "--network", network,
                   "-p", "18400:8000", "-e", "GATEWAY_UPSTREAM_HOST=service",
                   "-e", "GATEWAY_ADMIN_KEY=vft-admin",
                   "-v", "/tmp/vft-overlay.toml:/etc/vllm-fleet/models.toml:ro",
                   image, timeout=300.0)
        url = f"http://{c.nodes[n1]}:18400"
        _wait_http(f"{url}/health", HEALTH_TIMEOUT)
        # The node learns the overlay's names from the Swarm once a container of its joins
        # the network: the first seconds may answer 502 (name not found), then 200.
        end, last = time.monotonic() + 60, ""
        while True:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=30.0,
                           json={"model": "sim-net", "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "hi"}]})
            if r.status_code == 200:
                break
            last = f"{r.status_code} {r.text[:300]}"
            assert time.monotonic() < end, f"no answer by name within 60 s: {last}"
            time.sleep(0.5)
        record("gateway container on the overlay: started and answered by name",
               time.monotonic() - t0)
        assert swarm.where_in(path)["sim-net"] == n3
        status = httpx.get(f"{url}/admin/status", timeout=10.0,
                           headers={"authorization": "Bearer vft-admin"})
        assert status.status_code == 200, status.text
        replicas = status.json()["models"]["sim-net"]["replicas"]
        assert [r["url"] for r in replicas] == ["http://vllm-sim-net:18304"]
    finally:
        logs = docker_cli("exec", n1, "docker", "logs", gateway, check=False)
        docker_cli("exec", n1, "docker", "rm", "-f", gateway, check=False)
        swarm.fleet_with(path, "down", "sim-net")
        _wait_gone(swarm, "vllm-fleet-sim-net", 60)
        _remove_network(c, network, 60)
        print(logs.stdout[-2000:], logs.stderr[-2000:])


def _remove_network(c: SwarmCluster, network: str, deadline: float) -> None:
    """`docker network rm` once the removed service's tasks have left it."""
    end = time.monotonic() + deadline
    while True:
        done = c.on_manager("network", "rm", network, check=False)
        if done.returncode == 0 or "not found" in done.stderr:
            return
        if time.monotonic() > end:
            raise TimeoutError(f"network {network} still in use: {done.stderr.strip()}")
        time.sleep(0.5)


def test_a_killed_node_loses_its_model_and_it_is_served_again_within_its_health_timeout(
        swarm: Swarm) -> None:
    n1, _, n3 = swarm.cluster.names
    # Node 1 is the manager: move sim-b to node 3 first, so that losing node 3 is survivable.
    if swarm.where()["sim-b"] != n3:
        swarm.availability(n1, "drain")
        try:
            swarm.wait_node("sim-b", lambda n: n == n3, 60)
        finally:
            swarm.availability(n1, "active")
    swarm.served("sim-b", HEALTH_TIMEOUT)
    t0 = time.monotonic()
    docker_cli("kill", n3)
    took = _served_elsewhere(swarm, "sim-b", n3, t0)
    record("node killed: model served again from another node", took)
    assert took < HEALTH_TIMEOUT
    assert swarm.where()["sim-b"] == n1


def _served_elsewhere(swarm: Swarm, model: str, lost: str, t0: float) -> float:
    """Seconds from t0 until `fleet status` puts `model` on another node and the gateway
    answers it."""
    swarm.wait_node(model, lambda n: n not in (None, lost), HEALTH_TIMEOUT)
    swarm.served(model, HEALTH_TIMEOUT)
    return time.monotonic() - t0


def test_everything_is_removed_by_fleet_down(swarm: Swarm) -> None:
    swarm.ok("down")
    left = swarm.cluster.on_manager("service", "ls", "-q").stdout.split()
    assert left == []
