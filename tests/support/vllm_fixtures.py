"""Fixtures for the vllm tier: real vLLM 0.32.0 CPU containers serving the tiny local models.

Everything comes from the CPU registry `models.cpu.toml`: a model's container runs exactly the
command, environment, mounts and shared memory that `fleet.spec.container_spec` derives for
it (so these tests also prove that the registry and the spec start a real vLLM), pinned to
the core `fleet.placement.assign_cpusets` gives it. Only the test's own bits differ: the name
`vft-<run_id>-<model>`, the label `io.vllm-fleet.test=<run_id>` (never the managed label, so
a fleet under test does not adopt it) and a free host port on 127.0.0.1.

Fixtures:
- `vllm_ready` (session): checks the daemon, then runs `bash scripts/build-vllm-image.sh` and
  `python3 scripts/make_tiny_models.py` (both cached: under a second when up to date; a cold
  build takes a few minutes). Fails, never skips, with the command to run by hand. Gives a
  `VllmEnv` (run id, label, registry) and removes every container labelled with its run id at
  session end.
- `vllm_launcher` (session): starts containers on demand with `launcher.server(name)` and keeps
  them for the session. At the first request it starts, all at once, every model that the
  collected tests use through `vllm_tiny_a` / `vllm_tiny_b` (about 40 s to healthy in
  parallel on 2 cores, instead of one after the other).
- `vllm_tiny_a`, `vllm_tiny_b` (session): a `VllmServer` (base_url, model, max_model_len, ...)
  of tiny-a (fast, for contract and chat tests) and tiny-b (about 10 ms per token, streams
  token by token; sleep mode on).

Only fleet/engine.py imports the Docker SDK: this drives `/usr/bin/docker` (or $DOCKER)
through `support.docker_fixtures.docker_cli`, every call with a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.placement import assign_cpusets
from fleet.registry import Registry, load_registry
from fleet.spec import ContainerSpec, container_spec, resolve_host_path
from support.docker_fixtures import (
    TEST_LABEL,
    container_exited,
    container_logs,
    docker_binary,
    docker_cli,
    remove_labelled,
    wait_http_ok,
)
from support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_REGISTRY = REPO_ROOT / "models.cpu.toml"
VLLM_IMAGE = "vllm-fleet/vllm-cpu:0.32.0"
BUILD_IMAGE_CMD = "bash scripts/build-vllm-image.sh"
MAKE_MODELS_CMD = "python3 scripts/make_tiny_models.py"
HEALTH_DEADLINE = float(os.environ.get("VLLM_HEALTH_DEADLINE", "180"))
BUILD_TIMEOUT = 1800.0
# Fixture name -> registry model it serves (used to start every needed model at once).
MODEL_FIXTURES = {"vllm_tiny_a": "tiny-a", "vllm_tiny_b": "tiny-b"}
_NEEDED = pytest.StashKey[set[str]]()
_MEASURED = pytest.StashKey[dict[str, float]]()


@dataclass(frozen=True)
class VllmServer:
    """One running real vLLM container."""

    model: str  # the registry name, also vLLM's first served name
    served_names: tuple[str, ...]
    base_url: str  # http://127.0.0.1:<host port>
    max_model_len: int
    container: str
    cpuset: str | None
    startup_s: float  # from `docker run` to the first /health 200

    def url(self, path: str) -> str:
        return self.base_url + path

    def logs(self, tail: int = 60) -> str:
        return container_logs(self.container, tail)


@dataclass(frozen=True)
class VllmEnv:
    """What the vllm tier shares: the run id its containers carry, and the CPU registry."""

    run_id: str
    registry: Registry
    image: str = VLLM_IMAGE

    @property
    def label(self) -> str:
        return f"{TEST_LABEL}={self.run_id}"

    def name(self, suffix: str) -> str:
        return f"vft-{self.run_id}-{suffix}"


# ---------------------------------------------------------------------------------------------
# Prerequisites


def _run_script(cmd: list[str], how: str) -> None:
    """Run a cached build script; fail the session with its output tail when it fails."""
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{how}` did not finish within {BUILD_TIMEOUT:.0f}s; run it by hand",
                    pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"`{how}` failed (exit {proc.returncode}); run it by hand to see why. "
                    f"Its output ends with:\n{(proc.stdout + proc.stderr)[-3000:]}",
                    pytrace=False)


def ensure_vllm_prerequisites() -> None:
    """The daemon answers, the image and the models exist (the scripts are run, cached)."""
    try:
        proc = docker_cli("version", "--format", "{{.Server.Version}}", timeout=15.0, check=False)
        why = None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")
    except (OSError, RuntimeError) as exc:
        why = str(exc)
    if why is not None:
        pytest.fail(f"the Docker daemon does not answer through {docker_binary()} ({why}); "
                    f"start it with: bash scripts/install-docker.sh", pytrace=False)
    _run_script(["bash", "scripts/build-vllm-image.sh"], BUILD_IMAGE_CMD)
    _run_script([sys.executable, "scripts/make_tiny_models.py"], MAKE_MODELS_CMD)


# ---------------------------------------------------------------------------------------------
# Containers


def session_container_spec(env: VllmEnv, name: str, cpuset: str | None) -> ContainerSpec:
    """Registry model `name`'s container spec as the fleet derives it, named for this session."""
    return container_spec(env.registry, name, cpuset=cpuset, name_prefix=f"vft-{env.run_id}")


def docker_run_args(env: VllmEnv, spec: ContainerSpec, host_port: int) -> list[str]:
    """`docker run` arguments for `spec` as the fleet would run it, labelled for the test.

    The container keeps its registry port inside; the host side is `127.0.0.1:host_port`."""
    base_dir = str(Path(env.registry.source).resolve().parent)
    args = ["run", "-d", "--name", spec.name, "--label", env.label,
            "--label", f"io.vllm-fleet.test-model={spec.model}",
            "-p", f"127.0.0.1:{host_port}:{spec.port}"]
    if spec.ipc_mode:
        args += ["--ipc", spec.ipc_mode]
    if spec.shm_size:
        args += ["--shm-size", spec.shm_size]
    if spec.cpuset_cpus:
        args += ["--cpuset-cpus", spec.cpuset_cpus]
    for key, value in spec.environment.items():
        args += ["-e", f"{key}={value}"]
    for host, bind in spec.volumes.items():
        args += ["-v", f"{resolve_host_path(host, os.environ, base_dir)}:{bind['bind']}:{bind['mode']}"]
    return [*args, spec.image, *spec.command]


@dataclass
class _Pending:
    container: str
    host_port: int
    cpuset: str | None
    t0: float


@dataclass
class VllmLauncher:
    """Starts registry models as test containers and keeps them for the session."""

    env: VllmEnv
    prestart: set[str] = field(default_factory=set)
    # What the tier measured (seconds), printed at the end of the session; tests may add.
    measured: dict[str, float] = field(default_factory=dict)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _servers: dict[str, VllmServer] = field(default_factory=dict)

    def server(self, name: str, deadline: float = HEALTH_DEADLINE) -> VllmServer:
        """The healthy server of model `name` (started now if needed, with every prestart one)."""
        if name in self._servers:
            return self._servers[name]
        for other in sorted({name, *self.prestart}):
            if other not in self._servers and other not in self._pending:
                self._start(other)
        return self._wait(name, deadline)

    def stop(self, name: str) -> None:
        """Remove model `name`'s container (a later `server(name)` starts a new one)."""
        server = self._servers.pop(name, None)
        pending = self._pending.pop(name, None)
        container = server.container if server else pending.container if pending else None
        if container is not None:
            docker_cli("rm", "-f", container, timeout=60.0, check=False)

    def _start(self, name: str) -> None:
        cpuset = assign_cpusets(self.env.registry, self.env.registry.names()).get(name)
        spec = session_container_spec(self.env, name, cpuset)
        port = free_port()
        docker_cli("rm", "-f", spec.name, timeout=60.0, check=False)
        t0 = time.monotonic()
        docker_cli(*docker_run_args(self.env, spec, port), timeout=60.0)
        self._pending[name] = _Pending(spec.name, port, cpuset, t0)

    def _wait(self, name: str, deadline: float) -> VllmServer:
        pending = self._pending[name]
        base_url = f"http://127.0.0.1:{pending.host_port}"
        failure: str | None = None
        try:
            wait_http_ok(base_url + "/health", deadline, interval=0.25,
                         give_up=lambda: container_exited(pending.container))
        except TimeoutError as exc:
            failure = f"{exc}\nlogs:\n{container_logs(pending.container)}"
        except RuntimeError as exc:  # the container exited; the message holds its logs
            failure = str(exc)
        if failure is not None:
            if "Sleep mode is not supported" in failure:
                failure += ("\n\nvLLM's CPU backend refuses --enable-sleep-mode; for a model "
                            "without GPUs the fleet must set only VLLM_SERVER_DEV_MODE=1 "
                            "(the /sleep, /wake_up and /is_sleeping endpoints answer with it).")
            pytest.fail(f"real vLLM for {name!r} did not become healthy: {failure}",
                        pytrace=False)
        startup = time.monotonic() - pending.t0
        model = self.env.registry.models[name]
        assert model.max_model_len is not None, f"{CPU_REGISTRY.name}: set max_model_len of {name}"
        server = VllmServer(model=name, served_names=model.served_names, base_url=base_url,
                            max_model_len=model.max_model_len, container=pending.container,
                            cpuset=pending.cpuset, startup_s=startup)
        del self._pending[name]
        self._servers[name] = server
        self.measured[f"{name}: docker run to /health 200"] = startup
        return server


# ---------------------------------------------------------------------------------------------
# Pytest hooks and fixtures


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needed = {MODEL_FIXTURES[f] for item in items
              for f in getattr(item, "fixturenames", ()) if f in MODEL_FIXTURES}
    config.stash[_NEEDED] = needed


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    measured = config.stash.get(_MEASURED, {})
    if measured:
        terminalreporter.section("vllm tier measurements")
        for what, seconds in sorted(measured.items()):
            terminalreporter.write_line(f"{what}: {seconds:.3f} s")


@pytest.fixture(scope="session")
def vllm_ready() -> Iterator[VllmEnv]:
    """Image and models present (built if missing); this session's containers removed at end."""
    ensure_vllm_prerequisites()
    env = VllmEnv(run_id=f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}",
                  registry=load_registry(CPU_REGISTRY))
    try:
        yield env
    finally:
        problems = remove_labelled(env.label)
        if problems:
            raise RuntimeError(f"cleanup of {env.label} failed: " + "; ".join(problems))


@pytest.fixture(scope="session")
def vllm_launcher(vllm_ready: VllmEnv, pytestconfig: pytest.Config) -> VllmLauncher:
    launcher = VllmLauncher(env=vllm_ready, prestart=set(pytestconfig.stash.get(_NEEDED, set())))
    pytestconfig.stash[_MEASURED] = launcher.measured
    return launcher


@pytest.fixture(scope="session")
def vllm_tiny_a(vllm_launcher: VllmLauncher) -> VllmServer:
    """Real vLLM serving tiny-a (aliases tiny, gpt-4o-mini), healthy."""
    return vllm_launcher.server("tiny-a")


@pytest.fixture(scope="session")
def vllm_tiny_b(vllm_launcher: VllmLauncher) -> VllmServer:
    """Real vLLM serving tiny-b (alias tiny-stream; sleep endpoints on), healthy."""
    return vllm_launcher.server("tiny-b")
