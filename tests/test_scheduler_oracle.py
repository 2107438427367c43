"""The replay benchmark's oracle (gateway/scheduler/oracle.py): the exact shortest makespan
with one model at a time, checked against hand-worked cases, an exhaustive search without
its pruning, the cheaper lower bound, and every policy's makespan in the simulated world."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.scheduler.oracle import lower_bound, optimum
from gateway.scheduler.replay import SimModel, SimRequest, replay

pytestmark = pytest.mark.unit

A = SimModel("a", load=3.0, evict=0.2, max_concurrency=2)
B = SimModel("b", load=2.0, evict=0.5, max_concurrency=2)


def test_one_request_each() -> None:
    # a (awake) answers at 1; evict 0.2 + load 2 for b: 3.2 .. 4.2 (b first would be longer)
    reqs = [SimRequest(0.0, "a", 1.0), SimRequest(0.0, "b", 1.0)]
    assert optimum(reqs, [A, B], awake=["a"]) == pytest.approx(4.2)


def test_it_knows_the_future() -> None:
    """b's second request comes at 5: the best schedule leaves a's early request waiting,
    serves both of b's in one turn and ends with a. No policy that cannot see the future
    does that; the oracle may."""
    reqs = [SimRequest(0.0, "b", 1.0), SimRequest(0.0, "a", 1.0), SimRequest(5.0, "b", 1.0)]
    # a at 0..1, switch 0.2 + 2 -> b from 3.2, b's second at 5 .. 6 = 6.0
    assert optimum(reqs, [A, B], awake=["a"]) == pytest.approx(6.0)
    # and with a sleep-mode b, waking is cheaper than loading after its first turn
    sleepy = SimModel("b", load=2.0, wake=0.5, evict=0.5, sleep_mode=True, max_concurrency=2)
    late_a = [*reqs, SimRequest(7.0, "a", 1.0)]
    # b first (evict a 0.2, load 2): b's first 2.2..3.2; a (evict 0.5, load 3) from 6.7, its
    # two answered by 8.0; b woken (evict 0.2, wake 0.5) at 8.7, its second by 9.7. Ending
    # with b's turn serving both of its requests would take until 10.5.
    assert optimum(late_a, [A, sleepy], awake=["a"]) == pytest.approx(9.7)


def test_concurrency_counts() -> None:
    # four requests of a at 0 over 2 slots: two rounds of 1 s
    assert optimum([SimRequest(0.0, "a", 1.0)] * 4, [A], awake=["a"]) == pytest.approx(2.0)


def test_it_refuses_what_it_cannot_solve_exactly() -> None:
    with pytest.raises(ValueError, match="different times"):
        optimum([SimRequest(0.0, "a", 1.0), SimRequest(0.0, "a", 2.0)], [A])
    with pytest.raises(ValueError, match="one model at a time"):
        optimum([SimRequest(0.0, "a", 1.0)], [A, B], awake=["a", "b"])


def exhaustive(requests: Sequence[SimRequest], models: Sequence[SimModel],
               awake: str) -> float:
    """Every sequence of turns, no pruning: the reference for small traces."""
    specs = {m.name: m for m in models}
    times = {n: sorted(r.at for r in requests if r.model == n) for n in specs}
    cost = {r.model: r.service for r in requests}
    names = [n for n in specs if times[n]]

    def serve(name: str, start: float, first: int, last: int) -> float:
        slots = [start] * (specs[name].max_concurrency or 99)
        end = start
        for k in range(first, last):
            begin = max(times[name][k], heapq.heappop(slots))
            heapq.heappush(slots, begin + cost[name])
            end = max(end, begin + cost[name])
        return end

    def bring(name: str, ever: frozenset[str]) -> float:
        s = specs[name]
        return s.wake if s.sleep_mode and name in ever else s.load

    def go(name: str, start: float, done: dict[str, int], ever: frozenset[str]) -> float:
        best = float("inf")
        for last in range(done[name] + 1, len(times[name]) + 1):
            end = serve(name, start, done[name], last)
            after = {**done, name: last}
            left = [n for n in names if after[n] < len(times[n])]
            if not left:
                best = min(best, end)
            for other in left:
                if other != name:
                    best = min(best, go(other, end + specs[name].evict + bring(other, ever),
                                        after, ever | {other}))
        return best

    done0 = {n: 0 for n in names}
    ever0 = frozenset({awake})
    return min(go(n, 0.0 if n == awake else specs[awake].evict + bring(n, ever0), done0,
                  ever0 | {n}) for n in names)


MODELS = [SimModel("a", load=3.0, evict=0.2, max_concurrency=2),
          SimModel("b", load=1.0, wake=0.3, evict=0.1, sleep_mode=True, max_concurrency=1),
          SimModel("c", load=2.0, evict=0.4, max_concurrency=3)]
SERVICE = {"a": 1.0, "b": 0.5, "c": 2.0}

traces = st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 40)), min_size=1,
                  max_size=6).map(lambda xs: [SimRequest(t / 4, m, SERVICE[m]) for m, t in xs])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(traces)
def test_the_search_is_exact_and_between_the_bound_and_every_policy(
        reqs: list[SimRequest]) -> None:
    best = optimum(reqs, MODELS, awake=["a"])
    assert best == pytest.approx(exhaustive(reqs, MODELS, "a"))
    assert best >= lower_bound(reqs, MODELS, 1, awake=["a"]) - 1e-9
    for policy in ("fair", "drain-wait"):
        result = replay(MODELS, 1, reqs, policy=policy, awake=["a"], queue_timeout=600.0,
                        switch_timeout=600.0)
        assert all(o.status == 200 for o in result.outcomes)
        makespan = max(o.finished or 0.0 for o in result.outcomes)
        assert makespan >= best - 1e-9, (policy, makespan, best)
