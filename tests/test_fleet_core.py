"""The fleet core's contract with the gateway: typed errors and states without Docker, the
scheduler's hooks (evict only what it allows, pinned models, `fits`, how a model came up),
and one container listing per health poll."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet.api import FleetClient
from fleet.containers import ContainerRecord
from fleet.errors import ModelsBusy, PlacementRefused
from fleet.placement import fits
from fleet.planner import ObservedModel, plan_switch
from fleet.registry import parse_registry
from fleet.states import BringUp, Phase, ReplicaState, ViolationKind
from support.fleet_fakes import REGISTRY_TOML, FakeWorld, make_fleet, make_registry

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# x, y, z on GPU 0 at 0.45 each: two fit under the 0.95 ceiling, three do not.
THREE = """
[host]
gpus = [{ id = 0 }]
[defaults]
image = "vllm-fleet/sim:dev"
hf_cache = ""
health_timeout = 60
""" + "".join(f"""
[models.{n}]
source = "org/{n}"
port = {18201 + i}
gpus = [0]
gpu_memory_utilization = 0.45
{extra}
""" for i, (n, extra) in enumerate([("x", "pinned = true"), ("y", ""), ("z", "")]))


def test_errors_states_reports_and_planning_import_without_docker() -> None:
    code = ("import sys; import fleet.errors, fleet.states, fleet.report, fleet.placement, "
            "fleet.planner, fleet.observe, fleet.containers; "
            "print('docker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"


def test_states_are_str_enums_that_read_and_serialize_as_their_words(tmp_path: Path) -> None:
    world = FakeWorld()
    fleet = make_fleet(world, make_registry(), tmp_path)
    report = fleet.up()
    row = fleet.status(["a"])[0]
    assert row.state is ReplicaState.HEALTHY and row.state == "healthy"
    assert json.loads(json.dumps(row.as_dict()))["state"] == "healthy"
    assert f"{row.state}" == "healthy"
    data = json.loads(json.dumps(report.as_dict()))
    assert list(data["timings"]) == ["start", "healthy", "total"]
    assert data["actions"][0]["action"] == "create" and data["bring_up"] == "create"


def test_a_busy_model_in_the_way_is_a_typed_models_busy(tmp_path: Path) -> None:
    world = FakeWorld()
    fleet = make_fleet(world, make_registry(), tmp_path, busy=lambda m: m == "a")
    fleet.up()
    with pytest.raises(ModelsBusy) as caught:
        fleet.switch("b")
    assert isinstance(caught.value, PlacementRefused)
    assert caught.value.busy_models == ("a",) and caught.value.blocking_models == ("a",)
    (v,) = caught.value.violations
    assert v.kind is ViolationKind.BUSY and v.models == ("a",)


def test_a_plain_placement_refusal_has_no_busy_models(tmp_path: Path) -> None:
    world = FakeWorld()
    fleet = make_fleet(world, make_registry(), tmp_path)
    fleet.up()
    with pytest.raises(PlacementRefused) as caught:
        fleet.wake("b")
    assert not isinstance(caught.value, ModelsBusy)
    assert caught.value.busy_models == () and caught.value.blocking_models == ()


def test_a_switch_never_evicts_a_pinned_model(tmp_path: Path) -> None:
    world = FakeWorld()
    fleet = make_fleet(world, parse_registry(THREE, source="t.toml"), tmp_path)
    fleet.up(["x", "y"])
    report = fleet.switch("z")            # x (pinned) stays, y goes
    assert [(a.model, a.action) for a in report.actions] == [("y", "stop"), ("z", "create")]
    assert report.awake == ("x", "z")


def test_a_pinned_model_that_alone_is_in_the_way_refuses_the_switch() -> None:
    r = parse_registry(THREE.replace("0.45\n\n", "0.6\n\n", 1), source="t.toml")  # x: 0.6
    plan = plan_switch(r, {"x": ObservedModel("x", ReplicaState.HEALTHY)}, "y")
    (v, *rest) = plan.violations
    assert v.kind is ViolationKind.NOT_EVICTABLE and v.models == ("x",)
    assert "pinned" in v.message and rest and rest[0].kind == ViolationKind.GPU_OVERCOMMIT


def test_ensure_awake_evicts_only_the_models_it_is_allowed_to(tmp_path: Path) -> None:
    world = FakeWorld()
    registry = parse_registry(THREE.replace("pinned = true", ""), source="t.toml")
    client = FleetClient(make_fleet(world, registry, tmp_path))
    client.fleet.up(["x", "y"])
    with pytest.raises(PlacementRefused) as caught:
        client.ensure_awake("z", evict=[])
    assert not isinstance(caught.value, ModelsBusy)
    assert set(caught.value.blocking_models) == {"x", "y"}
    assert "allowed" in str(caught.value)
    assert world.awake_models() == {"x", "y"}          # nothing was evicted
    report = client.ensure_awake("z", evict=["x"])     # y would do as well: not allowed
    assert report is not None
    assert [(a.model, a.action) for a in report.actions] == [("x", "stop"), ("z", "create")]


def test_fits_answers_for_replica_counts() -> None:
    r = parse_registry(THREE, source="t.toml")
    assert fits(r, {"x": 1, "y": 1}) and fits(r, {})
    assert not fits(r, {"x": 1, "y": 1, "z": 1})
    assert not fits(r, {"y": 3})


def test_report_says_how_the_target_came_up_and_times_each_phase(tmp_path: Path) -> None:
    world = FakeWorld()
    fleet = make_fleet(world, make_registry(), tmp_path)
    world.load_seconds["a"] = 3
    created = fleet.up(["a"])
    assert created.bring_up_kind is BringUp.CREATE
    assert created.phases.healthy is not None and created.phases.healthy >= 3
    assert created.phases.evict is None
    slept = fleet.switch("b")                     # a has sleep_mode: it sleeps
    assert slept.bring_up_kind is BringUp.CREATE and slept.timings[Phase.EVICT] >= 0
    woken = fleet.switch("a")
    assert woken.bring_up_kind is BringUp.WAKE
    started = fleet.switch("b")                   # b was stopped: its container starts
    assert started.bring_up_kind is BringUp.START
    assert fleet.switch("b").bring_up_kind is None  # already up
    assert fleet.sleep("b").bring_up_kind is None


class CountingEngine:
    """Counts container listings; everything else goes to the fake engine."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.listings = 0

    def list_managed(self, labels: Any = None) -> list[ContainerRecord]:
        self.listings += 1
        return list(self.inner.list_managed(labels))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_health_wait_lists_containers_once_per_poll(tmp_path: Path) -> None:
    text = REGISTRY_TOML.replace("gpu_memory_utilization = 0.6", "gpu_memory_utilization = 0.3")
    world = FakeWorld()
    fleet = make_fleet(world, make_registry(text), tmp_path, poll_interval=1.0)
    counting = CountingEngine(world.engine)
    fleet.engine = counting  # type: ignore[assignment]
    for name in ("a", "b", "c"):
        world.load_seconds[name] = 20
    fleet.up(["a", "b", "c"])                    # three models load together for 20 s
    polls = 21                                   # one round per second of fake time
    # observe at the start, one for the create network lookup each, the polls, the final
    # re-observation: not one listing per model per poll (that was 3 x 21 = 63 for polls).
    assert counting.listings <= polls + 6
