"""The Swarm parts without a Swarm: registry tables, per-node placement, the exact service
shapes (GPUs as NVIDIA documents them for Swarm), task states, the probe's retargeting, the
stack file and the gateway's URLs for nodes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.check import check_registry
from fleet.cli import main as fleet_main
from fleet.cluster import candidate_nodes, node_urls, planning_node
from fleet.health import HealthResult
from fleet.placement import check_placement
from fleet.registry import RegistryError, parse_registry, replica_urls
from fleet.spec import docker_run_kwargs, replica_specs
from fleet.stack import render_stack, stack_drift
from fleet.swarm import SwarmProbe
from fleet.swarm_spec import LABEL_SWARM_NODE, parse_size, record_from_service, service_spec
from gateway.routing import RoutingTable, addressing_problem

pytestmark = pytest.mark.unit

SWARM = """
[cluster]
engine = "swarm"
manager = "tcp://10.9.0.1:2375"
{extra}

[nodes.n1]
address = "10.9.0.1"
gpus = [{{ id = 0, memory_gib = 80 }}, {{ id = 1, memory_gib = 80 }}]
labels = {{ pool = "big" }}

[nodes.n2]
address = "10.9.0.2"
gpus = [{{ id = 0, memory_gib = 24 }}]
cpus = 4

[nodes.n3]
address = "10.9.0.3"
labels = {{ pool = "big" }}
gpus = [{{ id = 0 }}, {{ id = 1 }}]

[defaults]
image = "reg:5000/vllm:1"
hf_cache = ""
ipc_host = false

[models.big]
source = "org/big"
port = 8001
gpus = [0, 1]
gpu_memory_utilization = 0.9
node_labels = {{ pool = "big" }}

[models.small]
source = "org/small"
port = 8002
gpus = [0]
gpu_memory_utilization = 0.5
node = "n2"

[models.small2]
source = "org/small2"
port = 8003
gpus = [0]
gpu_memory_utilization = 0.6
node = "n2"
autostart = false
"""


def reg(extra: str = "") -> Any:
    return parse_registry(SWARM.format(extra=extra), source="swarm.toml")


def test_cluster_and_nodes_parse_and_models_find_their_nodes() -> None:
    r = reg()
    assert r.swarm and r.cluster.manager == "tcp://10.9.0.1:2375"
    assert candidate_nodes(r.nodes, r.models["big"]) == ["n1", "n3"]
    assert candidate_nodes(r.nodes, r.models["small"]) == ["n2"]
    assert planning_node(r.nodes, r.models["big"]) == "n1"
    # with_host keeps the cluster (CLI --host-cpus)
    assert r.with_host(cpus=2).nodes == r.nodes


@pytest.mark.parametrize("text, needle", [
    ('[nodes.a]\n[models.m]\nsource = "x"\nport = 1', "only apply to a Swarm"),
    ('[cluster]\nengine = "swarm"\n[models.m]\nsource = "x"\nport = 1',
     "needs at least one [nodes.NAME]"),
    ('[cluster]\nengine = "swarm"\n[nodes.a]\n[models.m]\nsource = "x"\nport = 1\nnode = "b"',
     "'b' is not a [nodes.NAME] table"),
    ('[cluster]\nengine = "swarm"\n[nodes.a]\n[models.m]\nsource = "x"\nport = 1\n'
     'node_labels = { gpu = "h100" }', "no node has the labels"),
    ('[cluster]\nengine = "k8s"\n[nodes.a]\n[models.m]\nsource = "x"\nport = 1', "engine"),
    ('[models.m]\nsource = "x"\nport = 1\nnode = "a"', "only apply to a Swarm"),
    ('[cluster]\nengine = "swarm"\n[nodes.a]\ngpuz = 1\n[models.m]\nsource = "x"\nport = 1',
     "did you mean 'gpus'"),
])
def test_bad_cluster_tables_are_named(text: str, needle: str) -> None:
    with pytest.raises(RegistryError) as exc:
        parse_registry(text, source="bad.toml")
    assert needle in str(exc.value)


def test_placement_is_checked_per_node() -> None:
    r = reg()
    assert check_registry(r) == []
    # small (0.5) and small2 (0.6) share n2's only GPU: not together; big on n1 is unaffected.
    found = check_placement(r, ["big", "small", "small2"])
    assert [v.kind for v in found] == ["gpu-overcommit"]
    assert found[0].message.startswith("node n2: GPU 0:")
    assert check_placement(r, ["big", "small"]) == []


def test_the_gateway_routes_a_swarm_model_to_its_port_on_each_allowed_node() -> None:
    r = reg()
    assert node_urls(r.nodes, r.models["big"]) == ["http://10.9.0.1:8001", "http://10.9.0.3:8001"]
    table = RoutingTable(r)
    assert table.resolve("small").replicas == ("http://10.9.0.2:8002",)  # type: ignore[union-attr]


def test_a_gateway_on_the_overlay_routes_a_swarm_model_by_its_compose_name() -> None:
    r = reg('network = "fleet-net"')
    assert addressing_problem(r, "service") is None
    route = RoutingTable(r, "service").resolve("small")
    assert route is not None and route.replicas == ("http://vllm-small:8002",)
    # the name needs the overlay: without [cluster] network it is refused, saying what to do
    problem = addressing_problem(reg(), "service")
    assert problem is not None and "add `network = " in problem
    assert addressing_problem(reg(), "127.0.0.1") is None


def kwargs_of(r: Any, model: str) -> dict[str, Any]:
    spec = replica_specs(r)[model][0]
    return service_spec(docker_run_kwargs(spec, {}), r, stop_timeout=30)


def test_service_shape_host_ports_dnsrr_constraints_and_visible_devices() -> None:
    r = reg()
    k = kwargs_of(r, "small")
    assert k["name"] == "vllm-fleet-small"
    assert k["mode"] == {"Replicated": {"Replicas": 1}}
    assert k["endpoint_spec"] == {"Mode": "dnsrr", "Ports": [
        {"Protocol": "tcp", "TargetPort": 8002, "PublishedPort": 8002, "PublishMode": "host"}]}
    task = k["task_template"]
    assert task["Placement"] == {"Constraints": ["node.labels.io.vllm-fleet.managed==true",
                                                 "node.labels.io.vllm-fleet.node==n2"]}
    assert task["RestartPolicy"] == {"Condition": "any", "Delay": 5_000_000_000,
                                     "MaxAttempts": 0}
    c = task["ContainerSpec"]
    assert "NVIDIA_VISIBLE_DEVICES=0" in c["Env"]
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in c["Env"]
    assert c["Args"][:2] == ["--model", "org/small"]
    assert "--gpu-memory-utilization" in c["Args"] and "0.5" in c["Args"]
    assert {"Type": "tmpfs", "Target": "/dev/shm",
            "TmpfsOptions": {"SizeBytes": 8 << 30}} in c["Mounts"]
    assert c["Healthcheck"]["Test"][-1] == "http://127.0.0.1:8002/health"
    assert set(c["Healthcheck"]) == {"Test", "Interval", "Timeout", "Retries", "StartPeriod"}
    assert task["Resources"] == {}
    assert k["labels"]["io.vllm-fleet.model"] == "small"
    big = kwargs_of(r, "big")["task_template"]
    assert big["Placement"]["Constraints"][1:] == ["node.labels.pool==big"]
    assert "NVIDIA_VISIBLE_DEVICES=0,1" in big["ContainerSpec"]["Env"]


def test_generic_resource_gpus_reserve_the_advertised_kind() -> None:
    r = reg('gpu_mode = "generic-resource"\nnetwork = "fleet-net"')
    task = kwargs_of(r, "big")["task_template"]
    assert task["Resources"] == {"Reservations": {"GenericResources": [
        {"DiscreteResourceSpec": {"Kind": "gpu", "Value": 2}}]}}
    assert not any(e.startswith("NVIDIA_VISIBLE_DEVICES") for e in task["ContainerSpec"]["Env"])
    # on the overlay the replica answers to its compose name too (GATEWAY_UPSTREAM_HOST=service)
    assert task["Networks"] == [{"Target": "fleet-net", "Aliases": ["vllm-big"]}]


def test_on_the_overlay_each_replica_answers_to_its_compose_name() -> None:
    text = SWARM.format(extra='network = "fleet-net"')
    text = text.replace("port = 8003", "port = 8013")  # room for small's second replica
    r = parse_registry(text.replace("port = 8002\n", "port = 8002\nreplicas = 2\n"),
                       source="swarm.toml")
    specs = replica_specs(r)["small"]
    aliases = [service_spec(docker_run_kwargs(s, {}), r)["task_template"]["Networks"]
               for s in specs]
    assert aliases == [[{"Target": "fleet-net", "Aliases": ["vllm-small"]}],
                       [{"Target": "fleet-net", "Aliases": ["vllm-small-r1"]}]]
    # the names the gateway uses with GATEWAY_UPSTREAM_HOST=service
    assert [u.split("//")[1].split(":")[0] for u in replica_urls(r, r.models["small"], "service")
            ] == ["vllm-small", "vllm-small-r1"]


def test_sizes() -> None:
    assert parse_size("64m") == 64 << 20 and parse_size("8g") == 8 << 30
    assert parse_size("1024") == 1024 and parse_size(None) == 8 << 30
    with pytest.raises(ValueError):
        parse_size("lots")


def service(replicas: int) -> dict[str, Any]:
    return {"ID": "svc1", "Spec": {"Name": "vllm-fleet-m", "Labels": {
        "io.vllm-fleet.managed": "true", "io.vllm-fleet.model": "m",
        "io.vllm-fleet.spec-hash": "abc"}, "Mode": {"Replicated": {"Replicas": replicas}},
        "EndpointSpec": {"Ports": [{"PublishedPort": 8001}]},
        "TaskTemplate": {"ContainerSpec": {"Image": "img"}}}}


def task(state: str, ts: str, node: str = "N2", desired: str = "running",
         exit_code: int | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"State": state, "Timestamp": ts}
    if exit_code is not None:
        status["ContainerStatus"] = {"ExitCode": exit_code}
    return {"ID": ts, "NodeID": node, "DesiredState": desired, "Status": status,
            "CreatedAt": ts}


def test_task_states_become_container_states() -> None:
    names = {"N2": "n2"}
    rec = record_from_service(service(1), [task("running", "2026-01-01T00:00:02Z")], names)
    assert (rec.state, rec.health, rec.name, rec.ports) == ("running", "healthy",
                                                            "vllm-fleet-m@n2", (8001,))
    assert rec.labels[LABEL_SWARM_NODE] == "n2" and rec.spec_hash == "abc"
    rec = record_from_service(service(1), [task("preparing", "2026-01-01T00:00:02Z")], names)
    assert (rec.state, rec.health) == ("running", "starting")
    stopped = record_from_service(service(0), [task("shutdown", "2026-01-01T00:00:02Z",
                                                    desired="shutdown", exit_code=0)], names)
    assert (stopped.state, stopped.exit_code, stopped.running) == ("exited", 0, False)
    failing = [task("failed", f"2026-01-01T00:00:0{i}Z", desired="shutdown") for i in range(3)]
    assert record_from_service(service(1), failing, names).state == "restarting"
    # A lost node: the old task is orphaned, a new one is on its way elsewhere.
    moved = [task("orphaned", "2026-01-01T00:00:01Z", desired="shutdown"),
             task("pending", "2026-01-01T00:00:05Z", node="")]
    assert record_from_service(service(1), moved, names).state == "running"


class FakeEngine:
    def __init__(self, where: dict[int, str | None]) -> None:
        self.where = where

    def address_for_port(self, port: int) -> str | None:
        return self.where.get(port)


class FakeProbe:
    def __init__(self) -> None:
        self.urls: list[str] = []

    def health(self, base_url: str) -> HealthResult:
        self.urls.append(base_url)
        return HealthResult(True)

    def is_sleeping(self, base_url: str) -> bool | None:
        self.urls.append(base_url)
        return False

    def sleep(self, base_url: str, level: int = 1) -> None:
        self.urls.append(base_url)

    def wake_up(self, base_url: str) -> None:
        self.urls.append(base_url)


def test_the_probe_goes_to_the_node_that_runs_the_port() -> None:
    inner = FakeProbe()
    probe = SwarmProbe(inner, FakeEngine({8001: "10.9.0.3", 8002: None}))  # type: ignore[arg-type]
    assert probe.health("http://127.0.0.1:8001").ok
    probe.wake_up("http://127.0.0.1:8001")
    assert inner.urls == ["http://10.9.0.3:8001", "http://10.9.0.3:8001"]
    missing = probe.health("http://127.0.0.1:8002")
    assert not missing.ok and "not placed" in missing.detail


def test_stack_file_shape_and_drift(tmp_path: Path) -> None:
    r = reg('gpu_mode = "generic-resource"')
    text = render_stack(r)
    doc = yaml.safe_load(text)
    assert doc["version"] == "3.8"
    big = doc["services"]["vllm-big"]
    assert big["ports"] == [{"target": 8001, "published": 8001, "protocol": "tcp",
                             "mode": "host"}]
    assert big["deploy"]["endpoint_mode"] == "dnsrr"
    assert big["deploy"]["replicas"] == 1
    assert big["deploy"]["placement"]["constraints"][-1] == "node.labels.pool==big"
    assert big["deploy"]["restart_policy"] == {"condition": "any", "delay": "5s"}
    assert big["deploy"]["resources"] == {"reservations": {"generic_resources": [
        {"discrete_resource_spec": {"kind": "gpu", "value": 2}}]}}
    assert big["healthcheck"]["start_period"] == "900s"
    assert doc["services"]["vllm-small2"]["deploy"]["replicas"] == 0  # autostart = false
    assert stack_drift(r, text) is None
    assert "-    image" in (stack_drift(r, text.replace("reg:5000/vllm:1", "other")) or "") or \
        stack_drift(r, text.replace("reg:5000/vllm:1", "other")) is not None
    # The CLI writes it beside the registry and checks it.
    path = tmp_path / "models.toml"
    path.write_text(SWARM.format(extra=""))
    out, err = io.StringIO(), io.StringIO()
    assert fleet_main(["--registry", str(path), "compose", "--stack"], stdout=out,
                      stderr=err) == 0
    assert (tmp_path / "stack.yaml").exists()
    assert fleet_main(["--registry", str(path), "compose", "--stack", "--check"],
                      stdout=out, stderr=err) == 0
    (tmp_path / "stack.yaml").write_text("version: '3.8'\n")
    assert fleet_main(["--registry", str(path), "compose", "--stack", "--check"],
                      stdout=out, stderr=err) == 1


def test_stack_needs_a_swarm_registry(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.m]\nsource = "x"\nport = 8001\n')
    err = io.StringIO()
    assert fleet_main(["--registry", str(path), "compose", "--stack"], stdout=io.StringIO(),
                      stderr=err) == 2
    assert "fleet compose" in err.getvalue()
