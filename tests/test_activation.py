"""On-demand activation: one shared activation, drain-and-retry, clear 503s, idle ttl."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from fleet.errors import ModelsBusy, PlacementRefused
from fleet.placement import Violation as FleetViolation
from gateway.activation import Activator, idle_loop
from gateway.errors import GatewayError

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


@dataclass
class Violation:
    kind: str
    message: str


def Refused(message: str, kinds: list[str]) -> PlacementRefused:
    """The fleet's typed refusal: ModelsBusy when a busy model is in the way."""
    violations = [FleetViolation(k, message) for k in kinds]
    return (ModelsBusy if "busy" in kinds else PlacementRefused)(message, violations)


class FakeFleet:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.release.set()
        self.failures: list[Exception] = []

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> None:
        self.calls.append(("ensure_awake", model))
        assert self.release.wait(10)
        if self.failures:
            raise self.failures.pop(0)

    def sleep(self, model: str) -> None:
        self.calls.append(("sleep", model))


async def test_concurrent_requests_share_one_activation() -> None:
    fleet = FakeFleet()
    fleet.release.clear()
    act = Activator(fleet, timeout=5, retry_after=3)
    waiters = [asyncio.create_task(act.activate("m")) for _ in range(20)]
    while not fleet.calls:
        await asyncio.sleep(0.01)
    assert act.pending("m")
    fleet.release.set()
    await asyncio.gather(*waiters)
    assert fleet.calls == [("ensure_awake", "m")] and act.activations == 1
    assert not act.pending("m")


async def test_busy_models_in_the_way_are_waited_for() -> None:
    fleet = FakeFleet()
    fleet.failures = [Refused("b is busy", ["busy"]), Refused("b is busy", ["busy"])]
    act = Activator(fleet, timeout=5, retry_after=3, drain_poll=0.01)
    await act.activate("m")
    assert fleet.calls == [("ensure_awake", "m")] * 3


async def test_failure_is_a_503_with_the_reason() -> None:
    fleet = FakeFleet()
    fleet.failures = [Refused("does not fit: gpu 0 over budget", ["gpu-overcommit"])]
    act = Activator(fleet, timeout=5, retry_after=7)
    with pytest.raises(GatewayError) as info:
        await act.activate("m")
    assert info.value.status == 503 and info.value.retry_after == 7
    assert "`m`" in info.value.message and "planner refused" in info.value.message
    # The fleet's own words (container logs, addresses) are for the log, not the caller.
    assert "gpu 0 over budget" not in info.value.message
    assert "gpu 0 over budget" in (info.value.internal or "")


async def test_busy_until_the_deadline_gives_up() -> None:
    fleet = FakeFleet()
    fleet.failures = [Refused("b is busy", ["busy"])] * 1000
    act = Activator(fleet, timeout=0.1, retry_after=1, drain_poll=0.02)
    with pytest.raises(GatewayError) as info:
        await act.activate("m")
    assert "busy" in info.value.message and "b is busy" not in info.value.message


async def test_a_waiter_that_goes_away_does_not_cancel_the_activation() -> None:
    fleet = FakeFleet()
    fleet.release.clear()
    act = Activator(fleet, timeout=5, retry_after=1)
    first = asyncio.create_task(act.activate("m"))
    second = asyncio.create_task(act.activate("m"))
    while not fleet.calls:
        await asyncio.sleep(0.01)
    first.cancel()
    fleet.release.set()
    await second
    assert act.activations == 1


async def test_idle_loop_sleeps_idle_models_once() -> None:
    fleet = FakeFleet()
    act = Activator(fleet, timeout=5, retry_after=1)
    idle = {"a": 100.0, "b": 1.0, "c": None}
    loop = asyncio.create_task(idle_loop(act, {"a": 10, "b": 10, "c": 10}, idle.get, 0.01))
    while "a" not in act.asleep:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    loop.cancel()
    assert fleet.calls == [("sleep", "a")]
    await act.activate("a")  # a request wakes it and clears the mark
    assert "a" not in act.asleep
