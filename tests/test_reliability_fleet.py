"""Docker faults met by the `fleet` CLI, against the real daemon with the simulator image.

Each fault must give a clear error, exit 1, the fleet's state stated, and a way to recover
that works:

- the daemon goes away in the middle of `fleet status` (it answered the version call, then
  the socket vanished) and hangs in the middle of it (never answers the container listing);
- the daemon goes away in the middle of `fleet switch`, while the target model loads: after
  the daemon comes back, `fleet status` shows where the fleet stands and `fleet switch`
  finishes (or goes back);
- a container killed while loading: by the kernel's OOM killer (a real one: the container's
  memory limit is lowered below what the model's load needs) and by a plain SIGKILL
  (`docker kill`): the message says which (Docker's OOMKilled), with the exit code;
- an image missing during `fleet switch`: the evicted model is stated, the way back works.

The real dockerd is shared with other work and is never stopped: the daemon "goes away" by
cutting a Unix-socket proxy (`support.fleet_faults.DockerSocketProxy`) the CLI talks to
through DOCKER_HOST. Covered in tests/test_fleet_docker.py and not repeated here: a daemon
unreachable before `fleet status` (refused connection), a model exiting while it loads
(VLLM_SIM_FAIL_AT_START), a host port already taken, a foreign container holding the name,
concurrent switches from two processes (the budget checked at every sample).

Budget: `[host] cpus = 1` and `cpus = 1` per model: two models cannot be awake together.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.docker_fixtures import DockerSession, container_logs, container_state, docker_cli
from support.fleet_faults import DockerSocketProxy, FleetRunner
from support.ports import free_ports
from support.registries import SIM_FLEET

pytestmark = pytest.mark.docker

LOAD_SECONDS = 8  # the slow model's simulated load: long enough to act on it while it loads
OOM_LIMIT = "16m"  # the simulator holds about 12 MiB while loading and needs about 20 to serve

REGISTRY = SIM_FLEET + """
[models.sim-slow]
source = "sim/slow"
port = {port_b}
autostart = false
image = "{image_slow}"
pull = "never"  # a missing image is refused, not pulled (no registry serves it)
env = {{ VLLM_SIM_LOAD_SECONDS = "{load}" }}
"""


def wait_until(probe: Callable[[], object], deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not probe():
        if time.monotonic() >= end:
            raise AssertionError(f"not within {deadline_s:g}s: {what}")
        time.sleep(0.05)


def running(container: str) -> bool:
    r = docker_cli("inspect", "--format", "{{.State.Status}}", container, check=False)
    return r.stdout.strip() == "running"


@pytest.fixture
def proxy() -> Iterator[DockerSocketProxy]:
    # A short directory of its own: a Unix socket path must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="vft-") as d, DockerSocketProxy(Path(d)) as p:
        yield p


@pytest.fixture
def make_fleet(docker_ready: DockerSession, tmp_path: Path) -> Iterator[Callable[..., FleetRunner]]:
    made: list[FleetRunner] = []

    def make(*, docker_host: str | None = None, image_slow: str | None = None,
             load: float = LOAD_SECONDS) -> FleetRunner:
        pa, pb = free_ports(2)
        text = REGISTRY.format(image=docker_ready.sim_image, port_a=pa, port_b=pb, load=load,
                               image_slow=image_slow or docker_ready.sim_image)
        where = tmp_path / f"fleet{len(made)}"
        where.mkdir()
        run = FleetRunner(docker_ready, where, text, docker_host=docker_host)
        made.append(run)
        return run

    yield make
    for run in made:  # straight to the daemon: the proxy may be cut
        r = run("down", DOCKER_HOST="")
        assert r.returncode == 0, r.stderr
        assert run.containers() == []


# -- the daemon goes away ---------------------------------------------------------------------
def test_status_when_the_daemon_vanishes_or_hangs_mid_command(
        make_fleet: Callable[..., FleetRunner], proxy: DockerSocketProxy) -> None:
    fleet = make_fleet(docker_host=proxy.url)
    proxy.cut_on(b"/containers/json")  # /version is answered, the listing is not
    r = fleet("status")
    assert proxy.cut_event.is_set() and any("/version" in x for x in proxy.requests)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    assert r.stderr.startswith(f"fleet: cannot reach the Docker daemon at {proxy.url} ("), r.stderr
    assert "is dockerd running? start it with" in r.stderr
    assert "point --docker-host / DOCKER_HOST at a running daemon" in r.stderr
    assert "Traceback" not in r.stderr

    proxy.restore()
    assert set(fleet.states().values()) == {"absent"}  # it answers again: status works

    proxy.hang_on(b"/containers/json")  # the daemon accepts and never answers
    t0 = time.monotonic()
    r = fleet("status", FLEET_DOCKER_TIMEOUT="2")
    waited = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (
        f"fleet: the Docker daemon at {proxy.url} did not answer list containers within 2s; "
        f"it may be overloaded (check `docker info`) or hung"), r.stderr
    assert waited < 15, f"a hung daemon held `fleet status` for {waited:.1f}s"


def test_daemon_lost_mid_switch_is_stated_and_recoverable(
        make_fleet: Callable[..., FleetRunner], proxy: DockerSocketProxy) -> None:
    fleet = make_fleet(docker_host=proxy.url)
    fleet.ok("up")
    slow = fleet.container("sim-slow")
    switch = fleet.popen("switch", "sim-slow")
    try:
        # Once the target's container runs (it loads for LOAD_SECONDS), the fleet's next
        # container listing (its health wait) finds the daemon gone.
        wait_until(lambda: running(slow), 30, f"{slow} running")
        proxy.cut_on(b"/containers/json")
        out, err = switch.communicate(timeout=60)
    finally:
        if switch.poll() is None:
            switch.kill()
            switch.communicate()
    print(f"\nfleet switch, daemon lost while sim-slow loads:\n{err}")
    assert proxy.cut_event.is_set()
    assert switch.returncode == 1, err
    assert out == ""
    assert "Traceback" not in err
    assert f"fleet: switch sim-slow interrupted: cannot reach the Docker daemon at {proxy.url}" \
        in err, err
    assert "is dockerd running?" in err
    assert "done before that: sim-a sleep (" in err and "; sim-slow create" in err, err
    assert "fleet state now: unknown while the Docker daemon does not answer" in err, err
    assert ("to recover: when the cause above is fixed (the Docker daemon answers "
            "`docker info`), `fleet status` shows where the fleet stands; then run "
            "`fleet switch sim-slow` again; or `fleet switch sim-a` to go back") in err, err
    assert "healthy after" not in err

    proxy.restore()
    states = fleet.states()  # the daemon is back: the state is known again
    assert states["sim-a"] == "sleeping" and states["sim-slow"] in ("loading", "healthy"), states
    r = fleet.ok("switch", "sim-slow")  # finishes what was interrupted
    assert "awake: sim-slow" in r.stdout
    assert fleet.states() == {"sim-a": "sleeping", "sim-slow": "healthy"}
    r = fleet.ok("switch", "sim-a")  # and the stated way back works
    assert "awake: sim-a" in r.stdout
    assert fleet.states() == {"sim-a": "healthy", "sim-slow": "stopped"}


# -- a container killed while loading ---------------------------------------------------------
@pytest.mark.parametrize("killer", ["oom", "sigkill"])
def test_a_container_killed_while_loading_says_how_and_the_way_back(
        make_fleet: Callable[..., FleetRunner], killer: str) -> None:
    fleet = make_fleet(load=3 if killer == "oom" else LOAD_SECONDS)
    fleet.ok("up")
    slow = fleet.container("sim-slow")
    switch = fleet.popen("switch", "sim-slow")
    try:
        wait_until(lambda: "Starting to load model" in container_logs(slow, 5), 30,
                   f"{slow} loading")
        if killer == "oom":
            # A real OOM kill: the container may now use less than the model's load needs
            # (the fleet's spec sets no memory limit, so the test lowers it while it loads).
            docker_cli("update", "--memory", OOM_LIMIT, "--memory-swap", OOM_LIMIT, slow)
        else:
            docker_cli("kill", "--signal", "KILL", slow)
        _, err = switch.communicate(timeout=60)
    finally:
        if switch.poll() is None:
            switch.kill()
            switch.communicate()
    print(f"\nfleet switch, sim-slow killed while loading ({killer}):\n{err}")
    state = container_state(slow)
    assert state["Status"] == "exited" and state["ExitCode"] == 137, state
    assert state["OOMKilled"] is (killer == "oom"), (
        f"expected OOMKilled={killer == 'oom'}; with {OOM_LIMIT} the simulator should be "
        f"OOM-killed once its load ends (remeasure its memory if it changed): {state}")
    assert switch.returncode == 1, err
    assert "Traceback" not in err
    if killer == "oom":
        assert ("model 'sim-slow' failed to start: its container was killed by the kernel's "
                "out-of-memory killer (exit code 137, Docker: OOMKilled) before becoming "
                "healthy: it needs more memory than it may use") in err, err
    else:
        assert ("model 'sim-slow' failed to start: its container exited (exit code 137: "
                "killed by SIGKILL, not by the OOM killer) before becoming healthy") in err, err
    assert f"--- last log lines of {slow} ---" in err and "Starting to load model" in err, err
    assert "fleet state now: sim-a sleeping, sim-slow stopped; awake: none" in err, err
    assert "`fleet switch sim-a` to go back" in err
    detail = fleet.status()["sim-slow"]["detail"]
    assert detail == ("container exited (exit code 137, OOM-killed)" if killer == "oom"
                      else "container exited (exit code 137: SIGKILL)"), detail
    fleet.ok("switch", "sim-a")
    assert fleet.states() == {"sim-a": "healthy", "sim-slow": "stopped"}


# -- an image missing during a switch ---------------------------------------------------------
def test_image_missing_is_found_before_the_switch_evicts_anything(
        make_fleet: Callable[..., FleetRunner], docker_ready: DockerSession) -> None:
    missing = f"vllm-fleet/missing:{docker_ready.run_id}"
    assert docker_cli("image", "inspect", missing, check=False).returncode != 0
    fleet = make_fleet(image_slow=missing, load=0)
    fleet.ok("up")
    r = fleet("switch", "sim-slow")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert (f"cannot switch to sim-slow: its image {missing} is not on this host (build it "
            f"with scripts/build-images.sh or `docker pull {missing}`); nothing was evicted"
            ) in r.stderr, r.stderr
    assert fleet.containers() == [fleet.container("sim-a")]  # nothing half-made is left
    assert fleet.states() == {"sim-a": "healthy", "sim-slow": "absent"}
