"""Property tests of the scheduler core over random workloads on a simulated clock.

The world (gateway.scheduler.replay) carries out every action and raises at the first broken
invariant: never over budget, a busy model is never evicted (only drained), no switch for an
empty queue, pinned models stay, nothing is admitted to a model that is not up. On top, every
request ends, none is rejected before its deadline, and with generous deadlines every request
is served within the bound the policy promises. The same properties fail for the old
behaviour (`drain-wait`): see test_old_behaviour_breaks_the_bound.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.scheduler.replay import ClosedLoop, SimModel, SimRequest, replay

pytestmark = pytest.mark.unit

QUANTUM_FLOOR = 5.0
SHARE = 0.2


@st.composite
def workloads(draw: st.DrawFn, *, loops: bool = True, leaving: bool = True):  # type: ignore[no-untyped-def]
    n = draw(st.integers(2, 4))
    budget = draw(st.integers(1, 3))
    models = []
    for i in range(n):
        models.append(SimModel(
            name=f"m{i}", size=draw(st.integers(1, budget)),
            load=draw(st.floats(0.1, 5.0)), wake=draw(st.floats(0.05, 1.0)),
            evict=draw(st.floats(0.0, 1.0)), sleep_mode=draw(st.booleans()),
            priority=draw(st.sampled_from([1.0, 1.0, 2.0])),
            ttl=draw(st.none() | st.floats(1.0, 20.0))))
    names = [m.name for m in models]
    requests = draw(st.lists(st.builds(
        SimRequest, at=st.floats(0, 60), model=st.sampled_from(names),
        service=st.floats(0.01, 3.0),
        leave_after=(st.none() | st.floats(0.0, 20.0)) if leaving else st.none()),
        max_size=60))
    closed = draw(st.lists(st.builds(
        ClosedLoop, model=st.sampled_from(names), clients=st.integers(1, 4),
        service=st.floats(0.05, 2.0), start=st.floats(0, 30), stop=st.floats(30, 60)),
        max_size=2)) if loops else []
    return models, budget, requests, closed


def bound(models: list[SimModel], service: float) -> float:
    """The longest wait the fair policy allows: every other model takes one turn first (its
    quantum, its in-flight requests draining, an eviction and a bring-up), then this one's
    own bring-up."""
    switch = max(m.evict for m in models) + max(m.load for m in models)
    quantum = max(QUANTUM_FLOOR, switch * (1 - SHARE) / SHARE)
    return len(models) * (quantum + service + switch) + switch


SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(workloads())
def test_invariants_hold_and_every_request_ends(workload) -> None:  # type: ignore[no-untyped-def]
    models, budget, requests, loops = workload
    result = replay(models, budget, requests, loops, quantum_floor=QUANTUM_FLOOR,
                    switch_share=SHARE, queue_timeout=30.0, switch_timeout=40.0)
    for o in result.outcomes:
        assert o.status != 0, f"request {o.rid} for {o.model} never ended"
        if o.status in (429, 503):
            assert o.finished is not None
            waited = o.finished - o.sent
            assert waited >= 30.0 - 1e-6, f"rejected after {waited:.2f} s, before its deadline"


@SETTINGS
@given(workloads())
def test_no_starvation_every_request_served_within_the_bound(workload) -> None:  # type: ignore[no-untyped-def]
    models, budget, requests, loops = workload
    result = replay(models, budget, requests, loops, quantum_floor=QUANTUM_FLOOR,
                    switch_share=SHARE, queue_timeout=1e6, switch_timeout=1e6)
    limit = bound(models, 3.0)
    for o in result.outcomes:
        if o.left:
            continue
        assert o.status == 200, f"request {o.rid} for {o.model}: {o.status} {o.message}"
        assert o.waited is not None and o.waited <= limit, (
            f"request {o.rid} for {o.model} waited {o.waited:.1f} s > bound {limit:.1f} s")


@SETTINGS
@given(workloads(loops=False), st.integers(0, 3))
def test_pinned_models_stay_and_only_fitting_requests_are_refused(workload, pin) -> None:  # type: ignore[no-untyped-def]
    models, budget, requests, _ = workload
    pin = min(pin, len(models) - 1)
    models[pin] = SimModel(**{**models[pin].__dict__, "pinned": True, "ttl": None})
    result = replay(models, budget, requests, (), awake=[models[pin].name],
                    queue_timeout=1e6, switch_timeout=1e6)
    sizes = {m.name: m.size for m in models}
    for o in result.outcomes:
        if o.left or o.status == 200:
            continue
        assert o.status == 503 and "pinned" in o.message
        assert sizes[o.model] + sizes[models[pin].name] > budget


def test_old_behaviour_breaks_the_bound() -> None:
    """The issue's workload: A never idle (4 clients back to back), B every 5 s, one slot."""
    models = [SimModel("A", load=3.0), SimModel("B", load=3.0)]
    requests = [SimRequest(5.0 * i + 1, "B", 0.5) for i in range(12)]
    loops = [ClosedLoop("A", 4, 0.5, 0.0, 60.0)]
    old = replay(models, 1, requests, loops, policy="drain-wait", awake=["A"],
                 queue_timeout=1e6, switch_timeout=1e6)
    new = replay(models, 1, requests, loops, awake=["A"], queue_timeout=1e6,
                 switch_timeout=1e6)
    limit = bound(models, 0.5)
    worst_old = max(o.waited or 0.0 for o in old.outcomes if o.model == "B")
    worst_new = max(o.waited or 0.0 for o in new.outcomes if o.model == "B")
    assert worst_old > 50.0 > limit  # B waits until A's clients stop at 60 s
    assert worst_new < 20.0
    assert all(o.status == 200 for o in new.outcomes)
