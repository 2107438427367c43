"""fleet.planner: placement rules, switch plans and CPU pinning (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.check import check_registry
from fleet.placement import (
    Violation,
    assign_cpusets,
    assign_replica_cpusets,
    check_placement,
    gateway_cpuset,
)
from fleet.planner import ObservedModel, SwitchPlan, describe_plan, plan_switch
from fleet.registry import ModelSpec, load_registry, parse_registry
from fleet.spec import fleet_specs, replica_specs
from fleet.states import model_state

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def reg(models: str, host: str = "gpus = [{ id = 0 }, { id = 1 }]\ngpu_memory_ceiling = 0.95",
        defaults: str = ""):  # type: ignore[no-untyped-def]
    return parse_registry(f"[host]\n{host}\n[defaults]\n{defaults}\n{models}", source="t.toml")


def model(name: str, port: int, *, gpus: str = "[0]", util: float = 0.45, extra: str = "") -> str:
    return (f'[models.{name}]\nsource = "org/{name}"\nport = {port}\ngpus = {gpus}\n'
            f"gpu_memory_utilization = {util}\n{extra}\n")


def kinds(violations: list[Violation] | tuple[Violation, ...]) -> list[str]:
    return [v.kind for v in violations]


def obs(*items: ObservedModel) -> dict[str, ObservedModel]:
    return {o.name: o for o in items}


def up(name: str, last_used: float = 0.0, busy: bool = False, state: str = "healthy") -> ObservedModel:
    return ObservedModel(name, state, busy=busy, last_used=last_used)


# --- placement rules --------------------------------------------------------------------

SHARED = reg(model("a", 8001) + model("b", 8002) + model("c", 8003))


def test_shared_gpu_fits_under_the_ceiling() -> None:
    assert check_placement(SHARED, ["a", "b"]) == []


def test_gpu_overcommit_names_the_gpu_and_the_models() -> None:
    (v,) = check_placement(SHARED, ["a", "b", "c"])
    assert v.kind == "gpu-overcommit"
    assert "GPU 0" in v.message and "a 0.45" in v.message and "0.95" in v.message


def test_ceiling_is_inclusive() -> None:
    r = reg(model("a", 8001, util=0.5) + model("b", 8002, util=0.45))
    assert check_placement(r, ["a", "b"]) == []


def test_dedicated_model_excludes_others_on_its_gpus_only() -> None:
    r = reg(model("big", 8001, gpus="[0, 1]", util=0.5, extra="dedicated = true")
            + model("small", 8002, gpus="[1]", util=0.1)
            + model("cpu", 8003, gpus="[]"))
    assert check_placement(r, ["big"]) == []
    (v,) = check_placement(r, ["big", "small"])
    assert v.kind == "dedicated-conflict" and "big" in v.message and "small" in v.message
    assert check_placement(r, ["big", "cpu"]) == []   # a CPU-only model uses no GPU


def test_tensor_parallel_counts_the_fraction_on_each_gpu() -> None:
    r = reg(model("tp", 8001, gpus="[0, 1]", util=0.5) + model("g1", 8002, gpus="[1]", util=0.5)
            + model("g0", 8003, gpus="[0]", util=0.4))
    (v,) = check_placement(r, ["tp", "g1"])
    assert v.kind == "gpu-overcommit" and "GPU 1" in v.message
    assert check_placement(r, ["tp", "g0"]) == []


def test_unknown_gpu_and_duplicate_gpus_from_hand_built_specs() -> None:
    # The registry refuses both; the planner still checks specs built by hand.
    r = reg(model("a", 8001))
    bad = ModelSpec(name="bad", source="x/y", port=8009, gpus=(0, 7))
    twice = ModelSpec.model_construct(name="twice", source="x/y", port=8010, gpus=(1, 1))
    r = r.model_copy(update={"models": {**r.models, "bad": bad, "twice": twice}})
    found = kinds(check_placement(r, ["bad", "twice"]))
    assert "unknown-gpu" in found and "tensor-parallel" in found


def test_unknown_names_are_reported_and_remote_models_ignored() -> None:
    r = reg(model("a", 8001) + '[models.far]\nurl = "http://10.0.0.5:8000"\n')
    assert kinds(check_placement(r, ["a", "ghost"])) == ["unknown-model"]
    assert check_placement(r, ["a", "far"]) == []


def test_cpu_budget_includes_the_gateway() -> None:
    r = reg(model("a", 8001, gpus="[]", extra="cpus = 2") + model("b", 8002, gpus="[]", extra="cpus = 2"),
            host="cpus = 4\ngateway_cpus = 1")
    assert check_placement(r, ["a"]) == []
    (v,) = check_placement(r, ["a", "b"])
    assert v.kind == "cpu-oversubscribed" and "5 cores > [host].cpus 4" in v.message


def test_no_cpu_check_without_declared_host_cpus() -> None:
    r = reg(model("a", 8001, gpus="[]", extra="cpus = 64") + model("b", 8002, gpus="[]", extra="cpus = 64"))
    assert check_placement(r, ["a", "b"]) == []
    assert assign_cpusets(r, ["a", "b"]) == {}


def test_models_without_a_cpu_budget_are_not_counted() -> None:
    r = reg(model("a", 8001, gpus="[]") + model("b", 8002, gpus="[]"), host="cpus = 1\ngateway_cpus = 1")
    assert check_placement(r, ["a", "b"]) == []
    assert assign_cpusets(r, ["a", "b"]) == {}


# --- cpusets ------------------------------------------------------------------------------


def test_cpusets_two_models_on_two_cores() -> None:
    r = reg(model("a", 8001, gpus="[]", extra="cpus = 1") + model("b", 8002, gpus="[]", extra="cpus = 1"),
            host="cpus = 2\ngateway_cpus = 0")
    assert assign_cpusets(r, ["a", "b"]) == {"a": "0", "b": "1"}
    assert gateway_cpuset(r) is None


def test_cpusets_keep_gateway_cores_and_reuse_cores_of_exclusive_models() -> None:
    r = load_registry(ROOT / "models.toml")
    sets = assign_cpusets(r, r.names())
    # 32 cores, 2 for the gateway; qwen-32b (dedicated on both GPUs) never runs beside the
    # others, so it reuses the first block; embed runs beside qwen-7b and llama-8b.
    assert sets == {"qwen-7b": "2-9", "llama-8b": "10-17", "qwen-32b": "2-9", "embed": "18-25"}
    assert gateway_cpuset(r) == "0-1"


def test_cpusets_are_stable_whatever_is_awake() -> None:
    r = load_registry(ROOT / "models.toml")
    specs = fleet_specs(r)
    assert {n: s.cpuset_cpus for n, s in specs.items()} == assign_cpusets(r, r.names())
    assert fleet_specs(r) == specs


def test_cpusets_wrap_when_the_budget_is_exceeded_and_check_reports_it() -> None:
    r = reg(model("a", 8001, gpus="[]", extra="cpus = 2") + model("b", 8002, gpus="[]", extra="cpus = 2"),
            host="cpus = 3\ngateway_cpus = 0")
    sets = assign_cpusets(r, ["a", "b"])
    assert sets["a"] == "0-1" and len(sets["b"].replace("-", ",").split(",")) == 2
    assert kinds(check_placement(r, ["a", "b"])) == ["cpu-oversubscribed"]


def test_fragmented_cpusets_are_reported_even_when_the_sum_fits() -> None:
    # a dedicated on GPU 0; b on GPUs 0+1 (excludes a and c); c on GPU 1; d beside b and c.
    r = reg(model("a", 8001, gpus="[0]", util=0.6, extra="dedicated = true\ncpus = 1")
            + model("b", 8002, gpus="[0, 1]", util=0.6, extra="cpus = 1")
            + model("c", 8003, gpus="[1]", util=0.6, extra="cpus = 1")
            + model("d", 8004, gpus="[0]", util=0.3, extra="cpus = 2"),
            host="gpus = [{ id = 0 }, { id = 1 }]\ncpus = 3\ngateway_cpus = 0")
    assert assign_cpusets(r, r.names()) == {"a": "0", "b": "0", "c": "1", "d": "1-2"}
    (v,) = check_placement(r, ["c", "d"])
    assert v.kind == "cpu-oversubscribed" and "core 1" in v.message
    assert check_placement(r, ["b", "d"]) == []


# --- switch plans ----------------------------------------------------------------------


def test_unknown_target_is_a_violation_not_an_exception() -> None:
    plan = plan_switch(SHARED, {}, "ghost")
    assert not plan.ok and kinds(plan.violations) == ["unknown-model"]


def test_remote_target_is_never_planned() -> None:
    r = reg(model("a", 8001) + '[models.far]\nurl = "http://10.0.0.5:8000"\n')
    assert kinds(plan_switch(r, {}, "far").violations) == ["remote-model"]
    # A remote model in the observed state is ignored.
    plan = plan_switch(r, obs(up("far"), up("a")), "a")
    assert plan == SwitchPlan("a", (), "none", ())


def test_alias_resolves_to_the_model() -> None:
    r = reg(model("a", 8001, extra='aliases = ["fast"]'))
    assert plan_switch(r, {}, "fast").target == "a"


@pytest.mark.parametrize("state,action", [
    ("healthy", "none"), ("running", "none"), ("loading", "none"),
    ("sleeping", "wake"), ("stopped", "start"), ("absent", "start"), ("drifted", "start"),
])
def test_start_action_follows_the_target_state(state: str, action: str) -> None:
    plan = plan_switch(SHARED, obs(ObservedModel("a", state)), "a")
    assert plan.start_action == action and plan.ok and plan.evict == ()


def test_no_eviction_when_the_target_fits() -> None:
    plan = plan_switch(SHARED, obs(up("a")), "b")
    assert plan == SwitchPlan("b", (), "start", ())


def test_evicts_the_least_recently_used_idle_model() -> None:
    plan = plan_switch(SHARED, obs(up("a", last_used=200), up("b", last_used=100)), "c")
    assert [e.model for e in plan.evict] == ["b"]
    assert plan.evict[0].action == "stop" and "GPU(s) [0]" in plan.evict[0].reason


def test_idle_before_busy_even_if_the_busy_one_is_older() -> None:
    plan = plan_switch(SHARED, obs(up("a", last_used=1, busy=True), up("b", last_used=500)), "c")
    assert [e.model for e in plan.evict] == ["b"] and plan.ok


def test_busy_model_blocks_without_force() -> None:
    r = reg(model("a", 8001, util=0.6) + model("b", 8002, util=0.6))
    plan = plan_switch(r, obs(up("a", busy=True)), "b")
    assert not plan.ok and plan.evict == ()
    (v,) = plan.violations
    assert v.kind == "busy" and "a" in v.message and "force" in v.message
    forced = plan_switch(r, obs(up("a", busy=True)), "b", force=True)
    assert forced.ok and [(e.model, e.action) for e in forced.evict] == [("a", "stop")]
    assert "busy" in forced.evict[0].reason


def test_force_still_prefers_evicting_idle_models_over_a_busy_one() -> None:
    # t needs the others down to 0.45 on GPU 0: evicting busy x alone would do, but so does
    # evicting the two idle models, and then nobody's requests fail.
    r = reg(model("x", 8001, util=0.45) + model("i1", 8002, util=0.25) + model("i2", 8003, util=0.2)
            + model("t", 8004, util=0.5))
    plan = plan_switch(r, obs(up("x", busy=True), up("i1", 5), up("i2", 6)), "t", force=True)
    assert sorted(e.model for e in plan.evict) == ["i1", "i2"]


def test_minimal_means_fewest_models_before_lru() -> None:
    # x (0.5, used most recently) alone frees enough; y + z (older) would not suffice anyway,
    # and y alone or z alone does not: the one-model set wins over any larger one.
    r = reg(model("x", 8001, util=0.5) + model("y", 8002, util=0.2) + model("z", 8003, util=0.2)
            + model("t", 8004, util=0.5))
    plan = plan_switch(r, obs(up("x", 100), up("y", 1), up("z", 2)), "t")
    assert [e.model for e in plan.evict] == ["x"]


def test_minimal_prefers_one_big_eviction_over_two_small_ones() -> None:
    # Evicting x alone or y + z both fit; fewest wins although y and z are older.
    r = reg(model("x", 8001, util=0.4) + model("y", 8002, util=0.2) + model("z", 8003, util=0.2)
            + model("t", 8004, util=0.5))
    plan = plan_switch(r, obs(up("x", 100), up("y", 1), up("z", 2)), "t")
    assert [e.model for e in plan.evict] == ["x"]


def test_equal_size_sets_are_ranked_by_their_most_recent_member() -> None:
    # t needs two of p, q, r, s (0.2 each) gone from GPU 0; the pair whose most recently used
    # member is the oldest is the two least recently used, {q, r}.
    r = reg("".join(model(n, 8001 + i, util=0.2) for i, n in enumerate("pqrs")) + model("t", 8010, util=0.5))
    observed = obs(up("p", 40), up("q", 10), up("r", 20), up("s", 30))
    plan = plan_switch(r, observed, "t")
    assert [e.model for e in plan.evict] == ["q", "r"]   # acted LRU first


def test_sleep_for_sleep_mode_models_stop_for_the_others() -> None:
    r = reg(model("s", 8001, util=0.6, extra="sleep_mode = true") + model("n", 8002, gpus="[1]", util=0.6)
            + model("t", 8003, gpus="[0, 1]", util=0.6))
    plan = plan_switch(r, obs(up("s", 1), up("n", 2)), "t")
    assert {e.model: e.action for e in plan.evict} == {"s": "sleep", "n": "stop"}


def test_a_loading_sleep_mode_model_is_stopped_not_slept() -> None:
    r = reg(model("s", 8001, util=0.6, extra="sleep_mode = true") + model("t", 8002, util=0.6))
    plan = plan_switch(r, obs(up("s", state="loading")), "t")
    assert [(e.model, e.action) for e in plan.evict] == [("s", "stop")]


def test_sleeping_models_do_not_count_against_the_gpu() -> None:
    r = reg(model("s", 8001, util=0.9, extra="sleep_mode = true") + model("t", 8002, util=0.9))
    plan = plan_switch(r, obs(up("s", state="sleeping")), "t")
    assert plan == SwitchPlan("t", (), "start", ())
    # ...and waking it back evicts t.
    back = plan_switch(r, obs(up("s", state="sleeping"), up("t", 5)), "s")
    assert back.start_action == "wake" and [e.model for e in back.evict] == ["t"]


def test_dedicated_target_evicts_everything_on_its_gpus() -> None:
    r = load_registry(ROOT / "models.toml")
    observed = obs(up("qwen-7b", 3), up("llama-8b", 2), up("embed", 1))
    plan = plan_switch(r, observed, "qwen-32b")
    assert plan.ok and plan.start_action == "start"
    assert [(e.model, e.action) for e in plan.evict] == [
        ("embed", "stop"), ("llama-8b", "stop"), ("qwen-7b", "sleep")]
    assert all("dedicated" in e.reason for e in plan.evict)


def test_cpu_pinning_drives_eviction_and_can_outweigh_lru() -> None:
    # Cores are pinned per model, once (so specs never change between switches): 3 one-core
    # models on 2 cores, c shares core 0 with a, so starting c evicts a although b was used
    # less recently.
    r = reg(model("a", 8001, gpus="[]", extra="cpus = 1") + model("b", 8002, gpus="[]", extra="cpus = 1")
            + model("c", 8003, gpus="[]", extra="cpus = 1"), host="cpus = 2\ngateway_cpus = 0")
    assert assign_cpusets(r, r.names()) == {"a": "0", "b": "1", "c": "0"}
    plan = plan_switch(r, obs(up("a", 9), up("b", 3)), "c")
    assert [e.model for e in plan.evict] == ["a"] and "CPU" in plan.evict[0].reason


def test_target_that_cannot_fit_even_alone() -> None:
    r = reg(model("a", 8001, util=0.5) + model("huge", 8002, gpus="[]", extra="cpus = 8"),
            host="cpus = 4")
    plan = plan_switch(r, obs(up("a")), "huge")
    assert kinds(plan.violations) == ["cpu-oversubscribed"] and plan.evict == ()


def test_describe_plan() -> None:
    r = load_registry(ROOT / "models.toml")
    text = describe_plan(plan_switch(r, obs(up("qwen-7b")), "qwen-32b"))
    assert text.splitlines()[0] == "switch to qwen-32b:"
    assert "sleep qwen-7b" in text and "start qwen-32b" in text
    blocked = describe_plan(plan_switch(r, obs(up("qwen-7b", busy=True)), "qwen-32b"))
    assert blocked.startswith("cannot switch to qwen-32b:") and "[busy]" in blocked


# --- check_registry ------------------------------------------------------------------


def test_shipped_registry_is_consistent() -> None:
    assert check_registry(load_registry(ROOT / "models.toml")) == []


def test_check_registry_finds_autostart_overcommit_and_oversized_models() -> None:
    r = reg(model("a", 8001) + model("b", 8002) + model("c", 8003)
            + model("d", 8004, util=0.45, extra="autostart = false")
            + model("e", 8005, gpus="[1]", util=0.99))
    found = check_registry(r)
    assert ("gpu-overcommit", True) in {(v.kind, v.message.startswith("autostart")) for v in found}
    assert any(v.message.startswith("e alone:") for v in found)
    # d (autostart = false) is only checked alone, where it fits.
    assert all("d 0.45" not in v.message for v in found)
    assert any("together (a, b, c, e)" in v.message for v in found)


def test_check_registry_reports_spec_errors() -> None:
    r = reg('[models.local]\nsource = "./weights"\nport = 8001\n')
    assert kinds(check_registry(r)) == ["spec"]


# --- replicas ---------------------------------------------------------------------------


def rep(n: int) -> str:
    return f"replicas = {n}"


def auto(lo: int, hi: int) -> str:
    return f"min_replicas = {lo}\nmax_replicas = {hi}\ntarget_ongoing_requests = 4"


def test_every_awake_replica_counts_its_fraction() -> None:
    r = reg(model("a", 8001, util=0.3, extra=rep(2)) + model("b", 8010, util=0.3)
            + model("c", 8011, util=0.4))
    assert check_placement(r, ["a", "b"]) == []          # a's 2 replicas: 0.3 + 0.3 + 0.3
    (v,) = check_placement(r, ["a", "c"])                 # 0.6 + 0.4 > 0.95
    assert v.kind == "gpu-overcommit" and "a 2x0.3 + c 0.4 = 1" in v.message
    assert check_placement(r, {"a": 1, "c": 1}) == []     # one replica of a awake
    assert check_placement(r, {"a": [1], "c": [0]}) == []
    assert check_placement(r, {"a": 0, "c": 1, "b": 1}) == []


def test_names_count_with_their_initial_replicas() -> None:
    r = reg(model("a", 8001, util=0.3, extra=auto(2, 3)))
    assert check_placement(r, ["a"]) == []                # 2 x 0.3
    assert kinds(check_placement(r, {"a": 4})) == ["gpu-overcommit"]


def test_a_dedicated_models_replicas_cannot_share_its_gpu() -> None:
    r = reg(model("big", 8001, util=0.4, extra="dedicated = true\n" + rep(2)))
    (v,) = check_placement(r, ["big"])
    assert v.kind == "dedicated-conflict" and "1 more replica(s) of big" in v.message
    assert check_placement(r, {"big": 1}) == []


def test_cpu_budget_counts_replicas_and_each_has_its_own_cores() -> None:
    r = reg(model("a", 8001, gpus="[]", extra="cpus = 1\n" + rep(2))
            + model("b", 8010, gpus="[]", extra="cpus = 1"), host="cpus = 3\ngateway_cpus = 0")
    assert assign_replica_cpusets(r, r.names()) == {("a", 0): "0", ("a", 1): "1", ("b", 0): "2"}
    assert assign_cpusets(r, r.names()) == {"a": "0", "b": "2"}   # replica 0's
    assert check_placement(r, ["a", "b"]) == []
    (v,) = check_placement(reg(model("a", 8001, gpus="[]", extra="cpus = 1\n" + rep(2))
                               + model("b", 8010, gpus="[]", extra="cpus = 1"),
                               host="cpus = 2\ngateway_cpus = 0"), ["a", "b"])
    assert v.kind == "cpu-oversubscribed" and "a 2x1 + b 1" in v.message


def test_replicas_that_exclude_each_other_on_a_gpu_may_share_cores() -> None:
    # two replicas at 0.6 on GPU 0 can never be awake together: the second reuses the cores
    r = reg(model("a", 8001, util=0.6, extra="cpus = 1\n" + auto(1, 2)),
            host="gpus = [{ id = 0 }]\ncpus = 1\ngateway_cpus = 0")
    assert assign_replica_cpusets(r, ["a"]) == {("a", 0): "0", ("a", 1): "0"}


def test_fragmented_replica_cores_are_reported() -> None:
    # a's slot 1 wraps onto core 0 (only 2 cores for 3 one-core slots): a[1] + b collide
    r = reg(model("a", 8001, gpus="[]", extra="cpus = 1\n" + auto(1, 2))
            + model("b", 8010, gpus="[]", extra="cpus = 1"), host="cpus = 2\ngateway_cpus = 0")
    sets = assign_replica_cpusets(r, r.names())
    assert sets[("a", 0)] == "0" and sets[("a", 1)] == "1" and sets[("b", 0)] == "0"
    assert kinds(check_placement(r, {"a": [1], "b": 1})) == []
    (v,) = check_placement(r, {"a": [0], "b": 1})
    assert v.kind == "cpu-oversubscribed"
    assert "b and a replica 0 are both pinned to core 0" in v.message


def test_replica_specs_cover_every_slot() -> None:
    r = reg(model("a", 8001, gpus="[]", extra="cpus = 1\n" + auto(1, 3)),
            host="cpus = 4\ngateway_cpus = 1")
    specs = replica_specs(r)["a"]
    assert [(s.name, s.port, s.cpuset_cpus, s.replica) for s in specs] == [
        ("vllm-fleet-a", 8001, "1", 0), ("vllm-fleet-a-r1", 8002, "2", 1),
        ("vllm-fleet-a-r2", 8003, "3", 2)]
    assert fleet_specs(r)["a"] == specs[0]


def test_model_state_of_replicas() -> None:
    assert model_state([]) == "absent"
    assert model_state(["healthy", "healthy"]) == "healthy"
    assert model_state(["healthy", "loading"]) == "loading"
    assert model_state(["healthy", "running"]) == "running"
    assert model_state(["healthy", "absent"]) == "absent"
    assert model_state(["sleeping", "absent"]) == "sleeping"
    assert model_state(["healthy", "stopped"]) == "stopped"
    assert model_state(["sleeping", "drifted"]) == "drifted"


def test_switch_counts_every_replica_of_the_target_and_of_the_others() -> None:
    r = reg(model("a", 8001, util=0.3, extra=rep(2)) + model("b", 8010, util=0.3)
            + model("t", 8011, util=0.3, extra=rep(2)))
    observed = obs(ObservedModel("a", "healthy", last_used=5, replicas=(0, 1)), up("b", 9))
    plan = plan_switch(r, observed, "t")
    # t's 2 x 0.3 needs 0.6 free: evicting b (0.3) is not enough, a (2 x 0.3) is
    assert plan.ok and [e.model for e in plan.evict] == ["a"]
    # with only one replica of a awake, evicting b alone would not do either: a it is
    observed = obs(ObservedModel("a", "healthy", last_used=5, replicas=(0,)), up("b", 9))
    assert [e.model for e in plan_switch(r, observed, "t").evict] == ["a"]
    # asking for one replica of t: it fits beside a[0] and b
    assert plan_switch(r, observed, "t", replicas=[0]).evict == ()


def test_switch_target_with_replicas_that_cannot_fit_alone() -> None:
    r = reg(model("t", 8001, util=0.5, extra=rep(2)))
    plan = plan_switch(r, {}, "t")
    assert kinds(plan.violations) == ["gpu-overcommit"] and "t 2x0.5" in plan.violations[0].message


def test_check_registry_checks_every_model_at_its_max_replicas() -> None:
    r = reg(model("a", 8001, util=0.4, extra=auto(1, 3)))
    (v,) = check_registry(r)
    assert v.kind == "gpu-overcommit"
    assert v.message.startswith("a alone with all 3 replicas (max_replicas): GPU 0: a 3x0.4")
    assert check_registry(reg(model("a", 8001, util=0.3, extra=auto(1, 3)))) == []
