"""The scheduler core, event by event, with a simulated clock (no I/O, no sleeps)."""

from __future__ import annotations

import pytest

from gateway.scheduler.core import SchedulerCore
from gateway.scheduler.events import (
    Admit,
    Arrive,
    BringUp,
    Done,
    Drain,
    Leave,
    Reject,
    Residency,
    StartSwitch,
    SwitchDone,
    Tick,
    Undrain,
)
from gateway.scheduler.model import ModelPolicy, SchedulerConfig

pytestmark = pytest.mark.unit

A, S = Residency.AWAKE, Residency.STOPPED


def one_slot(names: frozenset[str]) -> list[str]:
    """Budget: one model at a time (per group, the core asks per group)."""
    return [] if len(names) <= 1 else [f"{sorted(names)} do not fit together"]


def core(*policies: ModelPolicy, states: dict[str, Residency], floor: float = 5.0,
         fits=one_slot) -> SchedulerCore:  # type: ignore[no-untyped-def]
    return SchedulerCore(policies, fits, now=0.0, states=states,
                         config=SchedulerConfig(quantum_floor=floor))


def kinds(actions: list[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_an_awake_model_admits_at_once_and_a_cold_one_is_switched_in() -> None:
    c = core(ModelPolicy("a"), ModelPolicy("b"), states={"a": A, "b": S})
    assert c.handle(Arrive(0.0, 1, "a")) == [Admit(1, "a", 0.0)]
    c.handle(Done(0.5, 1))
    out = c.handle(Arrive(1.0, 2, "b"))  # a is idle: evicted at once
    assert out == [StartSwitch("b", ("a",), out[0].kind, out[0].reason)]  # type: ignore[union-attr]
    assert c.models["a"].state is Residency.EVICTING
    out = c.handle(SwitchDone(4.0, "b", 3.0, {"a": S}))
    assert out == [Admit(2, "b", 3.0)]


def test_a_busy_model_keeps_its_quantum_then_drains_and_new_requests_wait() -> None:
    c = core(ModelPolicy("a"), ModelPolicy("b"), states={"a": A, "b": S}, floor=5.0)
    c.handle(Arrive(0.0, 1, "a"))
    assert c.handle(Arrive(1.0, 2, "b")) == []       # a is busy, within its quantum
    assert c.next_wakeup() == 5.0                    # resident since 0, quantum 5 s
    assert kinds(c.handle(Arrive(2.0, 3, "a"))) == ["Admit"]  # still a's turn
    out = c.handle(Tick(5.0))
    assert out == [Drain("a", out[0].reason)]         # type: ignore[union-attr]
    assert c.handle(Arrive(5.5, 4, "a")) == []        # draining: a's new request waits
    assert c.models["a"].waiting == 1
    c.handle(Done(6.0, 1))
    out = c.handle(Done(6.5, 3))                      # drained: the switch starts
    assert kinds(out) == ["StartSwitch"] and out[0].target == "b"  # type: ignore[union-attr]
    out = c.handle(SwitchDone(9.0, "b", 2.5, {"a": S}))
    assert out == [Admit(2, "b", 8.0)]
    # b idle, a waits: b goes at once (its one client has not shown it sends back to back,
    # so no idle_grace), and a comes back
    out = c.handle(Done(9.5, 2))
    assert kinds(out) == ["StartSwitch"] and out[0].target == "a"  # type: ignore[union-attr]
    assert c.models["b"].state is Residency.EVICTING


def test_a_rival_that_leaves_undrains_and_never_triggers_a_switch() -> None:
    c = core(ModelPolicy("a"), ModelPolicy("b"), states={"a": A, "b": S}, floor=1.0)
    c.handle(Arrive(0.0, 1, "a"))
    c.handle(Arrive(0.5, 2, "b"))
    assert kinds(c.handle(Tick(1.0))) == ["Drain"]
    out = c.handle(Leave(1.2, 2))                     # b's client went away
    assert kinds(out) == ["Undrain"] and isinstance(out[0], Undrain)
    assert c.models["a"].state is A and c.models["b"].waiting == 0
    assert c.handle(Done(2.0, 1)) == []               # no switch for an empty queue


def test_past_its_deadline_a_request_is_told_where_it_stood_and_why() -> None:
    c = core(ModelPolicy("a", quantum=100.0), ModelPolicy("b", switch_timeout=10.0),
             states={"a": A, "b": S})
    c.handle(Arrive(0.0, 1, "a"))
    c.handle(Arrive(1.0, 2, "b"))
    c.handle(Arrive(1.5, 3, "b"))
    out = c.handle(Tick(31.0))  # queue_timeout 30 and switch_timeout 10: 30 s bound
    assert [type(a) for a in out] == [Reject] and isinstance(out[0], Reject)
    assert out[0].status == 503 and out[0].retry_after >= 1
    assert "position 1 of 2" in out[0].message and "`a`" in out[0].message


def test_pinned_models_are_never_evicted() -> None:
    c = core(ModelPolicy("a", pinned=True), ModelPolicy("b"), states={"a": A, "b": S})
    out = c.handle(Arrive(0.0, 1, "b"))
    assert isinstance(out[0], Reject) and "pinned" in out[0].message
    assert c.models["a"].state is A


def test_nodes_take_turns_independently() -> None:
    c = core(ModelPolicy("a1", group="n1"), ModelPolicy("b1", group="n1"),
             ModelPolicy("a2", group="n2"), ModelPolicy("b2", group="n2"),
             states={"a1": A, "b1": S, "a2": A, "b2": S})
    first = c.handle(Arrive(0.0, 1, "b1"))
    second = c.handle(Arrive(0.1, 2, "b2"))  # n1's switch runs: n2 does not wait for it
    assert [a.target for a in first + second if isinstance(a, StartSwitch)] == ["b1", "b2"]
    assert set(c.ops) == {"n1", "n2"}


def test_unmeasured_costs_do_not_inflate_the_quantum_measured_ones_do() -> None:
    c = core(ModelPolicy("a"), ModelPolicy("b"), states={"a": A, "b": S}, floor=2.0)
    a, b = c.models["a"], c.models["b"]
    assert c.quantum(a, b) == 2.0
    c.costs.record_evict("a", 1.0)
    c.costs.record_bring_up("b", BringUp.START, 3.0)
    assert c.quantum(a, b) == pytest.approx((1.0 + 3.0) * 4)  # switching <= 20 % of the time
