"""`docker compose up` of a rendered file, as a user runs it, with on-demand activation.

A simulator registry (one autostart model, one on demand) is rendered by `fleet compose`
into a temporary directory under a project name of its own, and brought up with the opt-in
Docker-socket override plus a test override that scopes the gateway's fleet to the project.
Checked, through the gateway's published port on the host:

- the autostart model answers through the compose gateway;
- a request for the on-demand model activates it (the gateway's fleet creates it on the
  project's network and waits for its health by service name) and is answered with 200;
- `python -m fleet switch` on the host while the activation runs waits for the same switch
  lock (the mounted lock directory) and ends only once the activation released it;
- `docker compose --profile '*' down -v --remove-orphans` leaves no container, network or
  volume of the project behind (the container the gateway created is one of the project's).

Everything is removed by the project's label in a finalizer, also on failure. Timings of each
phase are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fleet.compose import SOCKET_OVERRIDE_NAME, render_socket_override
from support.docker_fixtures import (
    DockerSession,
    container_logs,
    docker_binary,
    docker_cli,
    remove_labelled,
)
from support.fleet_faults import REPO_ROOT

pytestmark = pytest.mark.docker

PROJECT_LABEL = "com.docker.compose.project"
LAZY_LOAD_SECONDS = 6

REGISTRY = """
[defaults]
image = "{image}"
hf_cache = ""
ipc_host = false
shm_size = "64m"
health_timeout = 90

[models.auto]
source = "sim/auto"
port = {port_auto}
aliases = ["gpt-4o-mini"]

[models.lazy]
source = "sim/lazy"
port = {port_lazy}
autostart = false
env = {{ VLLM_SIM_LOAD_SECONDS = "{load}" }}
"""

# The test's own override: scope the gateway's fleet to this project (other work shares the
# daemon), so it neither sees nor touches anyone else's managed containers.
SCOPE_OVERRIDE = """
services:
  gateway:
    environment:
      FLEET_EXTRA_LABELS: "{label}={project}"
      FLEET_STOP_TIMEOUT: "5"
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    directory: Path
    project: str
    gateway_port: int
    lazy_port: int
    env: dict[str, str]
    files: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def compose(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        cmd = [docker_binary(), "compose", "--project-directory", str(self.directory)]
        for f in self.files:
            cmd += ["-f", f]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=self.directory, check=False)

    def fleet(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                              text=True, timeout=timeout, env=self.env, cwd=self.directory,
                              check=False)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label={PROJECT_LABEL}={self.project}"
        return {
            "containers": docker_cli("ps", "-a", "--filter", label, "--format",
                                     "{{.Names}}").stdout.split(),
            "networks": sorted({*docker_cli("network", "ls", "--filter", label, "--format",
                                            "{{.Name}}").stdout.split(),
                                *[n for n in docker_cli("network", "ls", "--format",
                                                        "{{.Name}}").stdout.split()
                                  if n == self.project]}),
            "volumes": docker_cli("volume", "ls", "--filter", label, "--format",
                                  "{{.Name}}").stdout.split(),
        }

    def logs(self) -> str:
        done = self.compose("--profile", "*", "logs", "--no-color", "--tail", "40", timeout=60)
        return done.stdout[-6000:] + done.stderr[-2000:]


@pytest.fixture
def deployment(docker_ready: DockerSession, gateway_image: str,
               tmp_path: Path) -> Iterator[Deployment]:
    project = f"vft-compose-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "deploy"
    directory.mkdir()
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir()
    port_auto, port_lazy, gateway_port = _free_port(), _free_port(), _free_port()
    (directory / "models.toml").write_text(REGISTRY.format(
        image=docker_ready.sim_image, port_auto=port_auto, port_lazy=port_lazy,
        load=LAZY_LOAD_SECONDS))
    (directory / "scope.yaml").write_text(SCOPE_OVERRIDE.format(label=PROJECT_LABEL,
                                                                project=project))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        # compose interpolation (rendered file) and the host's fleet alike
        "FLEET_LOCK_DIR": str(lock_dir),
        "FLEET_BASE_DIR": str(directory),
        "VLLM_FLEET_GATEWAY_PORT": str(gateway_port),
        # the host's fleet: this registry, this project's containers only
        "FLEET_REGISTRY": str(directory / "models.toml"),
        "FLEET_NAME_PREFIX": project,
        "FLEET_EXTRA_LABELS": f"{PROJECT_LABEL}={project}",
        "FLEET_STOP_TIMEOUT": "5",
    }
    for key in ("FLEET_LOCK_FILE", "FLEET_DOCKER_HOST", "FLEET_NETWORK", "FLEET_UPSTREAM_HOST",
                "FLEET_COMPOSE_PROJECT", "COMPOSE_PROFILES", "COMPOSE_FILE",
                "COMPOSE_PROJECT_NAME"):
        env.pop(key, None)
    d = Deployment(directory, project, gateway_port, port_lazy, env,
                   ("compose.yaml", SOCKET_OVERRIDE_NAME, "scope.yaml"))
    try:
        yield d
    finally:
        d.compose("--profile", "*", "down", "-v", "--remove-orphans", "-t", "5", timeout=180)
        problems = remove_labelled(f"{PROJECT_LABEL}={d.project}")
        docker_cli("network", "rm", d.project, check=False)
        if d.timings:
            print("\ncompose test timings (s): " + ", ".join(
                f"{k} {v:.1f}" for k, v in d.timings.items()), file=sys.stderr)
        assert not problems, problems


def _chat(base: str, model: str, timeout: float = 120.0) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=timeout, json={
        "model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})


def test_compose_up_serves_activates_switches_and_leaves_nothing(deployment: Deployment) -> None:
    d = deployment
    t0 = time.monotonic()
    rendered = d.fleet("compose", "--project", d.project)
    assert rendered.returncode == 0, rendered.stderr
    assert (d.directory / "compose.yaml").is_file()
    assert (d.directory / SOCKET_OVERRIDE_NAME).read_text() == render_socket_override()

    # -- up: the autostart model and the gateway, healthy -------------------------------
    t = time.monotonic()
    up = d.compose("up", "-d", "--wait", "--wait-timeout", "180", timeout=300)
    d.timings["compose up --wait"] = time.monotonic() - t
    assert up.returncode == 0, f"docker compose up failed:\n{up.stderr}\n{d.logs()}"
    gateway_state = json.loads(docker_cli(
        "inspect", "--format", "{{json .State.Health.Status}}",
        f"{d.project}-gateway-1").stdout)
    assert gateway_state == "healthy"

    # -- the autostart model through the gateway ----------------------------------------
    t = time.monotonic()
    r = _chat(d.gateway, "gpt-4o-mini")
    d.timings["first request (autostart model)"] = time.monotonic() - t
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gpt-4o-mini"

    # -- on-demand activation, with a host `fleet switch` racing it ---------------------
    answers: list[httpx.Response | BaseException] = []

    def ask_lazy() -> None:
        try:
            answers.append(_chat(d.gateway, "lazy", timeout=300))
        except BaseException as exc:
            answers.append(exc)

    t_act = time.monotonic()
    asker = threading.Thread(target=ask_lazy, daemon=True)
    asker.start()
    lock_file = Path(d.env["FLEET_LOCK_DIR"]) / "switch.lock"
    deadline = time.monotonic() + 60
    holder = ""
    while time.monotonic() < deadline:
        holder = lock_file.read_text() if lock_file.exists() else ""
        if "python -m gateway" in holder or answers:
            break
        time.sleep(0.05)
    assert "python -m gateway" in holder, (f"the gateway never held the shared lock {lock_file} "
                                 f"(holder {holder!r}; answers {answers})\n{d.logs()}")
    t = time.monotonic()
    switched = d.fleet("switch", "auto", timeout=300)
    d.timings["host fleet switch (waits for the activation)"] = time.monotonic() - t
    assert switched.returncode == 0, switched.stderr
    assert ("waiting for the switch lock held by pid 1 on " in switched.stderr
            and "python -m gateway" in switched.stderr), switched.stderr
    # The lock is released only once the activation is done: lazy is healthy by now.
    health = httpx.get(f"http://127.0.0.1:{d.lazy_port}/health", timeout=5)
    assert health.status_code == 200
    asker.join(300)
    d.timings["on-demand activation + answer"] = time.monotonic() - t_act
    assert answers and isinstance(answers[0], httpx.Response), answers
    assert answers[0].status_code == 200, f"{answers[0].text}\n{d.logs()}"
    assert answers[0].json()["model"] == "lazy"

    # The gateway made it on the project's network, under its service name, in the project.
    lazy = f"{d.project}-lazy"
    info = json.loads(docker_cli("inspect", lazy).stdout)[0]
    assert info["Config"]["Labels"][PROJECT_LABEL] == d.project
    aliases = info["NetworkSettings"]["Networks"][d.project]["Aliases"] or []
    assert "vllm-lazy" in aliases, (aliases, container_logs(lazy))
    # bounded logs whoever made the container; compose's services also restart
    auto = json.loads(docker_cli("inspect", f"{d.project}-auto").stdout)[0]
    for made in (info, auto):
        assert made["HostConfig"]["LogConfig"] == {
            "Type": "json-file", "Config": {"max-size": "20m", "max-file": "3"}}
    assert auto["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    status = {row["name"]: row["state"] for row in json.loads(
        d.fleet("status", "--json").stdout)}
    assert status == {"auto": "healthy", "lazy": "healthy"}

    # -- down leaves nothing behind ------------------------------------------------------
    t = time.monotonic()
    down = d.compose("--profile", "*", "down", "-v", "--remove-orphans", "-t", "5", timeout=180)
    d.timings["compose down"] = time.monotonic() - t
    assert down.returncode == 0, down.stderr
    assert d.leftovers() == {"containers": [], "networks": [], "volumes": []}
    d.timings["total"] = time.monotonic() - t0
