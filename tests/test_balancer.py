"""Replica choice: least outstanding, ejection with back-off, fallback when all are out."""

from __future__ import annotations

import pytest

from gateway.balancer import Balancer, Instance

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def replicas(n: int) -> list[Instance]:
    return [Instance("m", i, f"http://h:{9000 + i}") for i in range(n)]


def test_least_outstanding_then_lowest_index() -> None:
    b, r = Balancer(Clock()), replicas(3)
    assert b.pick(r) is r[0]
    r[0].outstanding, r[1].outstanding, r[2].outstanding = 2, 1, 1
    assert b.pick(r) is r[1]
    assert b.pick(r, exclude=[r[1]]) is r[2]
    assert b.pick(r, exclude=r) is None


def test_ejected_replica_is_skipped_until_backoff_ends() -> None:
    clock = Clock()
    b, r = Balancer(clock, base_backoff=1.0, max_backoff=4.0), replicas(2)
    b.eject(r[0], "refused")
    assert b.pick(r) is r[1] and r[0].last_error == "refused"
    clock.now += 1.01
    assert b.pick(r) is r[0]
    for _ in range(5):  # back-off doubles, capped
        b.eject(r[0], "again")
    assert r[0].ejected_until == pytest.approx(clock.now + 4.0)
    b.restore(r[0])
    assert (r[0].failures, b.pick(r)) == (0, r[0])


def test_all_ejected_tries_the_one_back_soonest() -> None:
    clock = Clock()
    b, r = Balancer(clock), replicas(2)
    b.eject(r[1], "x")
    clock.now += 0.5
    b.eject(r[0], "y")
    assert b.pick(r) is r[1]


def test_draining_replicas_get_no_new_requests() -> None:
    b, r = Balancer(Clock()), replicas(2)
    r[1].draining = True
    r[0].outstanding = 10
    assert b.pick(r) is r[0]
    r[0].draining = True
    assert b.pick(r) is None
