"""The rendered compose.yaml is accepted by the real `docker compose config` (Compose v2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleet.compose import render_compose
from fleet.planner import fleet_specs
from fleet.registry import load_registry, parse_registry

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
SECRET = "hf_Sup3rSecretTokenValue"
CPU_REGISTRY = """
[host]
cpus = 2
gateway_cpus = 0

[defaults]
image = "vllm-fleet/sim:dev"
hf_cache = "~/.cache/huggingface"
models_dir = "./models"
cpus = 1

[models.tiny]
source = "./tiny-llama"
port = 18101
ipc_host = false
shm_size = "1g"
sleep_mode = true
args = ["--chat-template", "{{ x }}$HOME"]
volumes = ["vllm-compile-cache:/root/.cache/vllm"]

[models.other]
source = "org/other"
port = 18102
autostart = false
"""


def _docker() -> str:
    docker = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
    if docker is None:
        pytest.fail("no docker CLI: run scripts/install-docker.sh (installs docker.io and the "
                    "Compose plugin)")
    plugin = Path.home() / ".docker" / "cli-plugins" / "docker-compose"
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        pytest.fail(f"`docker compose` is not available ({plugin} missing?): run "
                    f"scripts/install-docker.sh, which installs Compose v2 there\n{probe.stderr}")
    return docker


def _config(tmp_path: Path, compose_text: str, registry_text: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "compose.yaml").write_text(compose_text, encoding="utf-8")
    (tmp_path / "models.toml").write_text(registry_text, encoding="utf-8")
    env = {**os.environ, "HF_TOKEN": SECRET, "HOME": str(tmp_path / "home"),
           "PWD": str(tmp_path)}  # as a shell sets it after `cd` to the registry's directory
    for name in ("FLEET_BASE_DIR", "FLEET_LOCK_DIR", "VLLM_FLEET_GATEWAY_PORT"):
        env.pop(name, None)
    return subprocess.run([_docker(), "compose", "-f", str(tmp_path / "compose.yaml"), *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)


def _resolved(tmp_path: Path, compose_text: str, registry_text: str, *profile: str) -> dict[str, Any]:
    done = _config(tmp_path, compose_text, registry_text, *profile, "config", "--format", "json")
    assert done.returncode == 0, f"docker compose config refused the file:\n{done.stderr}"
    return json.loads(done.stdout)


def test_shipped_compose_yaml_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "compose.yaml").read_text(encoding="utf-8")
    registry_text = (ROOT / "models.toml").read_text(encoding="utf-8")
    done = _config(tmp_path, text, registry_text, "--profile", "on-demand", "config", "--quiet")
    assert done.returncode == 0, done.stderr
    cfg = _resolved(tmp_path, text, registry_text, "--profile", "on-demand")
    registry = load_registry(ROOT / "models.toml")
    for name, spec in fleet_specs(registry).items():
        svc = cfg["services"][f"vllm-{name}"]
        assert svc["container_name"] == spec.name
        assert svc["labels"] == dict(spec.labels)
        assert svc["command"] == list(spec.command)
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == list(spec.gpu_device_ids)


def test_cpu_registry_resolves_like_the_fleet_spec(tmp_path: Path) -> None:
    registry = parse_registry(CPU_REGISTRY)
    text = render_compose(registry)
    assert SECRET not in text
    cfg = _resolved(tmp_path, text, CPU_REGISTRY)
    assert set(cfg["services"]) == {"vllm-tiny", "gateway"}   # other is on demand
    specs = fleet_specs(registry)
    tiny = cfg["services"]["vllm-tiny"]
    spec = specs["tiny"]
    # `$$` in the file is a literal `$` for the container (not interpolated from the shell;
    # `config` prints it escaped again); HF_TOKEN comes from the shell.
    assert [a.replace("$$", "$") for a in tiny["command"]] == list(spec.command)
    assert tiny["command"][-1] == "{{ x }}$$HOME"
    assert tiny["environment"] == {"HF_TOKEN": SECRET, "VLLM_SERVER_DEV_MODE": "1"}
    assert tiny["labels"] == dict(spec.labels)
    assert tiny["cpuset"] == spec.cpuset_cpus == "0"
    assert tiny["shm_size"] in ("1073741824", 1073741824, "1g")
    assert tiny["ports"][0]["host_ip"] == "127.0.0.1"
    assert tiny["ports"][0]["target"] == 18101 and str(tiny["ports"][0]["published"]) == "18101"
    binds = {v["target"]: v for v in tiny["volumes"]}
    assert binds["/root/.cache/huggingface"]["source"] == str(tmp_path / "home" / ".cache" / "huggingface")
    assert binds["/models"]["source"] == str(tmp_path / "models")
    assert binds["/models"].get("read_only") is True
    assert binds["/root/.cache/vllm"]["type"] == "volume"
    assert cfg["volumes"]["vllm-compile-cache"]["name"] == "vllm-compile-cache"
    assert "deploy" not in tiny
    gateway = cfg["services"]["gateway"]
    # the gateway starts without waiting for the models; it has its own health check
    assert "depends_on" not in gateway
    assert gateway["healthcheck"]["test"][-1] == "http://127.0.0.1:8000/health"
    assert gateway["environment"]["FLEET_BASE_DIR"] == str(tmp_path)   # ${PWD} of `up`
    assert str(gateway["ports"][0]["published"]) == "8000"
    assert tiny["restart"] == "unless-stopped" and tiny["logging"]["driver"] == "json-file"
    assert cfg["networks"]["default"]["name"] == "vllm-fleet"
    on_demand = _resolved(tmp_path, text, CPU_REGISTRY, "--profile", "on-demand")
    assert on_demand["services"]["vllm-other"]["container_name"] == specs["other"].name


def test_autoscale_slots_start_only_with_their_profile(tmp_path: Path) -> None:
    text_registry = CPU_REGISTRY.replace(
        "[models.other]", "[models.auto]\nsource = \"org/auto\"\nport = 18110\n"
        "max_replicas = 2\ntarget_ongoing_requests = 4\n\n[models.other]").replace(
        "cpus = 2\n", "cpus = 4\n", 1)
    registry = parse_registry(text_registry)
    text = render_compose(registry)
    default = _resolved(tmp_path, text, text_registry)
    assert set(default["services"]) == {"vllm-tiny", "vllm-auto", "gateway"}
    scaled = _resolved(tmp_path, text, text_registry, "--profile", "autoscale")
    r1 = scaled["services"]["vllm-auto-r1"]
    assert r1["container_name"] == "vllm-fleet-auto-r1"
    assert r1["labels"]["io.vllm-fleet.replica"] == "1"
    assert r1["ports"][0]["target"] == 18111 and str(r1["ports"][0]["published"]) == "18111"
    assert r1["cpuset"] != scaled["services"]["vllm-auto"]["cpuset"]


def test_shipped_cpu_compose_file_with_the_socket_override_is_valid(tmp_path: Path) -> None:
    for name in ("compose.cpu.yaml", "models.cpu.toml", "compose.docker-socket.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    env = {**os.environ, "HF_TOKEN": SECRET, "PWD": str(tmp_path)}
    done = subprocess.run(
        [_docker(), "compose", "-f", "compose.cpu.yaml", "-f", "compose.docker-socket.yaml",
         "--profile", "*", "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    gateway = json.loads(done.stdout)["services"]["gateway"]
    targets = {v["target"]: v["source"] for v in gateway["volumes"]}
    assert targets["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert targets["/etc/vllm-fleet/models.toml"] == str(tmp_path / "models.cpu.toml")
    assert gateway["environment"]["HF_TOKEN"] == SECRET   # only through the override
