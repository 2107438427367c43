"""The locally built images: the simulator runs like vllm/vllm-openai, the gateway serves.

Tier docker: a real daemon; images built (cached) by scripts/build-images.sh through the
`docker_ready` / `gateway_image` fixtures. Every container carries the session's
`io.vllm-fleet.test` label and is removed by it at session end.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from support.docker_fixtures import (
    DockerSession,
    container_exited,
    container_logs,
    docker_cli,
    wait_container_healthy,
    wait_http_ok,
)
from support.ports import free_port

pytestmark = pytest.mark.docker

SIM_PORT = 8123  # the port the simulator listens on inside its container (vLLM's --port)


def _run_detached(session: DockerSession, name: str, *args: str) -> str:
    """`docker run -d` with the session label; returns the container name."""
    docker_cli("run", "-d", "--name", session.name(name), "--label", session.label, *args,
               timeout=60.0)
    return session.name(name)


def _inspect(ref: str, kind: str = "image") -> dict[str, object]:
    out = docker_cli(kind, "inspect", "--format", "{{json .Config}}", ref, timeout=15.0).stdout
    return dict(json.loads(out))


def test_sim_image_takes_vllm_flags_and_serves_models(docker_ready: DockerSession) -> None:
    port = free_port()
    name = _run_detached(
        docker_ready, "sim-flags",
        "-p", f"127.0.0.1:{port}:{SIM_PORT}",
        "--health-cmd", f"curl -fsS http://127.0.0.1:{SIM_PORT}/health",
        "--health-interval", "1s", "--health-timeout", "2s", "--health-retries", "30",
        docker_ready.sim_image,
        "--model", "m", "--served-model-name", "a", "b", "--port", str(SIM_PORT),
    )
    # Docker's own health check (curl inside the image, as the fleet uses it) turns healthy...
    wait_container_healthy(name, deadline=60.0)
    # ...and the published loopback port answers like vLLM.
    response = wait_http_ok(f"http://127.0.0.1:{port}/v1/models", deadline=30.0,
                            give_up=lambda: container_exited(name))
    body = response.json()
    assert body["object"] == "list"
    assert sorted(card["id"] for card in body["data"]) == ["a", "b"], body
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5.0)
    assert health.status_code == 200


def test_sim_image_rejects_an_unknown_flag(docker_ready: DockerSession) -> None:
    name = _run_detached(docker_ready, "sim-badflag", docker_ready.sim_image,
                         "--model", "m", "--no-such-vllm-flag")
    code = int(docker_cli("wait", name, timeout=60.0).stdout.strip())
    logs = container_logs(name)
    assert code != 0, f"exit code 0 for an unknown flag; logs:\n{logs}"
    assert "--no-such-vllm-flag" in logs, logs


def test_sim_image_metadata_and_no_wheels_in_layers(docker_ready: DockerSession) -> None:
    config = _inspect(docker_ready.sim_image)
    assert config["Entrypoint"] == ["python3", "-m", "vllm_sim"]
    assert "8000/tcp" in dict(config.get("ExposedPorts") or {})
    labels = dict(config.get("Labels") or {})
    assert labels.get("io.vllm-fleet.image") == "sim"
    assert labels.get("io.vllm-fleet.inputs"), labels
    # The wheels were bind-mounted for the install steps only: none is in the image.
    proc = docker_cli("run", "--rm", "--label", docker_ready.label, "--entrypoint", "sh",
                      docker_ready.sim_image, "-c",
                      "find / -xdev -name '*.whl' -print; python3 -c 'import vllm_sim, uvloop, httptools'",
                      timeout=60.0, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"wheel files in the image: {proc.stdout}"


def test_gateway_image_serves_a_mounted_registry(docker_ready: DockerSession, gateway_image: str,
                                                 tmp_path: Path) -> None:
    port = free_port()
    registry = tmp_path / "models.toml"
    registry.write_text('[models.remote]\nurl = "http://192.0.2.1:8000"\nserved_model_name = "tiny"\n')
    registry.chmod(0o644)
    config = _inspect(gateway_image)
    assert config["Entrypoint"] == ["python3", "-m", "gateway"]
    env = dict(str(e).split("=", 1) for e in list(config.get("Env") or []))  # type: ignore[arg-type]
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert env["FLEET_REGISTRY"] == "/etc/vllm-fleet/models.toml"

    name = _run_detached(
        docker_ready, "gateway",
        "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{registry}:/etc/vllm-fleet/models.toml:ro",
        gateway_image,
    )
    response = wait_http_ok(f"http://127.0.0.1:{port}/health", deadline=30.0,
                            give_up=lambda: container_exited(name))
    assert response.json().get("status") == "ok", response.text
    # The dashboard's files are in the image. Through Docker's network the page is refused
    # (GATEWAY_UI=loopback, the default); inside the container, on loopback, it is served.
    refused = httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=5.0)
    assert refused.status_code == 403 and "GATEWAY_UI=on" in refused.text, refused.text
    script = docker_cli("exec", name, "curl", "-fsS",
                        "http://127.0.0.1:8000/ui/static/dashboard.js", timeout=15.0).stdout
    assert "sessionStorage" in script
