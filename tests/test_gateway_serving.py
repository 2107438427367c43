"""Serving behaviour over real upstream sockets (simulator processes): replicas and
failover, concurrency limits with a bounded queue, on-demand activation through a fleet.

The gateway runs in-process (ASGI) so a fake fleet can be plugged in; every upstream is a
real simulator process on a real port.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from fleet.registry import parse_registry
from gateway.app import create_app
from gateway.settings import GatewaySettings
from support.ports import consecutive_free_ports, free_port
from support.sim_fixtures import SimServer, start_sim

pytestmark = [pytest.mark.gateway, pytest.mark.anyio]

MSG = [{"role": "user", "content": "Hello"}]


@asynccontextmanager
async def gateway(registry_text: str, fleet_opener: Callable[..., object] | None = None,
                  **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(parse_registry(registry_text), GatewaySettings(**settings),
                     fleet_opener=fleet_opener)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def requests_seen(sim: SimServer) -> list[dict[str, object]]:
    return httpx.get(sim.url("/sim/requests"), timeout=5).json()["requests"]


async def chat(client: httpx.AsyncClient, model: str, **extra: object) -> httpx.Response:
    return await client.post("/v1/chat/completions",
                             json={"model": model, "messages": MSG, "max_tokens": 2, **extra})


async def test_replicas_share_load_and_a_dead_one_is_routed_around(sim_factory) -> None:
    a = sim_factory(served_names=("m",), itl_ms=20)
    b = sim_factory(served_names=("m",), itl_ms=20)
    dead = f"http://127.0.0.1:{free_port()}"
    reg = f'[models.m]\nurl = ["{a.base_url}", "{dead}", "{b.base_url}"]\n'
    async with gateway(reg) as client:
        results = await asyncio.gather(*(chat(client, "m", max_tokens=5) for _ in range(12)))
        assert [r.status_code for r in results] == [200] * 12
        served_a, served_b = len(requests_seen(a)), len(requests_seen(b))
        assert served_a + served_b == 12 and served_a >= 3 and served_b >= 3
        gw = client.app.state.gateway  # type: ignore[attr-defined]
        dead_replica = gw.state.instances["m"][1]
        assert dead_replica.failures >= 1 and "refused" in dead_replica.last_error


def test_no_retry_once_bytes_reached_the_client(sim_factory, gateway_factory) -> None:
    a = sim_factory(served_names=("m",), itl_ms=100)
    b = sim_factory(served_names=("m",), itl_ms=100)
    gw = gateway_factory(f'[models.m]\nurl = ["{a.base_url}", "{b.base_url}"]\n')
    body = {"model": "m", "messages": MSG, "max_tokens": 50, "stream": True}
    with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", json=body,
                      timeout=10) as resp:  # a real socket: the stream arrives as generated
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        served = a if requests_seen(a) else b
        other = b if served is a else a
        served.process.kill()
        rest = list(lines)
    assert any('"code":502' in line for line in rest), rest[-3:]
    assert "data: [DONE]" not in rest
    assert requests_seen(other) == []  # the broken stream was not replayed elsewhere


async def test_overload_gets_fast_429_and_the_queue_is_bounded(sim_factory) -> None:
    sim = sim_factory(served_names=("m",), itl_ms=100)
    reg = (f'[models.m]\nurl = "{sim.base_url}"\nmax_concurrency = 2\nmax_queue = 3\n'
           f"queue_timeout = 20\n")
    async with gateway(reg) as client:
        results = await asyncio.gather(*(chat(client, "m", max_tokens=5) for _ in range(10)))
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200] * 5 + [429] * 5
        rejected = [r for r in results if r.status_code == 429]
        assert all(r.headers["retry-after"] and r.json()["error"]["code"] == 429
                   for r in rejected)
        assert "2 concurrent requests and 3 queued" in rejected[0].json()["error"]["message"]
        assert max(r["running"] for r in [httpx.get(sim.url("/sim/requests")).json()]) == 0


class SimFleet:
    """A fleet stand-in that 'starts' a model by launching a simulator on its port."""

    def __init__(self, port: int, load_seconds: float) -> None:
        self.port = port
        self.load_seconds = load_seconds
        self.lock = threading.Lock()
        self.calls = 0
        self.sim: SimServer | None = None

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> None:
        with self.lock:
            self.calls += 1
            if self.sim is None:
                self.sim = start_sim(served_names=(model,), port=self.port,
                                     load_seconds=self.load_seconds, timeout=30)

    def sleep(self, model: str) -> None:
        with self.lock:
            if self.sim is not None:
                self.sim.stop()
                self.sim = None


async def test_activation_while_20_requests_wait(tmp_path) -> None:
    port = free_port()
    fleet = SimFleet(port, load_seconds=1.0)
    reg = f'[models.m]\nsource = "org/m"\nport = {port}\n'
    try:
        async with gateway(reg, lambda busy, last_used: fleet) as client:
            results = await asyncio.gather(*(chat(client, "m") for _ in range(20)))
            assert [r.status_code for r in results] == [200] * 20
            assert fleet.calls == 1  # one activation served all twenty
            gw = client.app.state.gateway  # type: ignore[attr-defined]
            assert gw.activator.activations == 1
    finally:
        fleet.sleep("m")


async def test_idle_ttl_puts_the_model_to_sleep_and_a_request_wakes_it() -> None:
    port = free_port()
    fleet = SimFleet(port, load_seconds=0.0)
    reg = f'[models.m]\nsource = "org/m"\nport = {port}\nttl = 0.2\n'
    try:
        async with gateway(reg, lambda busy, last_used: fleet,
                           idle_check_interval=0.05) as client:
            assert (await chat(client, "m")).status_code == 200
            gw = client.app.state.gateway  # type: ignore[attr-defined]
            for _ in range(200):  # poll with a deadline (10 s)
                if "m" in gw.activator.asleep:
                    break
                await asyncio.sleep(0.05)
            assert "m" in gw.activator.asleep and fleet.sim is None
            assert (await chat(client, "m")).status_code == 200
            assert fleet.calls == 2
    finally:
        fleet.sleep("m")


async def test_without_a_fleet_a_stopped_model_is_a_502() -> None:
    reg = f'[models.m]\nsource = "org/m"\nport = {free_port()}\n'
    async with gateway(reg) as client:
        resp = await chat(client, "m")
        assert resp.status_code == 502 and "fleet up m" in resp.json()["error"]["message"]


class ReplicaFleet:
    """A fleet stand-in whose replicas are simulator processes on the replica ports."""

    def __init__(self, name: str, base_port: int) -> None:
        self.name, self.base_port = name, base_port
        self.lock = threading.Lock()
        self.sims: dict[int, SimServer] = {}
        self.scaled: list[int] = []

    def _start(self, i: int) -> None:
        if i not in self.sims:
            self.sims[i] = start_sim(served_names=(self.name,), port=self.base_port + i,
                                     itl_ms=50, timeout=30)

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> None:
        with self.lock:
            self._start(0)

    def sleep(self, model: str) -> None:
        self.scale(model, 0)

    def awake_replicas(self, model: str) -> int:
        return len(self.sims)

    def scale(self, model: str, n: int, *, timeout: float | None = None) -> None:
        with self.lock:
            self.scaled.append(n)
            for i in range(n):
                self._start(i)
            for i in sorted(self.sims, reverse=True):
                if i >= n:
                    self.sims.pop(i).stop()

    def stop_all(self) -> None:
        self.scale(self.name, 0)


async def test_autoscaling_adds_a_replica_under_load_and_retires_it_when_idle() -> None:
    base = consecutive_free_ports(2)
    fleet = ReplicaFleet("m", base)
    fleet.ensure_awake("m")
    reg = (f'[models.m]\nsource = "org/m"\nport = {base}\nmin_replicas = 1\nmax_replicas = 2\n'
           f"target_ongoing_requests = 2\nupscale_delay = 0.5\ndownscale_delay = 1.5\n")
    try:
        async with gateway(reg, lambda busy, last_used: fleet, autoscale_interval=0.1) as client:
            gw = client.app.state.gateway  # type: ignore[attr-defined]
            # sustained load of 6 in flight (target 2 per replica): a second replica
            load = [asyncio.create_task(chat(client, "m", max_tokens=40)) for _ in range(6)]
            for _ in range(100):  # poll with a deadline (10 s)
                if gw.autoscaler is not None and gw.autoscaler.changes:
                    break
                await asyncio.sleep(0.1)
            assert gw.autoscaler.changes == [("m", 1, 2)]
            assert fleet.scaled == [2] and len(fleet.sims) == 2
            assert [r.status_code for r in await asyncio.gather(*load)] == [200] * 6
            served = await asyncio.gather(*(chat(client, "m", max_tokens=10) for _ in range(4)))
            assert all(r.status_code == 200 for r in served)
            assert all(requests_seen(s) for s in fleet.sims.values())  # both replicas served
            for _ in range(100):  # idle now: back to one replica after the cooldown
                if len(gw.autoscaler.changes) == 2:
                    break
                await asyncio.sleep(0.1)
            assert gw.autoscaler.changes == [("m", 1, 2), ("m", 2, 1)]
            assert fleet.scaled == [2, 1] and list(fleet.sims) == [0]
            assert [i.draining for i in gw.state.instances["m"]] == [False, True]
            assert (await chat(client, "m")).status_code == 200
    finally:
        fleet.stop_all()


class WakingFleet:
    """A fleet stand-in for one sleep-mode model: ensure_awake wakes the engine."""

    def __init__(self, sim: SimServer) -> None:
        self.sim = sim
        self.calls = 0

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> None:
        self.calls += 1
        httpx.post(self.sim.url("/wake_up"), timeout=10).raise_for_status()

    def sleep(self, model: str) -> None:
        httpx.post(self.sim.url("/sleep?level=1"), timeout=10).raise_for_status()


async def test_a_model_put_to_sleep_elsewhere_is_woken_before_forwarding(sim_factory) -> None:
    sim = sim_factory(served_names=("m",), args=("--enable-sleep-mode",))
    fleet = WakingFleet(sim)
    reg = f'[models.m]\nsource = "org/m"\nport = {sim.port}\nsleep_mode = true\n'
    async with gateway(reg, lambda busy, last_used: fleet, sleep_check_interval=0) as client:
        assert (await chat(client, "m")).status_code == 200  # the gateway knows it awake
        calls = fleet.calls
        fleet.sleep("m")  # as `fleet switch other` would: the gateway was not told
        resp = await asyncio.wait_for(chat(client, "m"), 10)  # vLLM would hold it while asleep
        assert resp.status_code == 200 and fleet.calls == calls + 1
        assert httpx.get(sim.url("/is_sleeping")).json() == {"is_sleeping": False}
        assert (await chat(client, "m")).status_code == 200 and fleet.calls == calls + 1
