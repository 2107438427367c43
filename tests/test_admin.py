"""The admin endpoints: status figures, switch/wake/sleep through a fake fleet, refusals,
reload errors (upstreams mocked with respx)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import respx

from fleet.errors import PlacementRefused
from fleet.registry import parse_registry
from gateway.app import create_app
from gateway.settings import GatewaySettings

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

M = "http://127.0.0.1:9401"
R = "http://127.0.0.1:9402"
REG_TEXT = f"""
[models.m]
source = "org/m"
port = 9401
aliases = ["em"]
max_concurrency = 2
[models.r]
url = "{R}"
"""
ADMIN = {"authorization": "Bearer sk-admin"}


class Refused(PlacementRefused):
    """The fleet's typed refusal (the admin endpoints answer 409 for it)."""

    def __init__(self) -> None:
        super().__init__("does not fit beside x", ())


class FakeFleet:
    def __init__(self, with_wake: bool = True, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail = fail
        if with_wake:
            self.wake = self._wake

    def _record(self, what: str, model: str) -> None:
        with self.lock:
            self.calls.append((what, model))
        if self.fail is not None:
            raise self.fail

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> None:
        self._record("ensure_awake", model)

    def sleep(self, model: str) -> None:
        self._record("sleep", model)

    def _wake(self, model: str) -> None:
        self._record("wake", model)

    def status(self) -> list[dict[str, str]]:
        return [{"name": "m", "state": "healthy"}]


async def start(fleet: FakeFleet | None, tmp_path: Path, **extra: object
                ) -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    path = tmp_path / "models.toml"
    path.write_text(REG_TEXT)
    settings = GatewaySettings(admin_key="sk-admin", registry=str(path), activation_timeout=5,
                               **extra)
    factory = (lambda busy, last_used: fleet) if fleet is not None else None
    app = create_app(parse_registry(REG_TEXT), settings, fleet_opener=factory)
    with respx.mock(assert_all_called=False) as mock:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gw") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client, mock


@pytest.fixture
async def fleet() -> FakeFleet:
    return FakeFleet()


@pytest.fixture
async def gw(fleet: FakeFleet, tmp_path: Path):
    async for pair in start(fleet, tmp_path):
        yield pair


def error_of(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body["error"]) == ["message", "type", "param", "code"]
    return body["error"]


async def test_status_shows_gateway_figures_and_the_fleet(gw) -> None:
    client, mock = gw
    mock.post(f"{R}/v1/completions").respond(200, json={"ok": 1})
    await client.post("/v1/completions", json={"model": "r", "prompt": "x"})
    status = (await client.get("/admin/status", headers=ADMIN)).json()
    assert status["activation"] is True and status["registry"]["models"] == 2
    m, r = status["models"]["m"], status["models"]["r"]
    assert (m["managed"], m["aliases"], m["max_concurrency"], m["in_flight"], m["queued"]) == (
        True, ["em"], 2, 0, 0)
    assert r["replicas"] == [{"index": 0, "url": R, "outstanding": 0, "ejected": False,
                              "failures": 0, "last_error": None}]
    assert status["fleet"] == [{"name": "m", "state": "healthy"}]
    skipped = (await client.get("/admin/status?fleet=false", headers=ADMIN)).json()
    assert skipped["fleet"] is None


async def test_in_flight_shows_in_status(gw) -> None:
    client, _ = gw
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    gateway.state.admission["m"].in_flight = 1
    status = (await client.get("/admin/status?fleet=false", headers=ADMIN)).json()
    assert status["models"]["m"]["in_flight"] == 1
    err = error_of(await client.post("/admin/sleep/m", headers=ADMIN), 409)
    assert "1 request(s) in flight" in err["message"] and "force=true" in err["message"]
    gateway.state.admission["m"].in_flight = 0


async def test_switch_wake_sleep_through_the_fleet(gw, fleet: FakeFleet) -> None:
    client, _ = gw
    for action, call in (("switch", "ensure_awake"), ("sleep", "sleep"), ("wake", "wake")):
        resp = await client.post(f"/admin/{action}/em", headers=ADMIN)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == "m" and resp.json()["action"] == action
        assert fleet.calls[-1] == (call, "m")
    gateway = client.app.state.gateway  # type: ignore[attr-defined]
    assert "m" not in gateway.activator.asleep
    await client.post("/admin/sleep/m", headers=ADMIN)
    assert "m" in gateway.activator.asleep
    await client.post("/admin/switch/m", headers=ADMIN)
    assert "m" not in gateway.activator.asleep


async def test_wake_without_fleet_wake_activates(tmp_path: Path) -> None:
    fleet = FakeFleet(with_wake=False)
    async for client, _ in start(fleet, tmp_path):
        assert (await client.post("/admin/wake/m", headers=ADMIN)).status_code == 200
        assert fleet.calls == [("ensure_awake", "m")]


async def test_refusals(gw) -> None:
    client, _ = gw
    err = error_of(await client.post("/admin/switch/r", headers=ADMIN), 400)
    assert "remote server" in err["message"]
    err = error_of(await client.post("/admin/sleep/nope", headers=ADMIN), 404)
    assert "`nope`" in err["message"]
    error_of(await client.get("/admin/switch/m", headers=ADMIN), 405)
    error_of(await client.post("/admin/nothing", headers=ADMIN), 404)


async def test_fleet_failures_are_mapped(tmp_path: Path) -> None:
    async for client, _ in start(FakeFleet(fail=Refused()), tmp_path):
        err = error_of(await client.post("/admin/wake/m", headers=ADMIN), 409)
        assert "does not fit" in err["message"]
        error_of(await client.post("/admin/switch/m", headers=ADMIN), 503)
    async for client, _ in start(FakeFleet(fail=RuntimeError("docker down")), tmp_path):
        err = error_of(await client.post("/admin/sleep/m", headers=ADMIN), 503)
        assert "docker down" in err["message"]


async def test_no_fleet_is_a_409(tmp_path: Path) -> None:
    async for client, _ in start(None, tmp_path):
        err = error_of(await client.post("/admin/switch/m", headers=ADMIN), 409)
        assert "no fleet" in err["message"]
        status = (await client.get("/admin/status", headers=ADMIN)).json()
        assert status["activation"] is False and status["fleet"] is None


async def test_reload_rejects_an_invalid_registry(gw, tmp_path: Path) -> None:
    client, _ = gw
    (tmp_path / "models.toml").write_text('[models.m]\nsource = "org/m"\nprot = 1\n')
    err = error_of(await client.post("/admin/reload", headers=ADMIN), 400)
    assert "keeps routing by the previous one" in err["message"] and err["param"] == "registry"
    assert "model 'm': unknown field 'prot'" in err["message"]
    status = (await client.get("/admin/status?fleet=false", headers=ADMIN)).json()
    assert set(status["models"]) == {"m", "r"}
