"""Hot reload: what changes, what carries over (replicas, counters, queues), an invalid
registry changing nothing, the fleet client rebuilt for the new registry, ttl picked up by
the idle loop (upstreams mocked with respx; a stream in flight across a reload of a real
gateway process is in test_gateway_service.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import respx

from fleet.registry import Registry, RegistryError, load_registry, parse_registry
from gateway.app import create_app
from gateway.reload import diff
from gateway.settings import GatewaySettings
from support.registries import WriteRegistry

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

A = "http://127.0.0.1:9501"
B = "http://127.0.0.1:9502"
ONE = f'[models.a]\nurl = "{A}"\n'
TWO = f'[models.a]\nurl = "{A}"\naliases = ["first"]\n[models.b]\nurl = "{B}"\n'


class Fleet:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> None:
        with self.lock:
            self.calls.append(("ensure_awake", model))

    def sleep(self, model: str) -> None:
        with self.lock:
            self.calls.append(("sleep", model))


class Opener:
    """Like the CLI's: opens a fleet client for one registry, and gives the next opener."""

    def __init__(self, registry: Registry, built: list[Fleet]) -> None:
        self.registry = registry
        self.built = built

    def __call__(self, busy: Callable[[str], bool], last_used: Callable[[str], float]) -> Fleet:
        fleet = Fleet(self.registry)
        self.built.append(fleet)
        return fleet

    def for_registry(self, registry: Registry) -> Opener:
        return Opener(registry, self.built)


async def serve(path: Path, fleet_opener: object = None, **settings: object
                ) -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    registry = load_registry(path)
    app = create_app(registry, GatewaySettings(registry=str(path), **settings),
                     fleet_opener=fleet_opener)  # type: ignore[arg-type]
    with respx.mock(assert_all_called=False) as mock:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gw") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client, mock


def gateway_of(client: httpx.AsyncClient):  # type: ignore[no-untyped-def]
    return client.app.state.gateway  # type: ignore[attr-defined]


def test_diff_names_added_removed_and_changed() -> None:
    result = diff(parse_registry(TWO), parse_registry(ONE + f'[models.c]\nurl = "{B}"\n'))
    assert (result.added, result.removed, result.changed) == (["c"], ["b"], ["a"])
    assert result.as_dict()["status"] == "reloaded" and result.models == ["a", "c"]


async def test_reload_swaps_routes_and_keeps_what_carries_over(
        write_registry: WriteRegistry) -> None:
    path = write_registry(ONE)
    async for client, mock in serve(path):
        mock.post(f"{A}/v1/completions").respond(200, json={"served": "a"})
        mock.post(f"{B}/v1/completions").respond(200, json={"served": "b"})
        gw = gateway_of(client)
        before = (gw.state.admission["a"], gw.state.instances["a"][0])
        gw.state.instances["a"][0].outstanding = 2  # a request in flight on it
        assert (await client.post("/v1/completions", json={"model": "b"})).status_code == 404
        path.write_text(TWO)
        result = await gw.reloader.reload()
        assert (result.added, result.changed, result.removed) == (["b"], ["a"], [])
        assert (await client.post("/v1/completions", json={"model": "b"})).json() == {
            "served": "b"}
        assert (await client.post("/v1/completions", json={"model": "first"})).json() == {
            "served": "a"}
        assert (gw.state.admission["a"], gw.state.instances["a"][0]) == before
        assert gw.state.instances["a"][0].outstanding == 2
        path.write_text(f'[models.b]\nurl = "{B}"\n')
        assert (await gw.reloader.reload()).removed == ["a"]
        assert (await client.post("/v1/completions", json={"model": "a"})).status_code == 404


async def test_invalid_registry_changes_nothing(write_registry: WriteRegistry) -> None:
    path = write_registry(TWO)
    async for client, mock in serve(path):
        mock.post(f"{B}/v1/completions").respond(200, json={"served": "b"})
        gw = gateway_of(client)
        table = gw.state.table
        path.write_text('[models.b]\nurl = "not a url"\n')
        with pytest.raises(RegistryError):
            await gw.reloader.reload()
        path.unlink()
        with pytest.raises(RegistryError):
            await gw.reloader.reload()
        assert gw.state.table is table
        assert (await client.post("/v1/completions", json={"model": "b"})).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'gateway_reloads_total{outcome="invalid"} 2.0' in metrics


async def test_fleet_client_is_rebuilt_for_the_new_registry(write_registry: WriteRegistry) -> None:
    path = write_registry(ONE)  # no managed model yet: no fleet client is built
    built: list[Fleet] = []
    async for client, _ in serve(path, Opener(parse_registry(ONE), built),
                                 idle_check_interval=0.05):
        gw = gateway_of(client)
        assert gw.activator is None and built == []
        path.write_text(ONE + '[models.m]\nsource = "org/m"\nport = 9503\n')
        await gw.reloader.reload()
        assert gw.activator is not None and len(built) == 1
        assert "m" in built[0].registry.models
        path.write_text(ONE + '[models.m]\nsource = "org/m"\nport = 9503\nttl = 0.1\n')
        await gw.reloader.reload()
        assert len(built) == 2 and built[1].registry.models["m"].ttl == 0.1
        # wrapped by the metrics, then by the dashboard's switch history
        assert gw.activator.fleet.fleet.fleet is built[1]
        for _ in range(200):  # the idle loop sees the new ttl (deadline: 10 s)
            if ("sleep", "m") in built[1].calls:
                break
            await asyncio.sleep(0.05)
        assert ("sleep", "m") in built[1].calls and built[0].calls == []


async def test_an_opener_bound_to_its_registry_keeps_its_client(
        write_registry: WriteRegistry) -> None:
    managed = '[models.m]\nsource = "org/m"\nport = 9503\n'
    path = write_registry(managed)
    fleet = Fleet(parse_registry(managed))
    async for client, _ in serve(path, lambda busy, last_used: fleet):
        gw = gateway_of(client)
        path.write_text(managed + ONE)
        await gw.reloader.reload()
        assert gw.activator.fleet.fleet.fleet is fleet and "a" in gw.state.table.routes


async def test_finished_reload_tasks_are_dropped() -> None:
    """SIGHUP reloads run as tasks; once done they leave the set the app cancels at the end
    (a long-running gateway reloaded often must not keep every finished task)."""
    from gateway.background import Background
    from gateway.reload import Reloader
    from gateway.runtime import Runtime

    registries = iter([parse_registry(TWO), parse_registry(ONE), parse_registry(TWO)])
    runtime = Runtime(parse_registry(ONE), GatewaySettings(probe_interval=60))
    runtime.reloader = Reloader(runtime, lambda: next(registries))

    async def healthy(url: str) -> bool:
        return True

    background = Background(runtime, healthy)
    async with background.running():
        assert len(background.tasks) == 1  # the probe loop
        for _ in range(3):
            background._on_sighup()  # what the SIGHUP handler calls
        for _ in range(400):  # deadline: 20 s on a loaded machine
            if len(background.tasks) == 1:
                break
            await asyncio.sleep(0.05)
        assert len(background.tasks) == 1
        assert sorted(runtime.state.table.routes) == ["a", "b"]
    assert background.tasks == set()
