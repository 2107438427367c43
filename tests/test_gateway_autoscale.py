"""The gateway's autoscaling loop: sampled load -> fleet.autoscale.decide -> FleetClient.scale,
with the retiring replicas drained first. A fake fleet and a fake clock: no Docker, no sleeps."""

from __future__ import annotations

import pytest

from fleet.registry import parse_registry
from gateway.autoscale import Autoscaler
from gateway.balancer import Instance

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

REG = parse_registry("""
[models.m]
source = "org/m"
port = 9000
min_replicas = 1
max_replicas = 3
target_ongoing_requests = 2
upscale_delay = 10
downscale_delay = 30
[models.fixed]
source = "org/f"
port = 9100
""")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeFleet:
    def __init__(self, awake: int = 1, refuse: bool = False) -> None:
        self.awake = awake
        self.refuse = refuse
        self.calls: list[tuple[str, int]] = []

    def awake_replicas(self, model: str) -> int:
        return self.awake

    def scale(self, model: str, n: int, *, timeout: float | None = None) -> None:
        self.calls.append((model, n))
        if self.refuse:
            raise RuntimeError("no room: gpu 0 over budget")
        self.awake = n


def make(load: dict[str, float], fleet: FakeFleet, clock: Clock) -> tuple[Autoscaler, list[Instance]]:
    insts = [Instance("m", i, f"http://127.0.0.1:{9000 + i}") for i in range(3)]
    scaler = Autoscaler(fleet, REG.models, lambda name: load[name], lambda name: insts,
                        clock=clock, drain_timeout=0.5)
    return scaler, insts


async def run_for(scaler: Autoscaler, clock: Clock, seconds: int, step: float = 1.0) -> None:
    for _ in range(int(seconds / step)):
        clock.now += step
        await scaler.step()


async def test_only_autoscaled_models_and_initial_routing() -> None:
    clock, fleet = Clock(), FakeFleet(awake=1)
    scaler, insts = make({"m": 0}, fleet, clock)
    assert list(scaler.models) == ["m"]
    await scaler.step()
    assert [i.draining for i in insts] == [False, True, True]


async def test_sustained_load_adds_replicas_after_the_delay() -> None:
    clock, fleet = Clock(), FakeFleet(awake=1)
    load = {"m": 5.0}  # 5 in flight, target 2 per replica: wants 3
    scaler, insts = make(load, fleet, clock)
    await run_for(scaler, clock, 9)
    assert fleet.calls == []  # not before upscale_delay
    await run_for(scaler, clock, 3)
    assert fleet.calls == [("m", 3)]
    assert [i.draining for i in insts] == [False, False, False]


async def test_oscillating_load_does_not_flap() -> None:
    clock, fleet = Clock(), FakeFleet(awake=2)
    load = {"m": 0.0}
    scaler, _ = make(load, fleet, clock)
    for second in range(120):
        load["m"] = 4.0 if second % 6 < 3 else 1.0  # in and out of the band
        clock.now += 1
        await scaler.step()
    assert fleet.calls == []


async def test_idle_replicas_retire_after_the_cooldown_draining_first() -> None:
    clock, fleet = Clock(), FakeFleet(awake=3)
    load = {"m": 1.0}
    scaler, insts = make(load, fleet, clock)
    insts[2].outstanding = 0
    await run_for(scaler, clock, 29)
    assert fleet.calls == []
    await run_for(scaler, clock, 3)
    assert fleet.calls == [("m", 1)]  # the peak (1) fits in one replica
    assert [i.draining for i in insts] == [False, True, True]


async def test_refusal_restores_routing_and_backs_off() -> None:
    clock, fleet = Clock(), FakeFleet(awake=1, refuse=True)
    scaler, insts = make({"m": 6.0}, fleet, clock)
    await run_for(scaler, clock, 12)
    assert fleet.calls == [("m", 3)]
    assert [i.draining for i in insts] == [False, True, True]
    await run_for(scaler, clock, 5)
    assert fleet.calls == [("m", 3)]  # no retry inside the cooldown
