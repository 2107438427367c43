"""Autoscaling replicas from the load the gateway sees.

Every `interval` seconds, each autoscaled model's in-flight plus queued requests are sampled;
`fleet.autoscale.decide` (pure: hysteresis and cooldowns, no flapping) says how many replicas
it should have; the fleet starts or stops them (`FleetClient.scale`, which never evicts
another model and refuses when the planner has no room). Before scaling down, the replicas
that will be stopped (the highest indices) stop getting new requests and their in-flight
requests drain, with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import anyio

from fleet.autoscale import Sample, decide, replica_bounds, trim
from fleet.registry import ModelSpec
from gateway.balancer import Instance

log = logging.getLogger("gateway.autoscale")


class ScalingFleet(Protocol):
    def awake_replicas(self, model: str) -> int: ...

    def scale(self, model: str, n: int, *, timeout: float | None = None) -> object: ...


class Autoscaler:
    """Samples load, decides and acts; `step()` is one round (tests call it directly)."""

    def __init__(self, fleet: ScalingFleet, models: Mapping[str, ModelSpec],
                 load: Callable[[str], float], replicas: Callable[[str], Sequence[Instance]],
                 *, clock: Callable[[], float] = time.monotonic, drain_timeout: float = 60.0,
                 scale_timeout: float = 600.0) -> None:
        self.fleet = fleet
        self.models: dict[str, ModelSpec] = {}
        self.samples: dict[str, list[Sample]] = {}
        self.last_change: dict[str, float | None] = {}
        self.set_models(models)
        self.load = load
        self.replicas = replicas
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.scale_timeout = scale_timeout
        self.current: dict[str, int] = {}
        self.changes: list[tuple[str, int, int]] = []  # (model, from, to), for tests and logs

    def set_models(self, models: Mapping[str, ModelSpec]) -> None:
        """Autoscale the autoscaled managed models of `models` (a reload keeps the history of
        models that stay)."""
        self.models = {n: m for n, m in models.items() if m.autoscaled and m.managed}
        self.samples = {n: self.samples.get(n, []) for n in self.models}
        self.last_change = {n: self.last_change.get(n) for n in self.models}

    async def step(self) -> None:
        now = self.clock()
        for name, spec in self.models.items():
            keep = max(spec.upscale_delay, spec.downscale_delay) + 1.0
            self.samples[name] = trim([*self.samples[name], Sample(now, self.load(name))], now,
                                      keep)
            if name not in self.current:
                self.current[name] = await anyio.to_thread.run_sync(self.fleet.awake_replicas,
                                                                    name)
                self._route_to(name, self.current[name])
            current = self.current[name]
            low, high = replica_bounds(spec)
            assert spec.target_ongoing_requests is not None
            want = decide(current, self.samples[name], spec.target_ongoing_requests, low, high,
                          now=now, last_change=self.last_change[name],
                          upscale_delay=spec.upscale_delay,
                          downscale_delay=spec.downscale_delay)
            if want != current:
                await self._scale(name, current, want)

    async def _scale(self, name: str, current: int, want: int) -> None:
        if want < current:
            self._route_to(name, want)  # stop sending to the replicas about to be stopped
            deadline = self.clock() + self.drain_timeout
            retiring = [i for i in self.replicas(name) if i.index >= want]
            while any(i.outstanding for i in retiring) and self.clock() < deadline:
                await asyncio.sleep(0.1)
        try:
            await anyio.to_thread.run_sync(
                lambda: self.fleet.scale(name, want, timeout=self.scale_timeout))
        except Exception as exc:
            log.warning("autoscale %s %d -> %d refused: %s", name, current, want, exc)
            self._route_to(name, current)
            self.last_change[name] = self.clock()  # back off: no retry before the cooldown
            return
        log.info("autoscaled %s from %d to %d replicas", name, current, want)
        self.changes.append((name, current, want))
        self.current[name] = want
        self.last_change[name] = self.clock()
        self._route_to(name, want)

    def _route_to(self, name: str, count: int) -> None:
        """Route to replicas 0..count-1 only (the fleet keeps replicas contiguous)."""
        for inst in self.replicas(name):
            inst.draining = inst.index >= count
            if not inst.draining:
                inst.failures, inst.ejected_until = 0, 0.0

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.step()
            except Exception as exc:  # a Docker hiccup must not end autoscaling
                log.warning("autoscale round failed: %s", exc)
