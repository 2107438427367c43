"""Metrics: one registry per app, counters and histograms per request, scrape-time gauges,
the metered fleet (activations, evictions, sleeps), and what the app records for each kind
of outcome (upstreams mocked with respx; over real sockets in test_gateway_service.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
import respx
from prometheus_client.parser import text_string_to_metric_families

from fleet.errors import ModelsBusy, PlacementRefused
from fleet.registry import parse_registry
from gateway.app import create_app
from gateway.balancer import Balancer, Instance
from gateway.limits import Admission
from gateway.metrics import GatewayMetrics, MeteredFleet
from gateway.settings import GatewaySettings

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

A = "http://127.0.0.1:9201"
REG = parse_registry(f'[models.a]\nurl = "{A}"\n')
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str | bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@dataclass
class Source:
    admission: dict[str, Admission] = field(default_factory=dict)
    instances: dict[str, list[Instance]] = field(default_factory=dict)
    balancer: Balancer = field(default_factory=lambda: Balancer(lambda: 100.0))
    sleeping: set[str] = field(default_factory=set)

    def asleep(self) -> set[str]:
        return self.sleeping

    @property
    def state(self) -> Source:  # the routing state's figures, here kept by the fake itself
        return self


def test_counts_and_histograms_per_request() -> None:
    m = GatewayMetrics()
    m.request_done("a", 200, 0.2)
    m.request_done("a", 200, 0.3)
    m.request_done("a", 429, 0.001)
    m.first_chunk("a", 0.04)
    m.rejected_request(401)
    out = m.exposition()
    assert value(out, "gateway_requests_total", model="a", status="200") == 2
    assert value(out, "gateway_requests_total", model="a", status="429") == 1
    assert value(out, "gateway_request_duration_seconds_count", model="a") == 3
    assert value(out, "gateway_request_duration_seconds_bucket", model="a", le="0.25") == 2
    assert value(out, "gateway_time_to_first_chunk_seconds_count", model="a") == 1
    assert value(out, "gateway_rejected_requests_total", status="401") == 1


def test_each_app_has_its_own_registry() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    one.request_done("a", 200, 0.1)
    assert value(two.exposition(), "gateway_requests_total", model="a", status="200") is None
    assert value(one.exposition(), "gateway_requests_total", model="a", status="200") == 1


def test_live_gauges_are_read_at_scrape_time() -> None:
    src = Source()
    adm = Admission("a", 1, 4, 10.0)
    src.admission["a"] = adm
    r0, r1 = Instance("a", 0, "http://x:1"), Instance("a", 1, "http://x:2")
    src.instances["a"] = [r0, r1]
    m = GatewayMetrics(src)
    assert value(m.exposition(), "gateway_in_flight_requests", model="a") == 0
    adm.in_flight, r1.outstanding, r0.ejected_until = 1, 3, 200.0
    src.sleeping.add("a")
    out = m.exposition()
    assert value(out, "gateway_in_flight_requests", model="a") == 1
    assert value(out, "gateway_queued_requests", model="a") == 0
    assert value(out, "gateway_replica_outstanding_requests", model="a", replica="1") == 3
    assert value(out, "gateway_replica_ejected", model="a", replica="0") == 1
    assert value(out, "gateway_replica_ejected", model="a", replica="1") == 0
    assert value(out, "gateway_model_asleep", model="a") == 1
    assert value(out, "gateway_registry_models") == 1


@dataclass
class Action:
    model: str
    action: str


@dataclass
class Report:
    actions: list[Action]


def Refused(kind: str) -> PlacementRefused:
    """The fleet's typed refusal: ModelsBusy when a busy model is in the way."""
    return (ModelsBusy if kind == "busy" else PlacementRefused)(f"refused: {kind}", ())


class FakeFleet:
    def __init__(self) -> None:
        self.outcomes: list[object] = []

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> object:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def sleep(self, model: str) -> str:
        return "slept"

    def status(self) -> list[str]:
        return ["row"]


def test_metered_fleet() -> None:
    m = GatewayMetrics()
    fake = FakeFleet()
    fleet = MeteredFleet(fake, m)
    fake.outcomes = [None, Report([Action("b", "sleep"), Action("c", "stop"), Action("a", "start")]),
                     Refused("busy"), RuntimeError("docker down")]
    assert fleet.ensure_awake("a") is None
    assert isinstance(fleet.ensure_awake("a", timeout=5), Report)
    for _ in range(2):
        with pytest.raises((PlacementRefused, RuntimeError)):
            fleet.ensure_awake("a")
    assert fleet.sleep("a") == "slept" and fleet.status() == ["row"]
    out = m.exposition()
    for outcome in ("already_awake", "ok", "busy", "failed"):
        assert value(out, "gateway_activations_total", model="a", outcome=outcome) == 1
    assert value(out, "gateway_activation_duration_seconds_count", model="a") == 1
    assert value(out, "gateway_evictions_total", model="b", action="sleep") == 1
    assert value(out, "gateway_evictions_total", model="c", action="stop") == 1
    assert value(out, "gateway_evictions_total", model="a", action="start") is None
    assert value(out, "gateway_sleeps_total", model="a") == 1


# -- what the app records ---------------------------------------------------------------------


@pytest.fixture
async def gw() -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    app = create_app(REG, GatewaySettings())
    with respx.mock(assert_all_called=False) as mock:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gw") as client:
                yield client, mock


class BreakingStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"n":1}\n\n'
        raise httpx.ReadError("reset")


async def test_app_records_outcomes_by_model_and_status(gw) -> None:
    client, mock = gw
    route = mock.post(f"{A}/v1/chat/completions")
    route.respond(200, json={"ok": 1})
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    route.respond(400, json={"error": {"message": "bad"}})
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 400
    route.respond(200, content=b"data: {}\n\ndata: [DONE]\n\n",
                  headers={"content-type": "text/event-stream"})
    assert (await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).content
    route.respond(200, stream=BreakingStream(), headers={"content-type": "text/event-stream"})
    await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    route.side_effect = httpx.ConnectError("refused")
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 502
    assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "x"})).status_code == 404
    assert (await client.post("/nope/v1/chat/completions", json=CHAT)).status_code == 404
    assert (await client.get("/v1/nothing")).status_code == 404

    out = (await client.get("/metrics")).content
    assert value(out, "gateway_requests_total", model="a", status="200") == 3
    assert value(out, "gateway_requests_total", model="a", status="400") == 1
    assert value(out, "gateway_requests_total", model="a", status="502") == 1
    assert value(out, "gateway_request_duration_seconds_count", model="a") == 5
    assert value(out, "gateway_time_to_first_chunk_seconds_count", model="a") == 2
    assert value(out, "gateway_upstream_errors_total", model="a", kind="ConnectError") == 1
    assert value(out, "gateway_upstream_errors_total", model="a", kind="broken_stream") == 1
    assert value(out, "gateway_rejected_requests_total", status="404") == 3
    assert value(out, "gateway_in_flight_requests", model="a") == 0
