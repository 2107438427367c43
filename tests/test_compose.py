"""fleet.compose: compose.yaml rendered from the registry (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fleet.compose import (
    compose_drift,
    compose_file_for,
    compose_member_labels,
    generated_from,
    project_on_network,
    render_compose,
    render_socket_override,
)
from fleet.planner import fleet_specs
from fleet.registry import load_registry, parse_registry

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hf_Sup3rSecretTokenValue"

TEXT = """
[host]
gpus = [{ id = 0 }, { id = 1 }]
cpus = 8
gateway_cpus = 1

[defaults]
hf_cache = "~/.cache/huggingface"
cpus = 2

[models.chat]
source = "org/chat"
port = 8001
gpus = [0, 1]
gpu_memory_utilization = 0.5
sleep_mode = true
args = ["--chat-template", "{{ messages }}$HOME"]

[models.tiny]
source = "org/tiny"
port = 8002
ipc_host = false
shm_size = "1g"
autostart = false
volumes = ["vllm-compile-cache:/root/.cache/vllm"]
env = { VLLM_CPU_KVCACHE_SPACE = "1" }

[models.remote]
url = "http://10.0.0.5:8000"
"""


def reg(text: str = TEXT):  # type: ignore[no-untyped-def]
    return parse_registry(text, source="t.toml")


def doc(text: str = TEXT) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(render_compose(reg(text)))


def test_rendering_is_deterministic() -> None:
    assert render_compose(reg()) == render_compose(reg())
    assert render_compose(reg()).startswith(
        "# generated from models.toml by `fleet compose`; do not edit\n")


def test_one_service_per_managed_model_plus_the_gateway() -> None:
    d = doc()
    assert d["name"] == "vllm-fleet"
    assert list(d["services"]) == ["vllm-chat", "vllm-tiny", "gateway"]


def test_services_agree_with_the_fleet_specs() -> None:
    d = doc()
    for name, spec in fleet_specs(reg()).items():
        svc = d["services"][f"vllm-{name}"]
        assert svc["container_name"] == spec.name == f"vllm-fleet-{name}"
        assert svc["labels"] == dict(spec.labels)
        assert svc["image"] == spec.image
        assert svc["cpuset"] == spec.cpuset_cpus
        assert svc["healthcheck"]["test"] == list(spec.healthcheck["test"])
    assert d["services"]["vllm-chat"]["healthcheck"]["start_period"] == "900s"


def test_command_escapes_dollar_for_compose() -> None:
    cmd = doc()["services"]["vllm-chat"]["command"]
    assert cmd[-2:] == ["--chat-template", "{{ messages }}$$HOME"]
    assert cmd[:2] == ["--model", "org/chat"]


def test_ports_on_the_registry_host_ip() -> None:
    (port,) = doc()["services"]["vllm-chat"]["ports"]
    assert port == {"target": 8001, "published": "8001", "host_ip": "127.0.0.1", "protocol": "tcp"}


def test_gpu_reservations_and_none_for_cpu_only() -> None:
    d = doc()
    assert d["services"]["vllm-chat"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "device_ids": ["0", "1"], "capabilities": ["gpu"]}]
    assert "deploy" not in d["services"]["vllm-tiny"]


def test_ipc_or_shm_and_volumes() -> None:
    d = doc()
    chat, tiny = d["services"]["vllm-chat"], d["services"]["vllm-tiny"]
    assert chat["ipc"] == "host" and "shm_size" not in chat
    assert tiny["shm_size"] == "1g" and "ipc" not in tiny
    assert tiny["volumes"] == ["~/.cache/huggingface:/root/.cache/huggingface:rw",
                               "vllm-compile-cache:/root/.cache/vllm:rw"]
    assert d["volumes"] == {"vllm-compile-cache": {"name": "vllm-compile-cache"}}
    assert "volumes" not in doc(TEXT.replace('volumes = ["vllm-compile-cache:/root/.cache/vllm"]', ""))


def test_profiles_only_for_models_not_autostarted() -> None:
    d = doc()
    assert d["services"]["vllm-tiny"]["profiles"] == ["on-demand"]
    assert "profiles" not in d["services"]["vllm-chat"]


REPLICAS = TEXT.replace("[models.remote]", """[models.pool]
source = "org/pool"
port = 8010
cpus = 1
replicas = 2

[models.auto]
source = "org/auto"
port = 8020
cpus = 1
min_replicas = 1
max_replicas = 3
target_ongoing_requests = 4

[models.lazy]
source = "org/lazy"
port = 8030
autostart = false
min_replicas = 2
max_replicas = 3
target_ongoing_requests = 4

[models.remote]""").replace("cpus = 8", "cpus = 16")


def test_one_service_per_replica_slot_named_like_the_fleet() -> None:
    d = doc(REPLICAS)
    assert list(d["services"]) == [
        "vllm-chat", "vllm-tiny", "vllm-pool", "vllm-pool-r1", "vllm-auto", "vllm-auto-r1",
        "vllm-auto-r2", "vllm-lazy", "vllm-lazy-r1", "vllm-lazy-r2", "gateway"]
    r1 = d["services"]["vllm-pool-r1"]
    assert r1["container_name"] == "vllm-fleet-pool-r1"
    assert r1["labels"]["io.vllm-fleet.replica"] == "1"
    assert d["services"]["vllm-pool"]["labels"]["io.vllm-fleet.replica"] == "0"
    assert r1["ports"] == [{"target": 8011, "published": "8011", "host_ip": "127.0.0.1",
                            "protocol": "tcp"}]
    assert r1["command"][r1["command"].index("--port") + 1] == "8011"
    assert r1["healthcheck"]["test"][-1] == "http://127.0.0.1:8011/health"
    # every replica slot is pinned to cores of its own
    slots = ("vllm-pool", "vllm-pool-r1", "vllm-auto", "vllm-auto-r1", "vllm-auto-r2")
    assert [d["services"][s]["cpuset"] for s in slots] == ["5", "6", "7", "8", "9"]


def test_autoscale_slots_get_their_own_profile() -> None:
    svc = doc(REPLICAS)["services"]
    assert "profiles" not in svc["vllm-pool"] and "profiles" not in svc["vllm-pool-r1"]
    assert "profiles" not in svc["vllm-auto"]
    assert svc["vllm-auto-r1"]["profiles"] == svc["vllm-auto-r2"]["profiles"] == ["autoscale"]
    # an on-demand model: its initial replicas on demand, the other slots autoscale
    assert svc["vllm-lazy"]["profiles"] == svc["vllm-lazy-r1"]["profiles"] == ["on-demand"]
    assert svc["vllm-lazy-r2"]["profiles"] == ["autoscale"]
    # the gateway starts without waiting for the models (it answers 503 itself)
    assert "depends_on" not in svc["gateway"]


def test_hf_token_is_interpolated_never_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    text = render_compose(reg())
    assert SECRET not in text
    d = yaml.safe_load(text)
    for svc in ("vllm-chat", "vllm-tiny"):
        assert d["services"][svc]["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    assert d["services"]["vllm-chat"]["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert d["services"]["vllm-tiny"]["environment"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "HF_TOKEN" not in d["services"]["gateway"]["environment"]


def test_gateway_service() -> None:
    gw = doc()["services"]["gateway"]
    assert gw["build"] == {"context": ".", "dockerfile": "docker/gateway.Dockerfile"}
    assert gw["image"] == "vllm-fleet/gateway:dev"
    assert gw["ports"] == [{"target": 8000, "published": "${VLLM_FLEET_GATEWAY_PORT:-8000}",
                            "host_ip": "127.0.0.1", "protocol": "tcp"}]
    assert gw["volumes"] == ["./models.toml:/etc/vllm-fleet/models.toml:ro",
                             "${FLEET_LOCK_DIR:-/run/vllm-fleet}:/run/vllm-fleet"]
    assert gw["environment"] == {
        "FLEET_REGISTRY": "/etc/vllm-fleet/models.toml",
        "GATEWAY_UPSTREAM_HOST": "service", "GATEWAY_HOST": "0.0.0.0",
        # its fleet reaches the models by service name, creates them on the project's
        # network as members of the project, and shares the host's lock directory
        "FLEET_UPSTREAM_HOST": "service", "FLEET_NETWORK": "vllm-fleet",
        "FLEET_COMPOSE_PROJECT": "vllm-fleet", "FLEET_NAME_PREFIX": "vllm-fleet",
        "FLEET_LOCK_DIR": "/run/vllm-fleet", "FLEET_BASE_DIR": "${FLEET_BASE_DIR:-${PWD}}"}
    # It starts at once (no depends_on: it answers 503 for a model that is not up) and has
    # its own health check.
    assert "depends_on" not in gw
    assert gw["healthcheck"]["test"][-1] == "http://127.0.0.1:8000/health"
    assert gw["restart"] == "unless-stopped"
    assert gw["logging"]["driver"] == "json-file"
    assert gw["cpuset"] == "0"


def test_model_services_restart_and_bounded_logs() -> None:
    for name, svc in doc()["services"].items():
        assert svc["restart"] == "unless-stopped", name
        assert svc["logging"] == {"driver": "json-file",
                                  "options": {"max-size": "20m", "max-file": "3"}}, name


def test_the_project_network_is_named_after_the_project() -> None:
    assert doc()["networks"] == {"default": {"name": "vllm-fleet"}}
    named = yaml.safe_load(render_compose(reg(), project="demo"))
    assert named["networks"] == {"default": {"name": "demo"}}
    assert named["services"]["gateway"]["environment"]["FLEET_NETWORK"] == "demo"
    assert named["services"]["gateway"]["environment"]["FLEET_COMPOSE_PROJECT"] == "demo"
    assert named["services"]["gateway"]["environment"]["FLEET_NAME_PREFIX"] == "demo"


@pytest.mark.parametrize(("registry", "expected"), [
    ("models.toml", "compose.yaml"),
    ("conf/models.toml", "compose.yaml"),
    ("models.cpu.toml", "compose.cpu.yaml"),
    ("/etc/x/models.gpu.big.toml", "compose.gpu.big.yaml"),
    ("fleet.toml", "fleet.compose.yaml"),
    ("lab.json", "lab.compose.yaml"),
])
def test_one_compose_file_per_registry(registry: str, expected: str) -> None:
    assert compose_file_for(registry) == expected


def test_header_names_the_registry_and_its_file() -> None:
    text = render_compose(reg(), registry_path_in_repo="models.cpu.toml")
    assert generated_from(text) == "models.cpu.toml"
    assert "writes compose.cpu.yaml" in text.split("name:", 1)[0]
    assert "docker compose -f compose.cpu.yaml up -d" in text
    assert generated_from("services: {}\n") is None


def test_socket_override_is_opt_in_and_says_what_it_grants() -> None:
    text = render_socket_override()
    d = yaml.safe_load(text)
    assert d == {"services": {"gateway": {
        "volumes": ["/var/run/docker.sock:/var/run/docker.sock"],
        "environment": {"HF_TOKEN": "${HF_TOKEN:-}"}}}}
    assert "root" in text and "full control of the Docker daemon" in text
    # the main file never mounts the socket
    assert "docker.sock" not in render_compose(reg())


def test_compose_membership_labels() -> None:
    from types import SimpleNamespace

    labels = compose_member_labels("demo", "vllm-tiny")
    assert labels["com.docker.compose.project"] == "demo"
    assert labels["com.docker.compose.service"] == "vllm-tiny"
    assert labels["com.docker.compose.oneoff"] == "False"
    assert labels["com.docker.compose.config-hash"]  # compose lists only containers with one
    on = SimpleNamespace(labels={"com.docker.compose.project": "demo"}, networks=("demo",))
    off = SimpleNamespace(labels={"com.docker.compose.project": "x"}, networks=("other",))
    bare = SimpleNamespace(labels={}, networks=("demo",))
    assert project_on_network([off, bare, on], "demo") == "demo"
    assert project_on_network([off, bare], "demo") is None


def test_registry_path_and_project_options() -> None:
    text = render_compose(reg(), registry_path_in_repo="conf/models.toml", project="demo")
    d = yaml.safe_load(text)
    assert text.startswith("# generated from conf/models.toml")
    assert d["name"] == "demo"
    assert d["services"]["vllm-chat"]["container_name"] == "demo-chat"
    assert d["services"]["gateway"]["volumes"][0] == "./conf/models.toml:/etc/vllm-fleet/models.toml:ro"
    named = yaml.safe_load(render_compose(reg(), project="demo", name_prefix="vllm-fleet"))
    assert named["services"]["vllm-chat"]["container_name"] == "vllm-fleet-chat"


def test_drift_none_when_up_to_date_else_a_diff() -> None:
    r = reg()
    current = render_compose(r)
    assert compose_drift(r, current) is None
    changed = reg(TEXT.replace("port = 8002", "port = 8012"))
    diff = compose_drift(changed, current)
    assert diff is not None
    assert diff.startswith("--- compose.yaml (existing)\n+++ compose.yaml (rendered from models.toml)")
    assert "-      published: '8002'" in diff and "+      published: '8012'" in diff
    edited = current.replace("retries: 3", "retries: 9", 1)
    assert "retries: 9" in (compose_drift(r, edited) or "")


def test_drift_reports_whitespace_only_changes() -> None:
    r = reg()
    assert compose_drift(r, render_compose(r) + "\n") is not None
    assert compose_drift(r, render_compose(r).rstrip("\n")) is not None


@pytest.mark.parametrize(("registry_name", "compose_name"), [
    ("models.toml", "compose.yaml"), ("models.cpu.toml", "compose.cpu.yaml")])
def test_committed_compose_files_match_their_registries(registry_name: str,
                                                        compose_name: str) -> None:
    registry = load_registry(ROOT / registry_name)
    committed = (ROOT / compose_name).read_text(encoding="utf-8")
    drift = compose_drift(registry, committed, registry_path_in_repo=registry_name)
    assert drift is None, (f"{compose_name} is stale; run `fleet compose --registry "
                           f"{registry_name}`:\n{drift}")


def test_committed_socket_override_is_current() -> None:
    committed = (ROOT / "compose.docker-socket.yaml").read_text(encoding="utf-8")
    assert committed == render_socket_override(), (
        "compose.docker-socket.yaml is stale; run `fleet compose`")
