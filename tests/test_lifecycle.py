"""Fleet lifecycle against a recording fake engine (no Docker, fake clock: no real waiting)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.errors import (
    DockerUnreachable,
    Interrupted,
    NoGpuRuntime,
    PlacementRefused,
    ScaleOutOfRange,
    StartFailed,
    UnknownModel,
)
from fleet.lifecycle import Fleet
from support.fleet_fakes import REPLICA_TOML, FakeWorld, make_fleet, make_registry, spec_hash_of

pytestmark = pytest.mark.unit


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
def fleet(world: FakeWorld, tmp_path: Path) -> Fleet:
    return make_fleet(world, make_registry(), tmp_path)


def states(fleet: Fleet) -> dict[str, str]:
    return {s.name: s.state for s in fleet.status()}


# -- status ------------------------------------------------------------------------------


def test_status_lists_managed_models_absent_with_their_placement(fleet: Fleet) -> None:
    rows = fleet.status()
    assert [r.name for r in rows] == ["a", "b", "c"]  # the remote model is not the fleet's
    a = rows[0]
    assert (a.state, a.port, a.gpus, a.fraction, a.uptime, a.health) == \
        ("absent", 18001, (0,), 0.6, None, "-")
    assert json.loads(json.dumps(a.as_dict()))["gpus"] == [0]


def test_status_classifies_loading_healthy_stopped_sleeping_drifted(fleet: Fleet,
                                                                     world: FakeWorld) -> None:
    ca = world.add_container("a", port=18001, spec_hash=spec_hash_of(fleet, "a"))
    world.add_container("b", port=18002, spec_hash=spec_hash_of(fleet, "b"), state="exited")
    world.add_container("c", port=18003, spec_hash="0123456789abcdef")
    assert states(fleet) == {"a": "healthy", "b": "stopped", "c": "drifted"}
    ca.sleeping = True
    assert states(fleet)["a"] == "sleeping"
    ca.sleeping = False
    ca.started_at = world.clock.now
    world.load_seconds["a"] = 30
    row = fleet.status()[0]
    assert (row.state, row.uptime) == ("loading", 0.0)
    assert "connection refused" in row.detail
    world.clock.sleep(61)  # past its health_timeout of 60 s and still not answering
    world.load_seconds["a"] = 1000
    assert fleet.status()[0].state == "running"
    assert fleet.status()[0].health == "unhealthy"


def test_status_lists_a_managed_container_whose_model_left_the_registry(
        fleet: Fleet, world: FakeWorld) -> None:
    world.add_container("gone", port=18009, spec_hash="x")
    row = {s.name: s for s in fleet.status()}["gone"]
    assert row.state == "drifted" and "not in the registry" in row.detail


def test_extra_labels_scope_what_the_fleet_sees_and_creates(world: FakeWorld,
                                                            tmp_path: Path) -> None:
    fleet = make_fleet(world, make_registry(), tmp_path, extra_labels={"io.vllm-fleet.test": "r1"})
    world.add_container("a", port=18001, spec_hash=spec_hash_of(fleet, "a"))  # not in scope
    assert states(fleet)["a"] == "absent"
    kwargs = fleet.actor.run_kwargs("b")
    assert kwargs["labels"]["io.vllm-fleet.test"] == "r1"
    assert kwargs["labels"]["io.vllm-fleet.spec-hash"] == spec_hash_of(fleet, "b")


def test_hf_token_goes_to_the_container_env_only(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["b"])
    (c,) = world.by_model("b")
    assert c.kwargs["environment"]["HF_TOKEN"] == "hf_secret_value"
    assert "hf_secret_value" not in json.dumps(c.labels)
    assert "hf_secret_value" not in json.dumps([s.as_dict() for s in fleet.status()])


# -- up ------------------------------------------------------------------------------------


def test_up_starts_autostart_models_and_waits_until_healthy(fleet: Fleet,
                                                            world: FakeWorld) -> None:
    world.load_seconds["a"] = 5.0
    t0 = world.clock.now
    report = fleet.up()
    assert world.calls == [("run", "vllm-fleet-a")]  # b and c are not autostart
    assert world.clock.now - t0 >= 5.0  # it waited (on the fake clock) for /health
    assert report.awake == ("a",)
    assert set(report.timings) == {"start", "healthy", "total"}
    assert states(fleet) == {"a": "healthy", "b": "absent", "c": "absent"}


def test_up_adopts_running_containers_and_starts_stopped_ones(fleet: Fleet,
                                                              world: FakeWorld) -> None:
    # e.g. made by `docker compose up` from the rendered file: same labels, other name
    world.add_container("a", port=18001, spec_hash=spec_hash_of(fleet, "a"),
                        name="myproject-vllm-a-1")
    world.add_container("c", port=18003, spec_hash=spec_hash_of(fleet, "c"), state="exited")
    report = fleet.up(["a", "c"])
    assert world.calls == [("start", "vllm-fleet-c")]
    assert [(x.model, x.action) for x in report.actions] == [("a", "none"), ("c", "start")]
    assert "adopted" in report.actions[0].note
    assert states(fleet) == {"a": "healthy", "b": "absent", "c": "healthy"}


def test_up_recreates_a_drifted_container(fleet: Fleet, world: FakeWorld) -> None:
    world.add_container("a", port=18001, spec_hash="0ld0ld0ld0ld0ld0")
    assert states(fleet)["a"] == "drifted"
    report = fleet.up(["a"])
    assert world.calls == [("remove", "vllm-fleet-a"), ("run", "vllm-fleet-a")]
    assert report.actions[0].action == "recreate"
    (c,) = world.by_model("a")
    assert c.labels["io.vllm-fleet.spec-hash"] == spec_hash_of(fleet, "a")
    assert states(fleet)["a"] == "healthy"


def test_up_refuses_models_that_cannot_be_awake_together(fleet: Fleet,
                                                         world: FakeWorld) -> None:
    with pytest.raises(PlacementRefused) as exc:
        fleet.up(["a", "b"])
    assert "gpu-overcommit" in str(exc.value) and "GPU 0" in str(exc.value)
    assert world.calls == []
    fleet.up(["a"])
    with pytest.raises(PlacementRefused, match="fleet switch"):
        fleet.up(["b"])  # a is awake: up never evicts


def test_up_of_a_crashing_model_reports_its_log_lines_and_the_state(fleet: Fleet,
                                                                    world: FakeWorld) -> None:
    world.crash.add("a")
    with pytest.raises(StartFailed) as exc:
        fleet.up(["a", "c"])
    msg = str(exc.value)
    assert "model 'a' failed to start" in msg and "exit code 1" in msg
    assert "RuntimeError: simulated failure at start" in msg
    assert "fleet state now: a stopped, c healthy; awake: c" in msg
    assert "fleet up a" in msg
    assert exc.value.failures[0].container == "vllm-fleet-a"


# -- switch -------------------------------------------------------------------------------


def test_switch_sleeps_a_sleep_mode_model_and_starts_the_target(fleet: Fleet,
                                                                world: FakeWorld) -> None:
    fleet.up(["a"])
    world.calls.clear()
    world.load_seconds["b"] = 3.0
    report = fleet.switch("b")
    assert world.calls == [("sleep", "a"), ("run", "vllm-fleet-b")]
    assert [(x.model, x.action) for x in report.actions] == [("a", "sleep"), ("b", "create")]
    assert list(report.timings) == ["evict", "start", "healthy", "total"]
    assert report.timings["healthy"] >= 3.0
    assert report.awake == ("b",)  # a sleeps: it holds no GPU budget
    assert states(fleet) == {"a": "sleeping", "b": "healthy", "c": "absent"}


def test_switch_back_stops_a_model_without_sleep_mode_and_wakes_the_sleeper(
        fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["a"])
    fleet.switch("b")
    world.calls.clear()
    report = fleet.switch("a")
    assert world.calls == [("stop", "vllm-fleet-b"), ("wake", "a")]
    assert [(x.model, x.action) for x in report.actions] == [("b", "stop"), ("a", "wake")]
    assert states(fleet) == {"a": "healthy", "b": "stopped", "c": "absent"}


def test_switch_to_a_model_that_fits_evicts_nothing(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["a"])
    world.calls.clear()
    fleet.switch("c")
    assert world.calls == [("run", "vllm-fleet-c")]
    assert world.awake_models() == {"a", "c"}


def test_switch_to_an_awake_model_does_nothing(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["a"])
    world.calls.clear()
    report = fleet.switch("a")
    assert world.calls == []
    assert report.actions[0].action == "none"


def test_switch_falls_back_to_stop_when_sleep_fails(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["a"])
    world.sleep_fails.add("a")
    report = fleet.switch("b")
    assert ("stop", "vllm-fleet-a") in world.calls
    assert report.actions[0].action == "stop" and "sleep failed" in report.actions[0].note
    assert world.awake_models() == {"b"}


def test_switch_never_evicts_a_busy_model_without_force(world: FakeWorld,
                                                        tmp_path: Path) -> None:
    busy = {"a"}
    fleet = make_fleet(world, make_registry(), tmp_path, busy=lambda m: m in busy)
    fleet.up(["a"])
    world.calls.clear()
    with pytest.raises(PlacementRefused, match="busy"):
        fleet.switch("b")
    assert world.calls == []
    fleet.switch("b", force=True)
    assert world.awake_models() == {"b"}


def test_failed_switch_reports_logs_state_and_how_to_go_back(fleet: Fleet,
                                                             world: FakeWorld) -> None:
    fleet.up(["a"])
    world.crash.add("b")
    with pytest.raises(StartFailed) as exc:
        fleet.switch("b")
    msg = str(exc.value)
    assert "--- last log lines of vllm-fleet-b ---" in msg
    assert "ERROR EngineCore failed to start" in msg
    assert "fleet state now: a sleeping, b stopped; awake: none" in msg
    assert "`fleet switch b` again" in msg and "`fleet switch a` to go back" in msg
    world.crash.clear()
    fleet.switch("a")  # recoverable: the way back works
    assert world.awake_models() == {"a"}


def test_a_model_that_never_becomes_healthy_fails_at_its_deadline_and_is_stopped(
        fleet: Fleet, world: FakeWorld) -> None:
    world.load_seconds["b"] = 10_000
    t0 = world.clock.now
    with pytest.raises(StartFailed) as exc:
        fleet.switch("b")
    assert 60 <= world.clock.now - t0 < 62  # the registry's health_timeout is 60 s
    assert "health_timeout of 60s" in str(exc.value)
    assert "stopped it" in str(exc.value)
    assert world.running_models() == set()


def test_switch_deadline_caps_the_wait(fleet: Fleet, world: FakeWorld) -> None:
    world.load_seconds["b"] = 10_000
    t0 = world.clock.now
    with pytest.raises(StartFailed, match="the caller's deadline"):
        fleet.switch("b", deadline=world.clock.now + 5)
    assert world.clock.now - t0 < 6


def test_switch_holds_the_lock_while_it_acts(fleet: Fleet, world: FakeWorld) -> None:
    held: list[bool] = []
    real_run = world.engine.run

    def run(kwargs):  # type: ignore[no-untyped-def]
        held.append(fleet.lock.held)
        return real_run(kwargs)

    world.engine.run = run  # type: ignore[method-assign]
    fleet.switch("b")
    assert held == [True]
    assert not fleet.lock.held


def test_switch_to_unknown_or_remote_model_is_a_usage_error(fleet: Fleet) -> None:
    with pytest.raises(UnknownModel, match="managed models: a, b, c") as exc:
        fleet.switch("nope")
    assert exc.value.exit_code == 2
    with pytest.raises(UnknownModel, match="remote model"):
        fleet.switch("remote")


def test_an_engine_refusal_after_evicting_states_the_fleet(fleet: Fleet,
                                                          world: FakeWorld) -> None:
    fleet.up(["a"])
    world.fail_run["b"] = NoGpuRuntime("model 'b' requests GPUs [0] but Docker has no "
                                       "NVIDIA runtime")
    with pytest.raises(StartFailed) as exc:
        fleet.switch("b")
    msg = str(exc.value)
    assert "model 'b' failed to start: model 'b' requests GPUs [0] but Docker has no " \
           "NVIDIA runtime" in msg
    assert "fleet state now: a sleeping; awake: none" in msg
    assert "`fleet switch a` to go back" in msg
    assert isinstance(exc.value.__cause__, NoGpuRuntime)


# -- sleep / wake / down / logs ----------------------------------------------------------


def test_sleep_uses_vllm_sleep_mode_or_stops(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["a", "c"])
    world.calls.clear()
    assert fleet.sleep("a").actions[0].action == "sleep"
    assert fleet.sleep("c").actions[0].action == "stop"
    assert world.calls == [("sleep", "a"), ("stop", "vllm-fleet-c")]
    assert fleet.sleep("a").actions[0].action == "none"  # already sleeping
    assert states(fleet) == {"a": "sleeping", "b": "absent", "c": "stopped"}


def test_wake_never_evicts(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["a"])
    fleet.sleep("a")
    fleet.up(["b"])
    with pytest.raises(PlacementRefused, match="fleet switch a"):
        fleet.wake("a")
    fleet.sleep("b")  # stops b (no sleep_mode)
    world.calls.clear()
    fleet.wake("a")
    assert world.calls == [("wake", "a")]
    fleet.wake("c")  # fits beside a: started
    assert world.awake_models() == {"a", "c"}


def test_down_removes_every_container_in_scope_including_orphans(fleet: Fleet,
                                                                 world: FakeWorld) -> None:
    fleet.up(["a"])
    world.add_container("gone", port=18009, spec_hash="x")
    fleet.down(["a"])
    assert [c.model for c in world.containers.values()] == ["gone"]
    fleet.up(["c"])
    report = fleet.down()
    assert world.containers == {}
    assert sorted(x.model for x in report.actions) == ["c", "gone"]


def test_logs_of_a_model_and_of_an_absent_one(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["a"])
    assert "INFO starting a" in fleet.logs("a")
    assert list(fleet.follow_logs("a")) == ["INFO starting a"]
    with pytest.raises(Exception, match="has no container"):
        fleet.logs("b")


def test_new_containers_join_the_network_their_peers_share(fleet: Fleet,
                                                           world: FakeWorld) -> None:
    # a compose deployment: the gateway reaches models by service name on the project network
    world.add_container("a", port=18001, spec_hash=spec_hash_of(fleet, "a"),
                        networks=("proj_default",))
    fleet.switch("c")
    (c,) = world.by_model("c")
    assert c.kwargs["network"] == "proj_default"
    assert c.kwargs["networking_config"] == {"proj_default": {"Aliases": ["vllm-c"]}}


def test_a_recreated_container_stays_on_its_network(fleet: Fleet, world: FakeWorld) -> None:
    world.add_container("a", port=18001, spec_hash="0ld", networks=("proj_default",))
    fleet.up(["a"])
    (c,) = world.by_model("a")
    assert c.networks == ("proj_default",)


def test_a_configured_network_wins(world: FakeWorld, tmp_path: Path) -> None:
    fleet = make_fleet(world, make_registry(), tmp_path, network="fleetnet")
    world.add_container("a", port=18001, spec_hash=spec_hash_of(fleet, "a"),
                        networks=("proj_default",))
    fleet.switch("c")
    assert world.by_model("c")[0].kwargs["networking_config"] == {"fleetnet": {"Aliases": ["vllm-c"]}}
    assert "network" not in make_fleet(FakeWorld(), make_registry(), tmp_path).actor.run_kwargs("a")


def test_containers_made_on_a_compose_network_join_its_project(fleet: Fleet,
                                                                world: FakeWorld) -> None:
    # made by `docker compose up`: the project label; `docker compose down` must remove the
    # container the fleet adds to it, so the new one carries the project's labels
    world.add_container("a", port=18001, spec_hash=spec_hash_of(fleet, "a"),
                        networks=("proj",), labels={"com.docker.compose.project": "proj"})
    fleet.switch("c")
    (c,) = world.by_model("c")
    assert c.labels["com.docker.compose.project"] == "proj"
    assert c.labels["com.docker.compose.service"] == "vllm-c"
    assert c.labels["com.docker.compose.oneoff"] == "False"


def test_a_configured_compose_project_labels_what_the_fleet_creates(
        world: FakeWorld, tmp_path: Path) -> None:
    # the compose gateway's fleet: no autostart peer to learn the project from
    fleet = make_fleet(world, make_registry(), tmp_path, network="proj", compose_project="proj")
    assert fleet.actor.run_kwargs("c")["labels"]["com.docker.compose.project"] == "proj"
    plain = make_fleet(FakeWorld(), make_registry(), tmp_path, network="net")
    assert "com.docker.compose.project" not in plain.actor.run_kwargs("c")["labels"]


# -- replicas ------------------------------------------------------------------------------


@pytest.fixture
def rfleet(world: FakeWorld, tmp_path: Path) -> Fleet:
    return make_fleet(world, make_registry(REPLICA_TOML), tmp_path)


def rows(fleet: Fleet) -> list[tuple[str, int, str, int | None]]:
    return [(s.name, s.replica, s.state, s.port) for s in fleet.status()]


def test_up_creates_each_initial_replica_as_its_own_container(rfleet: Fleet,
                                                              world: FakeWorld) -> None:
    report = rfleet.up()
    assert world.calls == [("run", "vllm-fleet-pool"), ("run", "vllm-fleet-pool-r1"),
                           ("run", "vllm-fleet-auto")]
    assert [(a.model, a.replica, a.action) for a in report.actions] == [
        ("pool", 0, "create"), ("pool", 1, "create"), ("auto", 0, "create")]
    by_name = {c.name: c.kwargs for c in world.containers.values()}
    r1 = by_name["vllm-fleet-pool-r1"]
    assert r1["ports"] == {"18102/tcp": ("127.0.0.1", 18102)}
    assert r1["command"][r1["command"].index("--port") + 1] == "18102"
    assert r1["labels"]["io.vllm-fleet.replica"] == "1"
    assert r1["labels"]["io.vllm-fleet.spec-hash"] == rfleet.replica_specs["pool"][1].spec_hash
    assert r1["healthcheck"]["test"][-1] == "http://127.0.0.1:18102/health"
    assert by_name["vllm-fleet-pool"]["labels"]["io.vllm-fleet.replica"] == "0"
    # same GPUs, its own cores
    assert r1["device_requests"] == by_name["vllm-fleet-pool"]["device_requests"]
    assert [by_name[n]["cpuset_cpus"] for n in ("vllm-fleet-pool", "vllm-fleet-pool-r1",
                                                "vllm-fleet-auto")] == ["1", "2", "3"]
    assert report.awake == ("pool", "auto")


def test_status_has_one_row_per_replica(rfleet: Fleet, world: FakeWorld) -> None:
    # initial replicas always; other autoscale slots only when they have a container
    assert rows(rfleet) == [("pool", 0, "absent", 18101), ("pool", 1, "absent", 18102),
                            ("auto", 0, "absent", 18111), ("big", 0, "absent", 18121)]
    rfleet.up()
    rfleet.scale("pool", 1)
    rfleet.scale("auto", 2)
    assert rows(rfleet) == [("pool", 0, "healthy", 18101), ("pool", 1, "stopped", 18102),
                            ("auto", 0, "healthy", 18111), ("auto", 1, "healthy", 18112),
                            ("big", 0, "absent", 18121)]
    row = rfleet.status(["auto"])[1]
    assert row.as_dict()["replica"] == 1 and row.container == "vllm-fleet-auto-r1"


def test_switch_counts_every_replica_and_acts_on_all_of_an_evicted_model(
        rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up()   # pool 2 x 0.3 + auto 0.2 = 0.8 on GPU 0
    world.calls.clear()
    report = rfleet.switch("big")   # 0.5 needs pool (both replicas) out; auto stays
    assert world.calls == [("sleep", "pool"), ("sleep", "pool"), ("run", "vllm-fleet-big")]
    assert [(a.model, a.replica, a.action) for a in report.actions] == [
        ("pool", 0, "sleep"), ("pool", 1, "sleep"), ("big", 0, "create")]
    assert world.awake_containers() == ["vllm-fleet-auto", "vllm-fleet-big"]
    world.calls.clear()
    report = rfleet.switch("pool")   # both replicas come back; big is stopped
    assert world.calls == [("stop", "vllm-fleet-big"), ("wake", "pool"), ("wake", "pool")]
    assert world.awake_containers() == ["vllm-fleet-auto", "vllm-fleet-pool",
                                        "vllm-fleet-pool-r1"]
    assert rfleet.plan("big").evict[0].model == "pool"


def test_a_switch_that_needs_a_scaled_up_model_out_evicts_all_its_replicas(
        rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up(["auto"])
    rfleet.scale("auto", 3)   # 3 x 0.2
    world.calls.clear()
    rfleet.switch("pool")     # 0.6 + 0.6 > 0.95: auto goes, all 3 (no sleep_mode: stopped)
    assert world.calls[:3] == [("stop", "vllm-fleet-auto"), ("stop", "vllm-fleet-auto-r1"),
                               ("stop", "vllm-fleet-auto-r2")]
    assert world.awake_containers() == ["vllm-fleet-pool", "vllm-fleet-pool-r1"]


def test_scale_up_starts_the_lowest_free_slots_and_down_stops_the_highest(
        rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up(["auto"])
    world.calls.clear()
    world.load_seconds["auto"] = 4.0
    report = rfleet.scale("auto", 3)
    assert world.calls == [("run", "vllm-fleet-auto-r1"), ("run", "vllm-fleet-auto-r2")]
    assert list(report.timings) == ["start", "healthy", "total"]
    assert report.timings["healthy"] >= 4.0   # it waited for both to be healthy
    assert [c.kwargs["cpuset_cpus"] for c in world.by_model("auto")] == ["3", "4", "5"]
    world.calls.clear()
    report = rfleet.scale("auto", 1)
    assert world.calls == [("stop", "vllm-fleet-auto-r2"), ("stop", "vllm-fleet-auto-r1")]
    assert [(a.replica, a.action, a.note) for a in report.actions] == [
        (2, "stop", "scaled to 1"), (1, "stop", "scaled to 1")]
    world.calls.clear()
    report = rfleet.scale("auto", 2)   # the stopped container is started, not recreated
    assert world.calls == [("start", "vllm-fleet-auto-r1")]
    assert rfleet.scale("auto", 2).actions[0].action == "none"


def test_scale_refuses_what_does_not_fit_and_never_evicts(rfleet: Fleet,
                                                          world: FakeWorld) -> None:
    rfleet.up()   # 0.8 on GPU 0
    world.calls.clear()
    with pytest.raises(PlacementRefused) as exc:
        rfleet.scale("auto", 2)
    assert "cannot scale auto to 2 replica(s) beside what is awake (pool)" in str(exc.value)
    assert "[gpu-overcommit] GPU 0: pool 2x0.3 + auto 2x0.2 = 1 > gpu_memory_ceiling 0.95" \
        in str(exc.value)
    assert world.calls == []
    rfleet.scale("pool", 1)    # a fixed model may run fewer than its count
    rfleet.scale("auto", 3)    # 0.3 + 0.6
    assert len(world.awake_containers()) == 4


def test_scale_out_of_range_is_a_usage_error(rfleet: Fleet, world: FakeWorld) -> None:
    with pytest.raises(ScaleOutOfRange, match="it takes 1 to 3 \\(autoscaled") as exc:
        rfleet.scale("auto", 4)
    assert exc.value.exit_code == 2
    with pytest.raises(ScaleOutOfRange, match="1 to 2 \\(a fixed count"):
        rfleet.scale("pool", 0)
    with pytest.raises(UnknownModel):
        rfleet.scale("nope", 1)
    assert world.calls == []


def test_a_replica_that_fails_at_scale_names_itself_and_the_way_again(
        rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up(["auto"])
    world.crash.add("auto")
    with pytest.raises(StartFailed) as exc:
        rfleet.scale("auto", 2)
    msg = str(exc.value)
    assert "model 'auto' replica 1 failed to start: its container exited" in msg
    assert "--- last log lines of vllm-fleet-auto-r1 ---" in msg
    assert "fleet state now: auto[0] healthy, auto[1] stopped; awake: auto" in msg
    assert "run `fleet scale auto 2` again" in msg


def test_scale_holds_the_lock_and_honours_the_deadline(rfleet: Fleet,
                                                       world: FakeWorld) -> None:
    rfleet.up(["auto"])
    held: list[bool] = []
    real_run = world.engine.run

    def run(kwargs):  # type: ignore[no-untyped-def]
        held.append(rfleet.lock.held)
        return real_run(kwargs)

    world.engine.run = run  # type: ignore[method-assign]
    world.load_seconds["auto"] = 1000
    t0 = world.clock.now
    with pytest.raises(StartFailed, match="the caller's deadline"):
        rfleet.scale("auto", 2, deadline=world.clock.now + 5)
    assert held == [True] and not rfleet.lock.held
    assert world.clock.now - t0 < 6


def test_sleep_wake_down_act_on_every_replica(rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up()
    world.calls.clear()
    report = rfleet.sleep("pool")
    assert [(a.replica, a.action) for a in report.actions] == [(0, "sleep"), (1, "sleep")]
    rfleet.scale("auto", 2)   # fits now that pool sleeps
    report = rfleet.sleep("auto")   # no sleep_mode: stopped, and the report says so
    assert [(a.replica, a.action, a.note) for a in report.actions] == [
        (0, "stop", "no sleep_mode: stopped instead"),
        (1, "stop", "no sleep_mode: stopped instead")]
    assert rfleet.sleep("auto").actions[0].note == "already stopped"
    world.calls.clear()
    rfleet.wake("pool")       # both sleeping replicas
    rfleet.wake("auto")       # its initial replica only; the scaled-down slot stays stopped
    assert world.calls == [("wake", "pool"), ("wake", "pool"), ("start", "vllm-fleet-auto")]
    report = rfleet.down(["pool", "auto"])
    assert sorted((a.model, a.replica) for a in report.actions) == [
        ("auto", 0), ("auto", 1), ("pool", 0), ("pool", 1)]
    assert world.containers == {}


def test_a_container_made_before_replicas_is_adopted_as_replica_0(rfleet: Fleet,
                                                                  world: FakeWorld) -> None:
    world.add_container("pool", port=18101, spec_hash=spec_hash_of(rfleet, "pool"))
    assert rows(rfleet)[:2] == [("pool", 0, "healthy", 18101), ("pool", 1, "absent", 18102)]
    report = rfleet.up(["pool"])
    assert world.calls == [("run", "vllm-fleet-pool-r1")]
    assert report.actions[0].note == "adopted (healthy)"


def test_a_replica_beyond_the_registry_slots_is_shown_and_removed_by_up(
        rfleet: Fleet, world: FakeWorld) -> None:
    world.add_container("pool", port=18103, spec_hash="x", replica=2)
    row = next(s for s in rfleet.status() if s.replica == 2)
    assert (row.name, row.state, row.port) == ("pool", "drifted", 18103)
    assert "beyond the 2 replica slot(s)" in row.detail
    report = rfleet.up(["pool"])
    assert ("remove", "vllm-fleet-pool-r2") in world.calls
    assert (report.actions[0].action, report.actions[0].replica) == ("remove", 2)
    assert [c.name for c in world.containers.values()] == ["vllm-fleet-pool", "vllm-fleet-pool-r1"]


def test_replicas_join_the_network_under_their_service_names(world: FakeWorld,
                                                             tmp_path: Path) -> None:
    fleet = make_fleet(world, make_registry(REPLICA_TOML), tmp_path, network="fleetnet")
    fleet.up(["pool"])
    aliases = sorted(c.kwargs["networking_config"]["fleetnet"]["Aliases"][0]
                     for c in world.containers.values())
    assert aliases == ["vllm-pool", "vllm-pool-r1"]


def test_logs_of_a_replica(rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up(["auto"])
    assert "INFO starting auto" in rfleet.logs("auto", replica=0)
    with pytest.raises(Exception, match="'auto\\[1\\]' has no container"):
        rfleet.logs("auto", replica=1)


def test_switch_refuses_before_evicting_when_the_target_image_is_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fleet.errors import ImageMissing

    world = FakeWorld()
    fleet = make_fleet(world, make_registry(), tmp_path)
    fleet.up(["a"])
    world.missing_images.add(fleet.registry.image(fleet.registry.models["b"]))
    before = list(world.calls)
    with pytest.raises(ImageMissing) as info:
        fleet.switch("b")  # would evict a (0.6 + 0.6 > 0.95)
    assert "nothing was evicted" in str(info.value) and "scripts/build-images.sh" in str(info.value)
    assert [c for c in world.calls[len(before):] if c[0] in ("stop", "sleep", "run")] == []
    assert [s.state for s in fleet.status(["a"])] == ["healthy"]


# -- the Docker daemon lost part-way through an operation ---------------------------------

LOST = DockerUnreachable("cannot reach the Docker daemon at unix:///fake.sock: connection "
                         "refused")


def assert_interrupted(exc: pytest.ExceptionInfo[Interrupted], operation: str, done: str,
                       again: str) -> None:
    """The message states the operation, what was done, the state (unknown: the daemon does
    not answer) and the command to run again."""
    assert str(exc.value).splitlines() == [
        f"{operation} interrupted: {LOST}",
        f"done before that: {done}",
        "fleet state now: unknown while the Docker daemon does not answer",
        ("to recover: when the cause above is fixed (the Docker daemon answers `docker info`), "
         f"`fleet status` shows where the fleet stands; then run `{again}` again"),
    ]
    assert exc.value.exit_code == 1 and exc.value.__cause__ is LOST


def test_up_interrupted_after_creating_one_model_says_so_and_up_again_recovers(
        fleet: Fleet, world: FakeWorld) -> None:
    world.cut_after("run", LOST)
    with pytest.raises(Interrupted) as exc:
        fleet.up(["a", "c"])
    assert_interrupted(exc, "up a c", "a create", "fleet up a c")
    assert not fleet.lock.held
    world.unreachable = None
    report = fleet.up(["a", "c"])
    assert [(x.model, x.action) for x in report.actions] == [("a", "none"), ("c", "create")]
    assert world.awake_models() == {"a", "c"}


def test_down_interrupted_after_removing_one_model(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["a", "c"])
    world.cut_after("remove", LOST)
    with pytest.raises(Interrupted) as exc:
        fleet.down()
    assert_interrupted(exc, "down a b c", "a remove", "fleet down")
    assert [c.model for c in world.containers.values()] == ["c"]
    world.unreachable = None
    fleet.down()
    assert world.containers == {}


def test_sleep_interrupted_after_stopping_one_replica(rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up(["auto"])
    rfleet.scale("auto", 2)
    world.cut_after("stop", LOST)
    with pytest.raises(Interrupted) as exc:
        rfleet.sleep("auto")
    assert_interrupted(exc, "sleep auto", "auto[0] stop (no sleep_mode: stopped instead)",
                       "fleet sleep auto")
    world.unreachable = None
    rfleet.sleep("auto")
    assert world.awake_containers() == []


def test_wake_interrupted_while_the_model_loads(fleet: Fleet, world: FakeWorld) -> None:
    fleet.up(["b"])
    fleet.sleep("b")   # no sleep_mode: stopped
    world.cut_after("start", LOST)
    with pytest.raises(Interrupted) as exc:
        fleet.wake("b")
    assert_interrupted(exc, "wake b", "b start", "fleet wake b")
    world.unreachable = None
    assert fleet.wake("b").actions[0].action == "none"   # already up: adopted
    assert world.awake_models() == {"b"}


def test_scale_up_interrupted_after_one_new_replica(rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up(["auto"])
    world.cut_after("run", LOST)
    with pytest.raises(Interrupted) as exc:
        rfleet.scale("auto", 3)
    assert_interrupted(exc, "scale auto", "auto[1] create", "fleet scale auto 3")
    world.unreachable = None
    rfleet.scale("auto", 3)
    assert len(world.awake_containers()) == 3


def test_scale_down_interrupted_after_one_stop(rfleet: Fleet, world: FakeWorld) -> None:
    rfleet.up(["auto"])
    rfleet.scale("auto", 3)
    world.cut_after("stop", LOST)
    with pytest.raises(Interrupted) as exc:
        rfleet.scale("auto", 1)
    assert_interrupted(exc, "scale auto", "auto[2] stop (scaled to 1)", "fleet scale auto 1")
    world.unreachable = None
    rfleet.scale("auto", 1)
    assert world.awake_containers() == ["vllm-fleet-auto"]
