"""The scheduler core's shortcuts (`SchedulerCore.shortcuts`) change no decision.

A request that ends for a model that does not take turns skips the full decision pass
(gateway/scheduler/core.py, `_finish`). Random workloads mixing such models (with slot limits,
so they queue) with time-shared ones (turns, evictions, ttls, clients leaving) are replayed
twice on the simulated clock, with the shortcuts and without: every request's outcome, every
switch and the whole timeline must be the same.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.scheduler.core import SchedulerCore
from gateway.scheduler.replay import ClosedLoop, Replay, SimModel, SimRequest, replay

pytestmark = pytest.mark.unit


@st.composite
def mixed(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    budget = draw(st.integers(1, 3))
    models = []
    for i in range(draw(st.integers(2, 5))):
        shared = draw(st.booleans()) if i else False  # at least one that does not take turns
        models.append(SimModel(
            name=f"m{i}", shared=shared, size=draw(st.integers(1, budget)),
            load=draw(st.floats(0.1, 3.0)), wake=draw(st.floats(0.05, 1.0)),
            evict=draw(st.floats(0.0, 1.0)), sleep_mode=draw(st.booleans()),
            max_concurrency=draw(st.none() | st.integers(1, 3)),
            ttl=draw(st.none() | st.floats(1.0, 20.0))))
    names = [m.name for m in models]
    requests = draw(st.lists(st.builds(
        SimRequest, at=st.floats(0, 40), model=st.sampled_from(names),
        service=st.floats(0.01, 3.0), leave_after=st.none() | st.floats(0.0, 10.0)),
        max_size=60))
    loops = draw(st.lists(st.builds(
        ClosedLoop, model=st.sampled_from(names), clients=st.integers(1, 4),
        service=st.floats(0.05, 1.0), start=st.floats(0, 20), stop=st.floats(20, 40)),
        max_size=3))
    queue_timeout = draw(st.sampled_from([2.0, 30.0, 600.0]))
    return models, budget, requests, loops, queue_timeout


def _run(shortcuts: bool, case: tuple) -> Replay:  # type: ignore[type-arg]
    models, budget, requests, loops, queue_timeout = case
    saved = SchedulerCore.shortcuts
    SchedulerCore.shortcuts = shortcuts
    try:
        return replay(models, budget, requests, loops, queue_timeout=queue_timeout,
                      horizon=400.0)
    finally:
        SchedulerCore.shortcuts = saved


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mixed())
def test_the_shortcuts_change_no_decision(case: tuple) -> None:  # type: ignore[type-arg]
    fast, full = _run(True, case), _run(False, case)
    assert fast.outcomes == full.outcomes
    assert fast.switches == full.switches
    assert fast.timeline == full.timeline
    assert fast.end == full.end


def test_a_model_that_does_not_take_turns_still_queues_and_drains() -> None:
    """Two slots, five requests at once: three wait, and each is admitted as a slot frees
    (the shortcut must not skip the line)."""
    result = replay([SimModel("solo", shared=False, max_concurrency=2)], 1,
                    [SimRequest(0.0, "solo", 1.0) for _ in range(5)])
    assert [o.admitted for o in result.outcomes] == [0.0, 0.0, 1.0, 1.0, 2.0]
    assert all(o.status == 200 for o in result.outcomes)
