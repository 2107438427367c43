"""fleet.api: settings from the environment, FleetClient.ensure_awake (fake engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.api import FleetClient, SettingsError, build_fleet, load_settings, parse_labels
from fleet.engine import DockerEngine
from fleet.errors import PlacementRefused, ScaleOutOfRange, StartFailed
from support.fleet_fakes import REPLICA_TOML, FakeWorld, make_fleet, make_registry

pytestmark = pytest.mark.unit


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLEET_NAME_PREFIX", "t1")
    monkeypatch.setenv("FLEET_EXTRA_LABELS", "io.vllm-fleet.test=abc, team = x")
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.0.0.1:2375")
    monkeypatch.setenv("FLEET_LOCK_FILE", str(tmp_path / "l"))
    s = load_settings()
    assert s.labels() == {"io.vllm-fleet.test": "abc", "team": "x"}
    fleet = build_fleet(make_registry(), s)
    assert fleet.name_prefix == "t1" and fleet.specs["a"].name == "t1-a"
    assert fleet.extra_labels == {"io.vllm-fleet.test": "abc", "team": "x"}
    assert isinstance(fleet.engine, DockerEngine)
    assert fleet.engine.base_url == "tcp://10.0.0.1:2375"
    assert fleet.lock.path == tmp_path / "l"
    assert load_settings(docker_host="unix:///x.sock").docker_host == "unix:///x.sock"


def test_invalid_settings_raise_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="'oops' is not KEY=VALUE"):
        parse_labels("a=b,oops")
    monkeypatch.setenv("FLEET_LOCK_TIMEOUT", "soon")
    with pytest.raises(SettingsError, match="lock_timeout"):
        load_settings()


def test_ensure_awake_returns_at_once_when_healthy_else_switches(tmp_path: Path) -> None:
    world = FakeWorld()
    client = FleetClient(make_fleet(world, make_registry(), tmp_path))
    report = client.ensure_awake("a")
    assert report is not None and report.awake == ("a",)
    world.calls.clear()
    assert client.ensure_awake("a") is None
    assert world.calls == []
    report = client.ensure_awake("b", timeout=30)
    assert report is not None and [x.action for x in report.actions] == ["sleep", "create"]
    assert [s.state for s in client.status(["a", "b"])] == ["sleeping", "healthy"]


def test_ensure_awake_timeout_caps_the_health_wait(tmp_path: Path) -> None:
    world = FakeWorld()
    client = FleetClient(make_fleet(world, make_registry(), tmp_path))
    world.load_seconds["b"] = 50
    t0 = world.clock.now
    with pytest.raises(StartFailed, match="caller's deadline"):
        client.ensure_awake("b", timeout=2)
    assert world.clock.now - t0 < 3


def test_ensure_awake_brings_up_the_initial_replicas(tmp_path: Path) -> None:
    world = FakeWorld()
    client = FleetClient(make_fleet(world, make_registry(REPLICA_TOML), tmp_path))
    report = client.ensure_awake("pool")
    assert report is not None and [(a.replica, a.action) for a in report.actions] == [
        (0, "create"), (1, "create")]
    assert client.awake_replicas("pool") == 2 and client.awake_replicas("auto") == 0


def test_sleep_uses_sleep_mode_or_stops_and_says_which(tmp_path: Path) -> None:
    world = FakeWorld()
    client = FleetClient(make_fleet(world, make_registry(), tmp_path))
    client.ensure_awake("a")
    client.ensure_awake("c")
    report = client.sleep("a")   # sleep_mode: vLLM sleep, the container keeps running
    assert [(x.action, x.note) for x in report.actions] == [("sleep", "requested")]
    report = client.sleep("c")   # no sleep_mode: the container is stopped
    assert [(x.action, x.note) for x in report.actions] == [
        ("stop", "no sleep_mode: stopped instead")]
    assert client.sleep("c").actions[0].action == "none"
    assert [s.state for s in client.status(["a", "c"])] == ["sleeping", "stopped"]
    assert client.ensure_awake("c") is not None   # the next activation starts it again
    assert world.calls[-1] == ("start", "vllm-fleet-c")


def test_scale_with_timeout_and_its_refusals(tmp_path: Path) -> None:
    world = FakeWorld()
    client = FleetClient(make_fleet(world, make_registry(REPLICA_TOML), tmp_path))
    client.ensure_awake("auto")
    report = client.scale("auto", 3, timeout=30)
    assert report.operation == "scale" and client.awake_replicas("auto") == 3
    with pytest.raises(ScaleOutOfRange):
        client.scale("auto", 9)
    client.scale("auto", 1)
    client.fleet.up(["pool"])
    with pytest.raises(PlacementRefused):
        client.scale("auto", 2)
    world.load_seconds["auto"] = 50
    client.fleet.sleep("pool")
    t0 = world.clock.now
    with pytest.raises(StartFailed, match="caller's deadline"):
        client.scale("auto", 2, timeout=2)
    assert world.clock.now - t0 < 3


def test_wake_never_evicts(tmp_path: Path) -> None:
    world = FakeWorld()
    client = FleetClient(make_fleet(world, make_registry(), tmp_path))
    client.ensure_awake("a")
    client.sleep("a")
    client.ensure_awake("b")  # a sleeps (0 GPU), b takes 0.6
    with pytest.raises(PlacementRefused):
        client.wake("a")  # 0.6 + 0.6 > 0.95: wake refuses rather than evict b
    assert [s.state for s in client.status(["a", "b"])] == ["sleeping", "healthy"]
    client.sleep("b")
    client.wake("a")
    assert [s.state for s in client.status(["a", "b"])] == ["healthy", "stopped"]  # b: no sleep_mode
