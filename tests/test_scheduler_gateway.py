"""The scheduler in the gateway, over real upstream sockets: the issue's workload.

Two models that cannot be awake together (one core for models), a fleet stand-in that starts
a simulator process for the model it brings up (3 s load) and stops the evicted one. Model A
is never idle (4 clients back to back); model B is asked every few seconds. With the old
behaviour (drain-wait) B is starved: its activation waits for A to go idle, which never
happens, and B gets 503. With the scheduler every request is answered and B waits a bounded
time. The fleet stand-in checks that nothing is evicted while it has requests in flight.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Collection

import httpx
import pytest

from fleet.errors import ModelsBusy
from support.ports import free_port
from support.sim_fixtures import SimServer, start_sim
from test_gateway_serving import MSG, gateway

pytestmark = [pytest.mark.gateway, pytest.mark.anyio]


class TimeShareFleet:
    """Brings one model up at a time: a simulator on the model's port; evicts by stopping."""

    def __init__(self, ports: dict[str, int], load_seconds: float,
                 busy: Callable[[str], bool]) -> None:
        self.ports = ports
        self.load_seconds = load_seconds
        self.busy = busy
        self.lock = threading.Lock()
        self.sims: dict[str, SimServer] = {}
        self.switches: list[tuple[str, tuple[str, ...]]] = []
        self.evicted_busy: list[str] = []

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: Collection[str] | None = None) -> object:
        with self.lock:
            if model in self.sims:
                return None
            others = [m for m in self.sims if m != model]
            blocking = [m for m in others if self.busy(m)]
            if evict is None and blocking:  # the old fleet's refusal: a busy model in the way
                raise _Busy(blocking)
            for m in others:
                if self.busy(m):
                    self.evicted_busy.append(m)
                self.sims.pop(m).stop()
            self.switches.append((model, tuple(others)))
            started = time.monotonic()
            self.sims[model] = start_sim(served_names=(model,), port=self.ports[model],
                                         load_seconds=self.load_seconds, itl_ms=20,
                                         timeout=60)
            return _Report({"evict": 0.0, "total": time.monotonic() - started})

    def sleep(self, model: str) -> None:
        with self.lock:
            sim = self.sims.pop(model, None)
            if sim is not None:
                sim.stop()

    def status(self) -> list[object]:
        with self.lock:
            return [_Row(m, "healthy" if m in self.sims else "stopped") for m in self.ports]

    def stop_all(self) -> None:
        for m in list(self.sims):
            self.sleep(m)


def _Busy(models: list[str]) -> ModelsBusy:
    return ModelsBusy(f"{', '.join(models)} busy", ())


class _Report:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings


class _Row:
    def __init__(self, model: str, state: str) -> None:
        self.model, self.state = model, state


REGISTRY = """
[host]
cpus = 2
gateway_cpus = 1
[models.a]
source = "org/a"
port = {a}
cpus = 1
[models.b]
source = "org/b"
port = {b}
cpus = 1
"""


async def run_workload(scheduler: str, seconds: float = 25.0, b_every: float = 5.0,
                       activation_timeout: float = 60.0) -> tuple[list[tuple[str, int, float]],
                                                                   TimeShareFleet]:
    ports = {"a": free_port(), "b": free_port()}
    holder: list[TimeShareFleet] = []

    def opener(busy: Callable[[str], bool], last_used: object) -> TimeShareFleet:
        holder.append(TimeShareFleet(ports, 3.0, busy))
        return holder[-1]

    results: list[tuple[str, int, float]] = []
    try:
        async with gateway(REGISTRY.format(**ports), opener, scheduler=scheduler,
                           activation_timeout=activation_timeout, quantum_floor=2.0,
                           observe_interval=1.0) as client:
            client.timeout = httpx.Timeout(120)
            fleet = holder[0]
            # A starts awake (as after `fleet up`); the gateway sees it within a second.
            await asyncio.to_thread(fleet.ensure_awake, "a", evict=())
            end = time.monotonic() + seconds

            async def one(model: str) -> None:
                started = time.monotonic()
                resp = await client.post("/v1/chat/completions", json={
                    "model": model, "messages": MSG, "max_tokens": 5})
                results.append((model, resp.status_code, time.monotonic() - started))

            async def a_client() -> None:
                while time.monotonic() < end:
                    await one("a")

            async def b_client() -> None:  # open loop: one request every b_every seconds
                sent: list[asyncio.Task[None]] = []
                while time.monotonic() < end:
                    sent.append(asyncio.create_task(one("b")))
                    await asyncio.sleep(b_every)
                await asyncio.gather(*sent)

            await asyncio.gather(*(a_client() for _ in range(4)), b_client())
    finally:
        for fleet in holder:
            await asyncio.to_thread(fleet.stop_all)
    return results, holder[0]


async def test_the_scheduler_serves_a_model_whose_rival_is_never_idle() -> None:
    results, fleet = await run_workload("fair")
    b = [r for r in results if r[0] == "b"]
    a = [r for r in results if r[0] == "a"]
    assert {status for _, status, _ in results} == {200}, results
    assert len(b) >= 3 and max(t for _, _, t in b) < 20.0, b
    assert len(a) > 4 * len(b)  # A still served most of the time
    assert fleet.evicted_busy == []  # drained first, never evicted with requests in flight
    assert all(target in ("a", "b") for target, _ in fleet.switches)


async def test_the_old_behaviour_starves_it() -> None:
    results, _ = await run_workload("drain-wait", seconds=12.0, activation_timeout=5.0)
    b = [r for r in results if r[0] == "b"]
    # every B request sent while A's clients ran waited out its activation and got 503 (the
    # last one may be served once A's clients stop)
    assert sum(status == 503 for _, status, _ in b) >= 2, b
