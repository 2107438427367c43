"""Fixtures for the docker tier: a daemon that answers, the simulator image, labels, cleanup.

Only fleet/engine.py imports the Docker SDK; these fixtures drive Debian's `/usr/bin/docker`
CLI (override with DOCKER=...) through subprocess, every call with a timeout.

- `docker_ready` (session): fails (never skips) when the daemon does not answer; runs
  `scripts/build-images.sh sim` (cached: about a second when the image is current, a few
  seconds after a source change) so the tests always run the working tree's simulator;
  gives a `DockerSession` whose `run_id` labels everything the session creates; at session
  end removes every container, network and volume labelled `io.vllm-fleet.test=<run_id>`.
- `gateway_image` (session): the same for `vllm-fleet/gateway:dev`.
- helpers: `docker_cli(*args, timeout=60.0, check=True)`, `wait_http_ok(url, deadline, ...)`,
  `wait_container_healthy(container, deadline)`, `container_state(container)`,
  `container_logs(container)`, `container_exited(container)`, `remove_labelled(label)`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-images.sh"
INSTALL_SCRIPT = "scripts/install-docker.sh"
SIM_IMAGE = "vllm-fleet/sim:dev"
GATEWAY_IMAGE = "vllm-fleet/gateway:dev"
TEST_LABEL = "io.vllm-fleet.test"
IMAGE_BUILD_TIMEOUT = 900.0


def docker_binary() -> str:
    """The Docker client the tests use: Debian's 20.10 client unless DOCKER says otherwise."""
    return os.environ.get("DOCKER", "/usr/bin/docker")


def docker_cli(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `docker ARGS...`, capturing text output; raise with its stderr when `check` fails."""
    cmd = [docker_binary(), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class DockerSession:
    """What a docker-tier test needs: the run id to label its objects with, and the images."""

    run_id: str
    sim_image: str = SIM_IMAGE

    @property
    def label(self) -> str:
        """`io.vllm-fleet.test=<run_id>`, for `docker run --label` and `--filter label=`."""
        return f"{TEST_LABEL}={self.run_id}"

    @property
    def labels(self) -> dict[str, str]:
        """The same as a mapping (for the SDK or compose files)."""
        return {TEST_LABEL: self.run_id}

    def name(self, suffix: str) -> str:
        """A container/network name unique to this session: `vft-<run_id>-<suffix>`."""
        return f"vft-{self.run_id}-{suffix}"


def _daemon_answers() -> str | None:
    """None when the daemon answers, else why not."""
    try:
        proc = docker_cli("version", "--format", "{{.Server.Version}}", timeout=15.0, check=False)
    except (OSError, RuntimeError) as exc:
        return str(exc)
    if proc.returncode != 0:
        return proc.stderr.strip() or f"exit {proc.returncode}"
    return None


def _build_image(target: str) -> None:
    """Run `scripts/build-images.sh TARGET` (cached); fail the session with its output if it fails."""
    try:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), target], capture_output=True, text=True,
                              timeout=IMAGE_BUILD_TIMEOUT, check=False, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/build-images.sh {target} did not finish within "
                    f"{IMAGE_BUILD_TIMEOUT:.0f}s", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"`bash scripts/build-images.sh {target}` failed (exit {proc.returncode}); run "
                    f"it by hand to see why. Its stderr ends with:\n{proc.stderr[-3000:]}",
                    pytrace=False)


def remove_labelled(label: str) -> list[str]:
    """Force-remove every container, then network, then volume carrying `label` (key=value).

    Returns the problems met (empty when everything went)."""
    problems: list[str] = []
    kinds = (
        (("ps", "-aq"), ("rm", "-f", "-v")),
        (("network", "ls", "-q"), ("network", "rm")),
        (("volume", "ls", "-q"), ("volume", "rm", "-f")),
    )
    for list_args, remove_args in kinds:
        try:
            ids = docker_cli(*list_args, "--filter", f"label={label}", timeout=30.0).stdout.split()
            if ids:
                docker_cli(*remove_args, *ids, timeout=120.0)
        except RuntimeError as exc:
            problems.append(str(exc))
    return problems


@pytest.fixture(scope="session")
def docker_ready() -> Iterator[DockerSession]:
    """A daemon that answers, a current simulator image, and cleanup of this session's objects."""
    why = _daemon_answers()
    if why is not None:
        pytest.fail(f"the Docker daemon does not answer through {docker_binary()} ({why}); "
                    f"start it with: bash {INSTALL_SCRIPT}", pytrace=False)
    _build_image("sim")
    session = DockerSession(run_id=f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}")
    try:
        yield session
    finally:
        problems = remove_labelled(session.label)
        if problems:
            raise RuntimeError(f"cleanup of {session.label} failed: " + "; ".join(problems))


@pytest.fixture(scope="session")
def gateway_image(docker_ready: DockerSession) -> str:
    """`vllm-fleet/gateway:dev`, built (cached) from the working tree."""
    _build_image("gateway")
    return GATEWAY_IMAGE


def wait_http_ok(url: str, deadline: float, *, interval: float = 0.2,
                 give_up: Callable[[], str | None] | None = None) -> httpx.Response:
    """Poll GET `url` until it answers 200; return that response.

    `deadline` is the number of seconds to keep trying. `give_up`, called between tries,
    returns a reason to stop early (e.g. the container exited). Raises TimeoutError (with
    the last status or error) or RuntimeError (with give_up's reason)."""
    end = time.monotonic() + deadline
    last = "no attempt"
    with httpx.Client(timeout=httpx.Timeout(2.0)) as client:
        while True:
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return response
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if give_up is not None and (reason := give_up()) is not None:
                raise RuntimeError(f"gave up waiting for {url}: {reason} (last: {last})")
            if time.monotonic() >= end:
                raise TimeoutError(f"{url} did not answer 200 within {deadline:.0f}s (last: {last})")
            time.sleep(interval)


def container_state(container: str) -> dict[str, object]:
    """`docker inspect`'s State of `container`."""
    out = docker_cli("inspect", "--format", "{{json .State}}", container, timeout=15.0).stdout
    return dict(json.loads(out))


def container_logs(container: str, tail: int = 60) -> str:
    """The last `tail` lines of the container's stdout and stderr (for failure messages)."""
    proc = docker_cli("logs", "--tail", str(tail), container, timeout=15.0, check=False)
    return (proc.stdout + proc.stderr).strip()


def container_exited(container: str) -> str | None:
    """A `give_up` for wait_http_ok: why the container is no longer running, or None."""
    state = container_state(container)
    if state.get("Status") in ("exited", "dead"):
        return (f"container {container} {state.get('Status')} with code {state.get('ExitCode')}; "
                f"logs:\n{container_logs(container)}")
    return None


def wait_container_healthy(container: str, deadline: float, *, interval: float = 0.2) -> None:
    """Poll the container's Docker health status until `healthy` (it must have a health check).

    Raises TimeoutError or RuntimeError (exited / unhealthy) with the container's logs."""
    end = time.monotonic() + deadline
    status = "unknown"
    while True:
        state = container_state(container)
        if (why := container_exited(container)) is not None:
            raise RuntimeError(why)
        health = state.get("Health")
        if not isinstance(health, dict):
            raise RuntimeError(f"container {container} has no health check")
        status = str(health.get("Status"))
        if status == "healthy":
            return
        if status == "unhealthy":
            raise RuntimeError(f"container {container} is unhealthy; logs:\n{container_logs(container)}")
        if time.monotonic() >= end:
            raise TimeoutError(f"container {container} not healthy within {deadline:.0f}s (status "
                               f"{status}); logs:\n{container_logs(container)}")
        time.sleep(interval)
