"""Shared parts of the Docker benchmarks: a scoped fleet, its registries, cleanup.

Every container a benchmark creates carries `io.vllm-fleet.bench=<run id>` (through
FLEET_EXTRA_LABELS, or `--label` for one-off containers) and a per-run name prefix
(FLEET_NAME_PREFIX); `Fleet.cleanup` removes them all, whatever happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
BENCH_LABEL = "io.vllm-fleet.bench"
SIM_IMAGE = "vllm-fleet/sim:dev"
VLLM_IMAGE = "vllm-fleet/vllm-cpu:0.32.0"


def docker_binary() -> str:
    """Debian's engine client (/usr/bin/docker) when present, else the one on PATH."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


def docker(*args: str, timeout: float = 120.0, check: bool = True) -> str:
    proc = subprocess.run([docker_binary(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


def image_exists(image: str) -> bool:
    return bool(docker("images", "-q", image, check=False).strip())


def sim_registry(ports: list[int], *, sleep_mode: bool) -> str:
    """Two simulator models that cannot be awake together ([host] cpus = 1, each needs 1)."""
    models = "".join(f"""
[models.sim-{chr(97 + i)}]
source = "sim/{chr(97 + i)}"
port = {port}
sleep_mode = {str(sleep_mode).lower()}
""" for i, port in enumerate(ports))
    return f"""
[host]
cpus = 1
gateway_cpus = 0

[defaults]
image = "{SIM_IMAGE}"
hf_cache = ""
ipc_host = false
shm_size = "64m"
health_timeout = 60
cpus = 1
{models}"""


def vllm_registry(ports: list[int], models: list[str], *, sleep_mode: bool,
                  models_dir: Path, host_cpus: int = 1) -> str:
    """Real vLLM CPU models from `models_dir` (made by scripts/make_tiny_models.py); with
    `host_cpus = 1` two of them cannot be awake together."""
    blocks = "".join(f"""
[models.{name}]
source = "./{name}"
port = {port}
max_model_len = 2048
sleep_mode = {str(sleep_mode).lower()}
""" for name, port in zip(models, ports, strict=True))
    return f"""
[host]
cpus = {host_cpus}
gateway_cpus = 0

[defaults]
image = "{VLLM_IMAGE}"
host_ip = "127.0.0.1"
models_dir = "{models_dir}"
hf_cache = ""
gpu_memory_utilization = 0.1
ipc_host = false
shm_size = "1g"
health_timeout = 300
cpus = 1
args = ["--dtype", "float32", "--enforce-eager"]
env = {{ HF_HUB_OFFLINE = "1" }}
{blocks}"""


@dataclass
class Fleet:
    """`python -m fleet` scoped to one benchmark run (registry, labels, prefix, lock)."""

    workdir: Path
    registry_text: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        self.registry = self.workdir / "models.bench.toml"
        self.registry.write_text(self.registry_text)
        self.label = f"{BENCH_LABEL}={self.run_id}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "FLEET_REGISTRY": str(self.registry),
            "FLEET_NAME_PREFIX": f"bench-{self.run_id}",
            "FLEET_EXTRA_LABELS": self.label,
            "FLEET_LOCK_FILE": str(self.workdir / "fleet.lock"),
            "FLEET_STOP_TIMEOUT": "10",
        }

    def run(self, *args: str, timeout: float = 600.0) -> tuple[float, dict[str, Any] | None]:
        """Run `fleet ARGS --json`; (wall seconds, its JSON report or None)."""
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "fleet", *args, "--json"],
                              capture_output=True, text=True, timeout=timeout, env=self.env,
                              cwd=REPO, check=False)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"fleet {' '.join(args)} exited {proc.returncode}:\n"
                               f"{proc.stderr[-3000:]}")
        try:
            return wall, json.loads(proc.stdout)
        except json.JSONDecodeError:
            return wall, None

    def containers(self) -> list[str]:
        return docker("ps", "-a", "--filter", f"label={self.label}",
                      "--format", "{{.Names}}").split()

    def cleanup(self) -> None:
        """`fleet down`, then remove anything still carrying this run's label."""
        try:
            self.run("down", timeout=180)
        except Exception as exc:  # noqa: BLE001 - the label sweep below still runs
            print(f"# fleet down failed: {exc}", file=sys.stderr)
        ids = docker("ps", "-aq", "--filter", f"label={self.label}", check=False).split()
        if ids:
            docker("rm", "-f", *ids, check=False)


def first_token_seconds(base_url: str, model: str, *, max_tokens: int = 8,
                        timeout: float = 120.0) -> float:
    """Seconds from sending a streamed chat request to its first content token."""
    body = {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Hello there"}]}
    t0 = time.monotonic()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{base_url}: HTTP {resp.status_code}: {resp.read()[:500]!r}")
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line \
                    and '"content":""' not in line:
                return time.monotonic() - t0
    raise RuntimeError(f"{base_url}: the stream ended without a content token")


def container_pids(name_filter: str) -> list[int]:
    """Host PIDs of the main processes of the running containers matching a label filter."""
    ids = docker("ps", "-q", "--filter", name_filter, check=False).split()
    pids = []
    for cid in ids:
        out = docker("inspect", "-f", "{{.State.Pid}}", cid, check=False).strip()
        if out.isdigit() and int(out) > 0:
            pids.append(int(out))
    return pids
