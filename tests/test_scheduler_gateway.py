"""The scheduler in the gateway, over real upstream sockets: the issue's workload.

Two models that cannot be awake together (one core for models), a fleet stand-in (the replay
benchmark's, benchmarks/replay_gateway.py) that starts a simulator process for the model it
brings up (3 s load) and stops the evicted one. Model A is never idle (4 clients back to
back); model B is asked every few seconds. With the old behaviour (drain-wait) B is starved:
its activation waits for A to go idle, which never happens, and B gets 503. With the
scheduler every request is answered and B waits a bounded time. The fleet stand-in checks
that nothing is evicted while it has requests in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from benchmarks.replay_gateway import TimeShareFleet
from support.ports import free_port
from test_gateway_serving import MSG, gateway

pytestmark = [pytest.mark.gateway, pytest.mark.anyio]


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
        holder.append(TimeShareFleet(ports, 3.0, busy, ttft_s=0.0, itl_s=0.02))
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
    assert all(target in ("a", "b") for _, _, target in fleet.switches)


async def test_the_old_behaviour_starves_it() -> None:
    results, _ = await run_workload("drain-wait", seconds=12.0, activation_timeout=5.0)
    b = [r for r in results if r[0] == "b"]
    # every B request sent while A's clients ran waited out its activation and got 503 (the
    # last one may be served once A's clients stop)
    assert sum(status == 503 for _, status, _ in b) >= 2, b
