"""The dashboard's Python side: its routes (page, files, CSP, loopback gate, keys, logs), the
figures `GatewaySource` derives from the gateway's bookkeeping (states, queue, residency,
ttl, capacity, switches, series), and the pieces under it. No browser here (see
test_ui_browser.py): the routes run in a small Starlette app behind the real access
middleware, the gateway's parts are real objects (routing table, admission, replicas,
metrics) and the fleet is a fake."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from fleet.registry import Registry, parse_registry
from fleet.report import ActionTaken, ModelStatus, Report
from gateway import auth, errors
from gateway.balancer import Balancer, Instance
from gateway.limits import Admission
from gateway.metrics import GatewayMetrics
from gateway.routing import RoutingTable
from gateway.settings import GatewaySettings
from gateway.ui import (
    GatewaySource,
    RecordingFleet,
    RecordingOpener,
    SwitchHistory,
    routes,
)
from gateway.ui.capacity import capacity_bars
from gateway.ui.live import metric_readings
from gateway.ui.routes import CSP
from gateway.ui.scheduled import merge_switches
from gateway.ui.series import Reading, Sampler
from gateway.ui.snapshot import SwitchView

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

HOSTILE = '<img src=x onerror="window.pwned=1">'
REG_TEXT = f"""
[host]
cpus = 4
gateway_cpus = 1
[models.a]
source = "org/a"
port = 9501
cpus = 1
aliases = ["alpha"]
ttl = 300
description = "first"
[models.b]
source = "org/b"
port = 9502
cpus = 2
max_concurrency = 1
[models.r]
url = "http://127.0.0.1:9509"
description = '{HOSTILE}'
"""
KEYS_TOML = """
[[keys]]
key = "sk-team"
name = "team"
models = ["alpha", "r"]
"""
ADMIN = {"authorization": "Bearer sk-admin"}
TEAM = {"authorization": "Bearer sk-team"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class State:
    table: RoutingTable
    admission: dict[str, Admission]
    instances: dict[str, tuple[Instance, ...]]
    ttl: dict[str, float]


class FakeFleet:
    """status() rows, logs(), and a switch that reports phase timings."""

    def __init__(self) -> None:
        self.rows: list[ModelStatus] = []
        self.log_text = "INFO ready\n" + HOSTILE + "\n"
        self.fail_status: Exception | None = None

    def status(self) -> list[ModelStatus]:
        if self.fail_status is not None:
            raise self.fail_status
        return list(self.rows)

    def logs(self, model: str, *, tail: int = 100, replica: int = 0) -> str:
        return "\n".join(f"{model}#{replica} {line}" for line in self.log_text.splitlines())

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> Report:
        return Report("switch", (model,), [ActionTaken("a", "stop", 0.5),
                                            ActionTaken(model, "start", 2.0)],
                      {"evict": 0.5, "start": 0.2, "healthy": 1.8, "total": 2.5}, (model,))

    def sleep(self, model: str) -> None:
        return None


@dataclass
class Activator:
    fleet: Any
    asleep: set[str] = field(default_factory=set)
    activating: set[str] = field(default_factory=set)

    def pending(self, model: str) -> bool:
        return model in self.activating


class Runtime:
    """The parts of the gateway's runtime the dashboard reads, as real objects."""

    def __init__(self, registry: Registry, fleet: Any = None) -> None:
        self.clock = Clock()
        table = RoutingTable(registry)
        self.state = State(
            table,
            {n: Admission(n, s.max_concurrency, s.max_queue, s.queue_timeout, self.clock)
             for n, s in registry.models.items()},
            {n: tuple(Instance(n, i, u) for i, u in enumerate(r.replicas))
             for n, r in table.routes.items()},
            {n: m.ttl for n, m in registry.models.items() if m.ttl and m.managed})
        self.balancer = Balancer(self.clock)
        self.metrics = GatewayMetrics()
        self.activator = Activator(fleet) if fleet is not None else None
        self.scheduler = None  # the drain-wait path: figures from the Admission objects

    def idle_for(self, model: str) -> float | None:
        adm = self.state.admission[model]
        if adm.in_flight or adm.waiting:
            return None
        return self.clock() - adm.last_used


def rows(*specs: tuple[str, str, float | None]) -> list[ModelStatus]:
    return [ModelStatus(name, state, 9500, (), None, uptime, "ok" if state == "healthy" else "-")
            for name, state, uptime in specs]


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.GatewayError)
    return exc.response()


def app_for(source: Any, *, keys: bool = False, admin: bool = True, ui: str = "loopback",
            tmp_path: Path | None = None) -> Starlette:
    extra: dict[str, Any] = {}
    if keys:
        assert tmp_path is not None
        (tmp_path / "keys.toml").write_text(KEYS_TOML)
        extra["api_keys_file"] = str(tmp_path / "keys.toml")
    if admin:
        extra["admin_key"] = "sk-admin"
    settings = GatewaySettings(ui=ui, **extra)
    access = auth.load_access(settings)
    app = Starlette(routes=routes(source, access, settings),
                    exception_handlers={errors.GatewayError: _gateway_error})
    app.add_middleware(auth.AccessMiddleware, access=access)
    return app


def client_for(app: Starlette, host: str = "127.0.0.1",
               base: str = "http://127.0.0.1:8000") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 40000)),
                             base_url=base)


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(parse_registry(REG_TEXT), FakeFleet())


@pytest.fixture
async def open_client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app_for(GatewaySource(runtime))) as client:
        yield client


# -- the page and its files ---------------------------------------------------------------


async def test_page_and_files_are_served_with_a_strict_csp(open_client: httpx.AsyncClient) -> None:
    page = await open_client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert "frame-ancestors 'none'" in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        resp = await open_client.get(f"/ui/static/{name}")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(kind), name
        assert resp.headers["content-security-policy"] == CSP
    redirect = await open_client.get("/ui", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/"
    for missing in ("/ui/static/nope.js", "/ui/static/index.html", "/ui/static/..%2Fsource.py"):
        assert (await open_client.get(missing)).status_code == 404, missing


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.append((tag, dict(attrs)))


def static_text(name: str) -> str:
    return resources.files("gateway.ui").joinpath("static", name).read_text(encoding="utf-8")


def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() -> None:
    parser = _Tags()
    parser.feed(static_text("index.html"))
    for tag, attrs in parser.seen:
        assert tag != "style" and "style" not in attrs, (tag, attrs)
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
        for ref in ("src", "href"):
            value = attrs.get(ref)
            assert value is None or value.startswith("/"), (tag, attrs)  # this origin only
    scripts = [a for t, a in parser.seen if t == "script"]
    assert scripts and all(a.get("src") for a in scripts)
    assert "<script>" not in static_text("index.html")


def test_the_script_never_parses_server_text_as_html_nor_keeps_the_key_beyond_the_tab() -> None:
    js = static_text("dashboard.js")
    code = "\n".join(line for line in js.splitlines() if not line.lstrip().startswith("//"))
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                      "new Function", "localStorage", "document.cookie", "http://", "https://"):
        assert forbidden not in code, forbidden
    assert "sessionStorage" in code and "textContent" in code


# -- who may see it ----------------------------------------------------------------------


async def test_loopback_mode_refuses_other_clients_and_other_host_names(runtime: Runtime) -> None:
    app = app_for(GatewaySource(runtime))
    async with client_for(app, host="192.0.2.7") as client:
        for path in ("/ui/", "/ui/static/dashboard.js", "/ui/api/snapshot"):
            resp = await client.get(path)
            assert resp.status_code == 403, path
            assert "GATEWAY_UI=on" in resp.json()["error"]["message"]
    async with client_for(app, base="http://rebound.example:8000") as client:  # DNS rebinding
        resp = await client.get("/ui/api/snapshot")
        assert resp.status_code == 403 and "localhost" in resp.json()["error"]["message"]
    async with client_for(app, host="::1", base="http://[::1]:8000") as client:
        assert (await client.get("/ui/")).status_code == 200
    async with client_for(app, base="http://localhost:8000") as client:
        assert (await client.get("/ui/")).status_code == 200


async def test_on_serves_everyone_and_off_adds_no_route(runtime: Runtime) -> None:
    async with client_for(app_for(GatewaySource(runtime), ui="on"), host="192.0.2.7",
                          base="http://fleet.example") as client:
        assert (await client.get("/ui/")).status_code == 200
        assert (await client.get("/ui/api/snapshot")).status_code == 200
    settings = GatewaySettings(ui="off")
    assert routes(GatewaySource(runtime), auth.load_access(settings), settings) == []


async def test_keys_on_without_a_key_the_page_loads_but_shows_no_data(
        runtime: Runtime, tmp_path: Path) -> None:
    async with client_for(app_for(GatewaySource(runtime), keys=True, tmp_path=tmp_path)) as client:
        assert (await client.get("/ui/")).status_code == 200
        assert (await client.get("/ui/static/dashboard.js")).status_code == 200
        assert (await client.get("/ui/api/snapshot")).status_code == 401
        assert (await client.get("/ui/api/snapshot", headers={"authorization": "Bearer nope"})
                ).status_code == 401


async def test_a_key_sees_only_its_models_and_the_admin_sees_all(
        runtime: Runtime, tmp_path: Path) -> None:
    async with client_for(app_for(GatewaySource(runtime), keys=True, tmp_path=tmp_path)) as client:
        team = (await client.get("/ui/api/snapshot", headers=TEAM)).json()
        assert [m["name"] for m in team["models"]] == ["a", "r"]  # `alpha` is a's alias
        assert team["viewer"] == {"name": "team", "admin": False, "admin_enabled": True,
                                  "keys_required": True}
        assert set(team["series"]["models"]) <= {"a", "r"}
        admin = (await client.get("/ui/api/snapshot", headers=ADMIN)).json()
        assert [m["name"] for m in admin["models"]] == ["a", "b", "r"]
        assert admin["viewer"]["admin"] is True


async def test_a_key_that_is_not_the_admin_key_sees_no_addresses_paths_or_error_texts(
        runtime: Runtime) -> None:
    fleet = runtime.activator.fleet  # type: ignore[union-attr]
    fleet.fail_status = RuntimeError("Cannot connect to unix:///var/run/docker.sock")
    history = SwitchHistory()

    class Failing(FakeFleet):
        def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> Report:
            raise RuntimeError("container vllm-fleet-a failed; see /srv/models/a")

    with pytest.raises(RuntimeError):
        RecordingFleet(Failing(), history).ensure_awake("a")
    source = GatewaySource(runtime, history)
    team = await source.snapshot(auth.Principal("team", frozenset({"a", "r"})))
    assert team.registry_source == "" and team.fleet_error == "the fleet's view is unavailable"
    assert all(r.url == "" and r.node is None and r.port is None
               for m in team.models for r in m.replicas)
    assert [(s.outcome, s.reason) for s in team.switches] == [("failed", "")]
    admin = await source.snapshot(auth.Principal("admin", admin=True))
    assert admin.models[0].replicas[0].url == "http://127.0.0.1:9501"
    assert admin.fleet_error is not None and "docker.sock" in admin.fleet_error
    assert "/srv/models" in admin.switches[0].reason
    anyone = await source.snapshot(None)  # an open gateway: anyone may do anything anyway
    assert anyone.registry_source == admin.registry_source


async def test_an_open_gateway_shows_everything_and_knows_the_admin_key(
        open_client: httpx.AsyncClient) -> None:
    anyone = (await open_client.get("/ui/api/snapshot")).json()
    assert [m["name"] for m in anyone["models"]] == ["a", "b", "r"]
    assert anyone["viewer"] == {"name": None, "admin": False, "admin_enabled": True,
                                "keys_required": False}
    admin = (await open_client.get("/ui/api/snapshot", headers=ADMIN)).json()
    assert admin["viewer"]["admin"] is True
    wrong = (await open_client.get("/ui/api/snapshot", headers={"authorization": "Bearer x"}))
    assert wrong.status_code == 200 and wrong.json()["viewer"]["admin"] is False


async def test_the_hostile_description_is_data_not_markup(open_client: httpx.AsyncClient) -> None:
    snap = (await open_client.get("/ui/api/snapshot")).json()
    r = next(m for m in snap["models"] if m["name"] == "r")
    assert r["description"] == HOSTILE  # passed through as a JSON string; the page sets textContent


# -- log lines ----------------------------------------------------------------------------


async def test_logs_need_the_admin_key(runtime: Runtime, tmp_path: Path) -> None:
    async with client_for(app_for(GatewaySource(runtime))) as client:
        assert (await client.get("/ui/api/logs/a")).status_code == 401
        assert (await client.get("/ui/api/logs/a", headers=TEAM)).status_code == 401
        got = await client.get("/ui/api/logs/alpha?n=2&replica=0", headers=ADMIN)
        assert got.status_code == 200, got.text
        assert got.json() == {"model": "a", "replica": 0, "lines": ["a#0 INFO ready",
                                                                    f"a#0 {HOSTILE}"]}
        assert (await client.get("/ui/api/logs/a?n=1", headers=ADMIN)).json()["lines"] == [
            f"a#0 {HOSTILE}"]
    async with client_for(app_for(GatewaySource(runtime), keys=True, tmp_path=tmp_path)) as client:
        # As on /admin/...: a valid API key that is not the admin key is 403.
        denied = await client.get("/ui/api/logs/a", headers=TEAM)
        assert denied.status_code == 403 and "admin key" in denied.json()["error"]["message"]
        assert (await client.get("/ui/api/logs/a", headers=ADMIN)).status_code == 200
    async with client_for(app_for(GatewaySource(runtime), admin=False)) as client:
        off = await client.get("/ui/api/logs/a")
        assert off.status_code == 403 and "GATEWAY_ADMIN_KEY" in off.json()["error"]["message"]


async def test_log_errors_say_what_is_wrong(open_client: httpx.AsyncClient,
                                            runtime: Runtime) -> None:
    async def status(path: str) -> tuple[int, str]:
        resp = await open_client.get(path, headers=ADMIN)
        return resp.status_code, resp.json()["error"]["message"]

    assert (await status("/ui/api/logs/nope"))[0] == 404
    code, message = await status("/ui/api/logs/r")
    assert code == 400 and "remote server" in message
    code, message = await status("/ui/api/logs/a?n=0")
    assert code == 400 and "`n`" in message
    assert (await status("/ui/api/logs/a?n=lots"))[0] == 400
    runtime.activator = None
    code, message = await status("/ui/api/logs/a")
    assert code == 409 and "fleet logs a" in message


async def test_a_fleet_that_cannot_read_logs_is_a_503_with_the_reason(runtime: Runtime) -> None:
    class Broken(FakeFleet):
        def logs(self, model: str, *, tail: int = 100, replica: int = 0) -> str:
            raise RuntimeError("model 'a' has no container (state absent)")

    runtime.activator = Activator(Broken())
    async with client_for(app_for(GatewaySource(runtime))) as client:
        resp = await client.get("/ui/api/logs/a", headers=ADMIN)
        assert resp.status_code == 503 and "no container" in resp.json()["error"]["message"]


# -- the figures ----------------------------------------------------------------------------


async def test_states_replicas_residency_and_ttl_from_the_fleet_and_the_gateway(
        runtime: Runtime) -> None:
    fleet = runtime.activator.fleet  # type: ignore[union-attr]
    fleet.rows = rows(("a", "healthy", 42.0), ("b", "stopped", None))
    source = GatewaySource(runtime)
    runtime.clock.now += 100  # a has been idle 100 s of its 300 s ttl
    snap = await source.snapshot(None)
    by = {m.name: m for m in snap.models}
    assert (by["a"].state, by["b"].state, by["r"].state) == ("awake", "stopped", "remote")
    assert by["a"].time_resident == pytest.approx(42.0, abs=1.0)  # + the rows' age
    assert by["b"].time_resident is None
    assert by["a"].ttl == 300 and by["a"].ttl_left == 200.0
    assert by["a"].aliases == ("alpha",) and by["a"].cpus == 1
    assert by["a"].replicas[0].port == 9500 and by["a"].replicas[0].state == "healthy"
    assert by["a"].replicas[0].node == "127.0.0.1"
    assert snap.activation is True and snap.fleet_error is None
    runtime.activator.activating.add("b")  # type: ignore[union-attr]
    runtime.activator.asleep.add("a")  # type: ignore[union-attr]
    fleet.rows = rows(("a", "sleeping", 50.0), ("b", "stopped", None))
    source.fleet_status.max_age = 0
    snap = await source.snapshot(None)
    await asyncio.sleep(0.05)  # let the background refresh land
    snap = await source.snapshot(None)
    by = {m.name: m for m in snap.models}
    assert (by["a"].state, by["b"].state) == ("asleep", "activating")
    assert by["a"].ttl_left is None


async def test_a_finished_switch_is_never_shown_from_rows_read_before_it(
        runtime: Runtime) -> None:
    fleet = runtime.activator.fleet  # type: ignore[union-attr]
    fleet.rows = rows(("a", "healthy", 5.0), ("b", "stopped", None))
    history = SwitchHistory()
    source = GatewaySource(runtime, history, fleet_max_age=3600)
    assert {m.name: m.state for m in (await source.snapshot(None)).models}["b"] == "stopped"
    fleet.rows = rows(("a", "stopped", None), ("b", "healthy", 0.5))
    assert {m.name: m.state for m in (await source.snapshot(None)).models}["b"] == "stopped"
    RecordingFleet(fleet, history).ensure_awake("b")  # the switch ends: rows are outdated
    snap = await source.snapshot(None)
    assert {m.name: m.state for m in snap.models} == {"a": "stopped", "b": "awake",
                                                       "r": "remote"}


async def test_without_a_fleet_managed_models_are_unknown_and_a_failing_fleet_is_reported(
        runtime: Runtime) -> None:
    fleet = runtime.activator.fleet  # type: ignore[union-attr]
    fleet.fail_status = RuntimeError("Cannot connect to the Docker daemon")
    runtime.activator.asleep.add("b")  # type: ignore[union-attr]
    snap = await GatewaySource(runtime).snapshot(None)
    assert snap.fleet_error is not None and "Docker daemon" in snap.fleet_error
    assert {m.name: m.state for m in snap.models} == {"a": "unknown", "b": "asleep",
                                                       "r": "remote"}
    fleet.fail_status = None  # rows say stopped: they win over the gateway's memory of a sleep
    fleet.rows = rows(("a", "stopped", None), ("b", "stopped", None))
    snap = await GatewaySource(runtime).snapshot(None)
    assert {m.name: m.state for m in snap.models}["b"] == "stopped"
    runtime.activator = None
    snap = await GatewaySource(runtime).snapshot(None)
    assert snap.activation is False and {m.name: m.state for m in snap.models}["b"] == "unknown"


async def test_queue_in_flight_and_oldest_wait(runtime: Runtime) -> None:
    adm = runtime.state.admission["b"]  # max_concurrency 1
    await adm.acquire()
    waiters = [asyncio.ensure_future(adm.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    runtime.clock.now += 7.5
    snap = await GatewaySource(runtime).snapshot(None)
    b = next(m for m in snap.models if m.name == "b")
    assert (b.in_flight, b.queued, b.oldest_wait, b.max_concurrency) == (1, 2, 7.5, 1)
    adm.release()
    await waiters[0]
    assert adm.waiting == 1 and adm.oldest_wait() == 7.5
    adm.release()
    await waiters[1]
    assert adm.waiting == 0 and adm.oldest_wait() is None


def test_core_budget_bars_hide_the_names_a_viewer_may_not_see() -> None:
    registry = parse_registry(REG_TEXT)
    bars = capacity_bars(registry, {"a": "awake", "b": "activating", "r": "remote"},
                         {"a": 1, "b": 0}, lambda m: m == "a")
    assert len(bars) == 1
    bar = bars[0]
    assert (bar.unit, bar.capacity, bar.reserved) == ("cores", 4.0, 1.0)
    assert [(s.model, s.amount, s.state) for s in bar.shares] == [
        ("a", 1.0, "awake"), ("other", 2.0, "activating")]
    idle = capacity_bars(registry, {"a": "stopped", "b": "asleep"}, {}, lambda m: True)
    assert idle[0].shares == ()


def test_gpu_bars_hold_each_awake_replicas_fraction() -> None:
    registry = parse_registry("""
[host]
gpus = [{ id = 0, memory_gib = 80 }, { id = 1 }]
gpu_memory_ceiling = 0.9
[models.x]
source = "org/x"
port = 9601
gpus = [0]
gpu_memory_utilization = 0.3
replicas = 2
[models.y]
source = "org/y"
port = 9611
gpus = [0, 1]
gpu_memory_utilization = 0.4
""")
    bars = capacity_bars(registry, {"x": "awake", "y": "awake"}, {"x": 2, "y": 1},
                         lambda m: True)
    assert [(b.label, b.ceiling) for b in bars] == [("GPU 0 (80 GiB)", 0.9), ("GPU 1", 0.9)]
    assert [(s.model, s.amount) for s in bars[0].shares] == [("x", 0.6), ("y", 0.4)]
    assert [(s.model, s.amount) for s in bars[1].shares] == [("y", 0.4)]
    assert capacity_bars(parse_registry('[models.r]\nurl = "http://h:1"\n'), {}, {},
                         lambda m: True) == ()


def test_series_are_rates_mean_ttft_and_errors_per_interval() -> None:
    values = iter([
        {"m": Reading(requests=10, errors=0, ttft_sum=1.0, ttft_count=10)},
        {"m": Reading(requests=30, errors=4, ttft_sum=3.0, ttft_count=20)},
        {"m": Reading(requests=30, errors=4, ttft_sum=3.0, ttft_count=20)},
        {"m": Reading(requests=2, errors=0, ttft_sum=0.1, ttft_count=1)},  # reset by a reload
    ])
    sampler = Sampler(lambda: next(values), interval=2.0, points=10)
    for t in (0.0, 2.0, 2.5, 4.0, 6.0):  # 2.5 is too soon: not sampled
        sampler.sample(t)
    series = sampler.view()
    assert series.t == (2.0, 4.0, 6.0)
    m = series.models["m"]
    assert m.rate == (10.0, 0.0, 0.0) and m.errors == (2.0, 0.0, 0.0)
    assert m.ttft[0] == pytest.approx(0.2) and m.ttft[1] is None
    assert sampler.view(["other"]).models["other"].rate == (0.0, 0.0, 0.0)


def test_metric_readings_count_429_and_5xx_as_errors() -> None:
    metrics = GatewayMetrics()
    for status in (200, 200, 400, 429, 503):
        metrics.request_done("m", status, 0.1)
    metrics.first_chunk("m", 0.25)
    metrics.first_chunk("m", 0.75)
    got = metric_readings(metrics)["m"]
    assert (got.requests, got.errors, got.ttft_count) == (5, 2, 2)
    assert got.ttft_sum == pytest.approx(1.0)


async def test_series_reach_the_snapshot_from_the_gateway_metrics(runtime: Runtime) -> None:
    source = GatewaySource(runtime, sample_interval=0.01)
    await source.snapshot(None)
    runtime.metrics.request_done("a", 200, 0.1)
    await asyncio.sleep(0.02)
    snap = await source.snapshot(None)
    assert sum(snap.series.models["a"].rate) > 0 and set(snap.series.models) == {"a", "b", "r"}


# -- switch history ----------------------------------------------------------------------


def test_recording_fleet_keeps_timings_evictions_and_errors() -> None:
    history = SwitchHistory(size=3, wall=lambda: 1_700_000_000.0)
    fleet = RecordingFleet(FakeFleet(), history)
    fleet.ensure_awake("b", timeout=5)
    record = history.newest()[0]
    assert (record.model, record.operation, record.outcome) == ("b", "switch", "ok")
    assert record.timings == {"evict": 0.5, "start": 0.2, "healthy": 1.8, "total": 2.5}
    assert record.reason == "made room: stop a"
    assert [(a.model, a.action) for a in record.actions] == [("a", "stop"), ("b", "start")]

    class Busy(Exception):
        violations = (type("V", (), {"kind": "busy"})(),)

    class Failing(FakeFleet):
        def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> Report:
            raise Busy("a has 2 requests in flight")

        def wake(self, model: str) -> None:
            raise RuntimeError("")

    failing = RecordingFleet(Failing(), history)
    with pytest.raises(Busy):
        failing.ensure_awake("b")
    with pytest.raises(RuntimeError):
        failing.wake("b")
    newest = history.newest()
    assert [(r.operation, r.outcome, r.reason) for r in newest] == [
        ("wake", "failed", "RuntimeError"), ("activation", "busy", "a has 2 requests in flight"),
        ("switch", "ok", "made room: stop a")]
    failing.sleep("b")
    assert len(history.newest()) == 3 and history.newest(1)[0].operation == "sleep"
    assert fleet.status() == []  # everything else passes through
    assert not hasattr(RecordingFleet(object(), history), "wake")


def test_recording_opener_keeps_recording_across_reloads() -> None:
    history = SwitchHistory()

    class Opener:
        def __call__(self, busy: Any, last_used: Any) -> FakeFleet:
            return FakeFleet()

        def for_registry(self, registry: Any) -> Opener:
            return Opener()

    opener = RecordingOpener(Opener(), history)
    client = opener(lambda m: False, lambda m: 0.0)
    client.ensure_awake("b")
    again = opener.for_registry(None)(lambda m: False, lambda m: 0.0)
    again.ensure_awake("a")
    assert [r.model for r in history.newest()] == ["a", "b"]
    plain = RecordingOpener(lambda busy, last_used: FakeFleet(), history)
    assert getattr(plain, "for_registry", None) is None


async def test_switches_reach_the_snapshot_filtered_for_the_viewer(runtime: Runtime) -> None:
    history = SwitchHistory()
    RecordingFleet(FakeFleet(), history).ensure_awake("b")
    RecordingFleet(FakeFleet(), history).ensure_awake("a")
    source = GatewaySource(runtime, history)
    everyone = await source.snapshot(None)
    assert [s.model for s in everyone.switches] == ["a", "b"]
    team = await source.snapshot(auth.Principal("team", frozenset({"alpha"})))
    assert [s.model for s in team.switches] == ["a"]
    assert [a.model for a in team.switches[0].actions] == ["a", "a"]
    only_b = await source.snapshot(auth.Principal("b-only", frozenset({"b"})))
    assert [a.model for a in only_b.switches[0].actions] == ["other", "b"]
    assert only_b.switches[0].reason == ""  # it named model a


def test_the_schedulers_reasons_join_the_fleets_reports() -> None:
    def rec(model: str, at: float, reason: str = "") -> SwitchView:
        return SwitchView(model, "switch", at, "ok", 2.0, reason, {"evict": 0.5, "total": 2.0})

    recorded = [rec("b", 1010.0), rec("a", 1005.0, "made room: stop b"), rec("b", 1001.0)]
    planned = [  # the scheduler's clock: now is 500.0 for the wall's 1020.0
        {"at": 480.0, "target": "b", "reason": "1 request(s) waiting", "result": "ok"},
        {"at": 488.0, "target": "b", "reason": "3 request(s) waiting; evicting a",
         "result": "ok"},
        {"at": 499.0, "target": "a", "reason": "2 request(s) waiting", "result": "running"},
        {"at": 470.0, "target": "c", "reason": "gone", "result": "failed", "error": "boom"},
    ]
    merged = merge_switches(recorded, planned, mono=500.0, wall=1020.0)
    assert [(s.model, s.outcome, s.reason) for s in merged] == [
        ("a", "running", "2 request(s) waiting"),
        ("b", "ok", "3 request(s) waiting; evicting a"),
        ("a", "ok", "made room: stop b"),  # not the scheduler's (an admin switch)
        ("b", "ok", "1 request(s) waiting")]
    assert merged[0].at == 1019.0 and merged[0].seconds == 1.0
    assert merged[1].timings == {"evict": 0.5, "total": 2.0}


def test_snapshot_is_plain_json() -> None:
    import json

    snap = asyncio.run(GatewaySource(Runtime(parse_registry(REG_TEXT))).snapshot(None))
    text = json.dumps(snap.as_dict())
    assert re.search(r'"state": "unknown"', text) and '"models"' in text
