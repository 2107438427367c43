"""The dashboard wired into the gateway app (`create_app`): its routes sit beside the others,
`GATEWAY_UI` turns them off, a model named `ui` stays reachable by its prefix, and switches
made through the admin API (and so the page's buttons) reach the dashboard's history with
the fleet's phase timings. Upstreams are mocked with respx; the fleet is a fake."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from fleet.registry import parse_registry
from fleet.report import ActionTaken, Report
from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.ui.routes import CSP

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

U = "http://127.0.0.1:9702"
REG = parse_registry(f"""
[models.m]
source = "org/m"
port = 9701
[models.ui]
url = "{U}"
""")
ADMIN = {"authorization": "Bearer sk-admin"}


class Fleet:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[str] = []

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> Report:
        with self.lock:
            self.calls.append(model)
        return Report("switch", (model,), [ActionTaken("x", "sleep", 0.2),
                                            ActionTaken(model, "wake", 0.4)],
                      {"evict": 0.2, "start": 0.1, "healthy": 0.3, "total": 0.6}, (model,))

    def sleep(self, model: str) -> None:
        return None

    def status(self) -> list[dict[str, object]]:
        return [{"name": "m", "state": "healthy", "replica": 0, "port": 9701, "uptime": 3.0}]


async def serve(**settings: object) -> AsyncIterator[httpx.AsyncClient]:
    fleet = Fleet()
    app = create_app(REG, GatewaySettings(admin_key="sk-admin", **settings),  # type: ignore[arg-type]
                     fleet_opener=lambda busy, last_used: fleet)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as client:
        yield client


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async for c in serve():
        yield c


async def test_the_app_serves_the_dashboard(client: httpx.AsyncClient) -> None:
    page = await client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    snap = (await client.get("/ui/api/snapshot")).json()
    assert [m["name"] for m in snap["models"]] == ["m", "ui"]
    assert {m["name"]: m["state"] for m in snap["models"]} == {"m": "awake", "ui": "remote"}
    assert snap["activation"] is True and snap["viewer"]["admin_enabled"] is True


async def test_a_switch_through_the_admin_api_reaches_the_history(
        client: httpx.AsyncClient) -> None:
    assert (await client.post("/admin/switch/m", headers=ADMIN)).status_code == 200
    switches = (await client.get("/ui/api/snapshot")).json()["switches"]
    assert len(switches) == 1
    s = switches[0]
    assert (s["model"], s["operation"], s["outcome"]) == ("m", "switch", "ok")
    assert s["timings"] == {"evict": 0.2, "start": 0.1, "healthy": 0.3, "total": 0.6}
    assert s["reason"] == "made room: sleep x"


async def test_a_model_named_ui_is_still_reached_by_its_prefix(
        client: httpx.AsyncClient) -> None:
    with respx.mock(assert_all_called=True) as mock:
        mock.post(f"{U}/v1/chat/completions").respond(200, json={"ok": True})
        resp = await client.post("/ui/v1/chat/completions", json={"messages": []})
    assert resp.status_code == 200 and resp.json() == {"ok": True}


async def test_ui_off_removes_the_routes() -> None:
    async for client in serve(ui="off"):
        assert (await client.get("/ui/")).status_code == 404
        assert (await client.get("/ui/api/snapshot")).status_code == 404
        assert (await client.get("/ui")).status_code == 404
