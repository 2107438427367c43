"""The `fleet` CLI pulls a missing image from a real registry and shows each layer; a pull
that fails says so; a load is never silent. Real Docker daemon, Debian's `docker-registry`
(the CNCF distribution registry) served on loopback by the test, the simulator image.

- an image made for this run (the simulator plus one unique layer) is pushed to the local
  registry and removed from the host; `fleet up` pulls it, shows per-layer progress on
  stderr and brings the model up;
- an unknown tag: `fleet up` exits 1 naming the image, the registry's answer and what to do,
  with nothing created;
- a model that loads for 12 s: a line every few seconds on stderr with the time against its
  health_timeout and its latest log line; `--json` keeps stdout the report; `--quiet` hides it.

Everything made is removed: containers (by label), the images, the registry process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from support.docker_fixtures import DockerSession, docker_binary, docker_cli
from support.fleet_faults import FleetRunner

pytestmark = pytest.mark.docker

REGISTRY_START_DEADLINE = 30.0

FLEET = """
[defaults]
image = "{image}"
hf_cache = ""
ipc_host = false
shm_size = "64m"
health_timeout = 60

[models.sim-p]
source = "sim/p"
port = {port}
env = {{ VLLM_SIM_LOAD_SECONDS = "{load}" }}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def local_registry() -> Iterator[str]:
    """Debian's docker-registry serving on 127.0.0.1:PORT from a temporary directory (its
    own config listens on :5000 with htpasswd auth: not used); yields "127.0.0.1:PORT"."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("Debian's docker-registry is not installed: run `bash "
                    "scripts/install-docker.sh` (it installs the package)", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="vft-registry-"))
    port = free_port()
    config = root / "config.yml"
    config.write_text("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    log = (root / "registry.log").open("w")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + REGISTRY_START_DEADLINE
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not serve on 127.0.0.1:{port}: "
                            f"{(root / 'registry.log').read_text()[-2000:]}", pytrace=False)
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pushed_image(local_registry: str, docker_ready: DockerSession) -> Iterator[str]:
    """The simulator plus one layer unique to this run, pushed as
    REGISTRY/vllm-fleet/sim:pulltest-RUN and then removed from the host."""
    image = f"{local_registry}/vllm-fleet/sim:pulltest-{docker_ready.run_id}"
    dockerfile = f"FROM {docker_ready.sim_image}\nRUN echo {docker_ready.run_id} > /pulltest\n"
    try:
        build = subprocess.run([docker_binary(), "build", "-q", "-t", image, "-"],
                               input=dockerfile, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "DOCKER_BUILDKIT": "0"})
        assert build.returncode == 0, build.stderr
        docker_cli("push", image, timeout=300)
        docker_cli("rmi", image, timeout=60)
        assert docker_cli("image", "inspect", image, check=False).returncode != 0
        yield image
    finally:
        docker_cli("rmi", "-f", image, check=False, timeout=60)


@pytest.fixture
def make_fleet(docker_ready: DockerSession, tmp_path: Path) -> Iterator[Callable[..., FleetRunner]]:
    made: list[FleetRunner] = []

    def make(image: str, load: float = 0) -> FleetRunner:
        where = tmp_path / f"fleet{len(made)}"
        where.mkdir()
        run = FleetRunner(docker_ready, where, FLEET.format(image=image, port=free_port(),
                                                            load=load))
        made.append(run)
        return run

    yield make
    for run in made:
        r = run("down")
        assert r.returncode == 0, r.stderr
        assert run.containers() == []


def test_fleet_up_pulls_a_missing_image_with_per_layer_progress(
        pushed_image: str, make_fleet: Callable[..., FleetRunner]) -> None:
    fleet = make_fleet(pushed_image)
    r = fleet("up", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["actions"][0] == {**report["actions"][0], "model": "sim-p", "action": "pull",
                                    "note": pushed_image}
    assert [a["action"] for a in report["actions"][1:]] == ["create"]
    assert set(report["timings"]) == {"pull", "start", "healthy", "total"}
    lines = r.stderr.splitlines()
    assert f"pulling {pushed_image} for sim-p" in lines, r.stderr
    layers = [x for x in lines if x.startswith(f"pull {pushed_image}: layer ")]
    # the run's own layer is downloaded; the simulator's layers are already on the host
    assert any(x.endswith(": Pull complete") for x in layers), r.stderr
    assert any(": Already exists" in x for x in layers), r.stderr
    assert docker_cli("image", "inspect", pushed_image, check=False).returncode == 0
    assert fleet.states() == {"sim-p": "healthy"}
    print(f"\npull + up of {pushed_image}: {report['timings']}\n" + "\n".join(layers))


def test_a_failed_pull_names_the_image_the_registry_answer_and_what_to_do(
        local_registry: str, docker_ready: DockerSession,
        make_fleet: Callable[..., FleetRunner]) -> None:
    unknown = f"{local_registry}/vllm-fleet/sim:no-such-tag-{docker_ready.run_id}"
    fleet = make_fleet(unknown)
    r = fleet("up", timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    message = next(x for x in r.stderr.splitlines() if x.startswith("fleet: "))
    assert message.startswith(f"fleet: cannot bring up sim-p: cannot pull image {unknown}: "
                              f"{local_registry} answered: "), message
    assert "manifest unknown" in message and "check the image name and tag" in message
    assert message.endswith("nothing was started"), message
    print(f"\n{message}")
    assert fleet.containers() == []


def test_a_load_says_how_far_it_is_every_few_seconds(
        docker_ready: DockerSession, make_fleet: Callable[..., FleetRunner]) -> None:
    fleet = make_fleet(docker_ready.sim_image, load=12)
    r = fleet("up", "--json", timeout=180)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["operation"] == "up"      # stdout: the report alone
    watch = [x for x in r.stderr.splitlines() if x.startswith("sim-p: loading, ")]
    assert len(watch) >= 2, r.stderr                       # a line every 5 s of a 12 s load
    assert all(re.match(r"sim-p: loading, \d+s of its 60s health_timeout; last log line: ", x)
               for x in watch), watch
    assert all("Starting to load model sim/p" in x for x in watch), watch
    print("\n" + "\n".join(watch))
    fleet.ok("down")
    r = fleet("up", "--quiet", timeout=180)
    assert r.returncode == 0, r.stderr
    assert "loading" not in r.stderr and "creating" not in r.stderr, r.stderr
