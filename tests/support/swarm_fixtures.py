"""Fixtures for the swarm tier: three Docker-in-docker Swarm nodes and a local registry.

`swarm_cluster` (session) builds the node image (`scripts/build-node-image.sh`, cached),
creates a user network, runs Debian's `docker-registry` in a container on it (published on
the host's loopback for `docker push`; the nodes reach it by its container name and trust it
with `--insecure-registry`), starts three nodes (dockerd inside, without `--privileged`: the
capability set ENVIRONMENT.md lists; `/var/lib/docker` on a volume so overlay2 works), makes
the first the manager (`docker swarm init`) and joins the others, and pushes the simulator
image. Everything carries `io.vllm-fleet.swarm=<run_id>` (and the session's test label) and
is removed at the end: containers with their volumes, then the network.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.docker_fixtures import (
    REPO_ROOT,
    SIM_IMAGE,
    DockerSession,
    docker_cli,
    remove_labelled,
)

NODE_IMAGE = "vllm-fleet/node:dev"
NODE_SCRIPT = REPO_ROOT / "scripts" / "build-node-image.sh"
SWARM_LABEL = "io.vllm-fleet.swarm"
REGISTRY_PORT = 5000
NODE_COUNT = 3
_NODE_FLAGS = ("--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
               "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
               "--device-cgroup-rule", "a *:* rwm", "--tmpfs", "/run", "--tmpfs", "/var/run",
               "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw")


@dataclass
class SwarmCluster:
    """A running test Swarm: node name -> IP, the manager's API, the image to run."""

    run_id: str
    network: str
    nodes: dict[str, str]  # container/host name -> IP on the test network
    registry: str          # host:port as the nodes reach it
    image: str             # the simulator image as the nodes pull it
    labels: tuple[str, ...] = field(default=())

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    @property
    def manager(self) -> str:
        return self.names[0]

    @property
    def manager_url(self) -> str:
        return f"tcp://{self.nodes[self.manager]}:2375"

    def push(self, image: str) -> str:
        """Put the local `image` in the swarm's registry; the name the nodes pull it by."""
        host_port = docker_cli("port", f"vft-{self.run_id}-reg", f"{REGISTRY_PORT}/tcp",
                               timeout=15.0).stdout.split()[0].rsplit(":", 1)[1]
        pushed = f"127.0.0.1:{host_port}/{image}"
        docker_cli("tag", image, pushed)
        try:
            docker_cli("push", pushed, timeout=300.0)
        finally:
            docker_cli("rmi", pushed, check=False)
        return f"{self.registry}/{image}"

    def on_manager(self, *args: str, timeout: float = 60.0,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` run by the manager node's own client."""
        return docker_cli("exec", self.manager, "docker", *args, timeout=timeout, check=check)


def _label_flags(labels: tuple[str, ...]) -> list[str]:
    return [x for label in labels for x in ("--label", label)]


def _wait(what: str, deadline: float, check: Callable[[], bool]) -> None:
    end = time.monotonic() + deadline
    last = ""
    while True:
        try:
            if check():
                return
        except RuntimeError as exc:
            last = str(exc)
        if time.monotonic() >= end:
            raise TimeoutError(f"{what} not within {deadline:.0f}s (last: {last})")
        time.sleep(0.5)


def _ip(container: str, network: str) -> str:
    fmt = "{{(index .NetworkSettings.Networks \"" + network + "\").IPAddress}}"
    return docker_cli("inspect", "-f", fmt, container, timeout=15.0).stdout.strip()


@pytest.fixture(scope="session")
def swarm_cluster(docker_ready: DockerSession,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmCluster]:
    proc = subprocess.run(["bash", str(NODE_SCRIPT)], capture_output=True, text=True,
                          timeout=900, check=False, cwd=REPO_ROOT)
    if proc.returncode != 0:
        pytest.fail(f"bash scripts/build-node-image.sh failed:\n{proc.stderr[-3000:]}",
                    pytrace=False)
    run = docker_ready.run_id
    swarm_label = f"{SWARM_LABEL}={run}"
    labels = (docker_ready.label, swarm_label)
    prefix = f"vft-{run}"
    network = f"{prefix}-swarm"
    tmp = tmp_path_factory.mktemp("swarm")
    try:
        docker_cli("network", "create", *_label_flags(labels), network)
        cfg = Path(tmp) / "registry.yml"
        cfg.write_text("version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
                       f"/var/lib/registry\nhttp:\n  addr: 0.0.0.0:{REGISTRY_PORT}\n")
        reg = f"{prefix}-reg"
        docker_cli("run", "-d", *_label_flags(labels), "--name", reg, "--network", network,
                   "-p", f"127.0.0.1::{REGISTRY_PORT}", "-v", f"{cfg}:/etc/registry.yml:ro",
                   NODE_IMAGE, "docker-registry", "serve", "/etc/registry.yml")
        registry = f"{reg}:{REGISTRY_PORT}"
        nodes: dict[str, str] = {}
        for i in range(1, NODE_COUNT + 1):
            name = f"{prefix}-n{i}"
            docker_cli("run", "-d", *_label_flags(labels), "--name", name, "--hostname", name,
                       *_NODE_FLAGS, "--mount",
                       f"type=volume,dst=/var/lib/docker,volume-label={swarm_label}",
                       "--network", network, NODE_IMAGE,
                       "dockerd", "--host", "unix:///var/run/docker.sock",
                       "--host", "tcp://0.0.0.0:2375", "--storage-driver", "overlay2",
                       "--insecure-registry", registry)
            nodes[name] = _ip(name, network)
        for name in nodes:
            _wait(f"dockerd in {name}", 60, lambda n=name: docker_cli(
                "exec", n, "docker", "info", timeout=15.0, check=False).returncode == 0)
        cluster = SwarmCluster(run, network, nodes, registry,
                               f"{registry}/vllm-fleet/sim:dev", labels)
        cluster.on_manager("swarm", "init", "--advertise-addr", nodes[cluster.manager])
        token = cluster.on_manager("swarm", "join-token", "-q", "worker").stdout.strip()
        for name in cluster.names[1:]:
            docker_cli("exec", name, "docker", "swarm", "join", "--token", token,
                       f"{nodes[cluster.manager]}:2377", timeout=60.0)
        assert cluster.push(SIM_IMAGE) == cluster.image
        yield cluster
    finally:
        problems = remove_labelled(swarm_label)
        if problems:
            raise RuntimeError(f"cleanup of the test swarm failed: {'; '.join(problems)}")
