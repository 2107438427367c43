"""The routing state (gateway/state.py) and the proxy's admission seam (gateway/ports.py
`Admitter`): what a reload carries over, and that any admitter is asked for a slot, released
once the answer is sent, and asked to revive a model whose replicas all refuse."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import respx
from starlette.applications import Starlette
from starlette.routing import Route as StarletteRoute

from fleet.registry import parse_registry
from gateway.middleware import AccessMeter, RequestIdMiddleware, error_handlers
from gateway.proxy import Proxy
from gateway.routing import Route
from gateway.runtime import Runtime
from gateway.settings import GatewaySettings
from gateway.state import RoutingState, build_state

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

A1, A2, B = "http://127.0.0.1:9101", "http://127.0.0.1:9102", "http://127.0.0.1:9103"
BEFORE = parse_registry(f"""
[models.a]
url = ["{A1}", "{A2}"]
max_concurrency = 2
[models.b]
url = "{B}"
""")
AFTER = parse_registry(f"""
[models.a]
url = ["{A2}"]
max_concurrency = 5
max_queue = 3
read_timeout = 7
[models.c]
source = "org/c"
port = 9104
ttl = 60
""")
SETTINGS = GatewaySettings()
TIMEOUT = httpx.Timeout(connect=1.0, read=2.0, write=3.0, pool=4.0)


def build(registry: object, previous: RoutingState | None = None) -> RoutingState:
    return build_state(registry, SETTINGS, previous, clock=lambda: 0.0,  # type: ignore[arg-type]
                       base_timeout=TIMEOUT)


def test_a_rebuild_carries_kept_replicas_and_admission_over() -> None:
    before = build(BEFORE)
    before.instances["a"][1].outstanding = 3  # a request in flight on A2
    before.admission["a"].in_flight = 1
    after = build(AFTER, before)
    assert sorted(after.table.routes) == ["a", "c"] and sorted(before.table.routes) == ["a", "b"]
    (kept,) = after.instances["a"]
    assert kept is before.instances["a"][1] and kept.outstanding == 3
    assert after.admission["a"] is before.admission["a"] and after.admission["a"].in_flight == 1
    adm = after.admission["a"]
    assert (adm.max_concurrency, adm.max_queue) == (5, 3)  # the new limits
    assert after.timeouts["a"] == httpx.Timeout(connect=1.0, read=7.0, write=3.0, pool=4.0)
    assert after.timeouts["c"] is None and after.ttl == {"c": 60}
    assert after.aliases("a") == () and after.registry is AFTER


def test_the_state_is_frozen() -> None:
    state = build(BEFORE)
    with pytest.raises(AttributeError):
        state.table = build(AFTER).table  # type: ignore[misc]


class _Ticket:
    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release


class CountingAdmitter:
    """An admitter that records what the proxy asks of it."""

    def __init__(self, revive: bool = False) -> None:
        self.admitted: list[str] = []
        self.released: list[str] = []
        self.revived: list[str] = []
        self.can_revive = revive

    async def admit(self, state: RoutingState, route: Route) -> _Ticket:
        self.admitted.append(route.model)
        return _Ticket(lambda: self.released.append(route.model))

    async def revive(self, route: Route, ticket: _Ticket) -> _Ticket | None:
        self.revived.append(route.model)
        return ticket if self.can_revive and len(self.revived) == 1 else None


def app_with(admitter: CountingAdmitter) -> Starlette:
    runtime = Runtime(BEFORE, SETTINGS)
    proxy = Proxy(runtime, admitter)
    meter = AccessMeter(runtime.metrics, access_log=False)
    app = Starlette(routes=[StarletteRoute("/v1/completions", proxy.by_body,
                                           methods=["POST"])],
                    exception_handlers=error_handlers(meter))
    app.add_middleware(RequestIdMiddleware)
    return app


async def post(app: Starlette, model: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.post("/v1/completions", json={"model": model, "prompt": "x"})


async def test_any_admitter_is_asked_and_released_after_the_answer() -> None:
    admitter = CountingAdmitter()
    with respx.mock() as mock:
        mock.post(f"{B}/v1/completions").respond(200, json={"ok": True})
        resp = await post(app_with(admitter), "b")
    assert resp.json() == {"ok": True}
    assert (admitter.admitted, admitter.released, admitter.revived) == (["b"], ["b"], [])


async def test_the_admitter_revives_a_model_whose_replicas_all_refuse() -> None:
    admitter = CountingAdmitter(revive=True)
    calls = 0

    def refuse_then_answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 2:  # both replicas refuse; after the revival the first answers
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": True})

    with respx.mock() as mock:
        mock.post(f"{A1}/v1/completions").mock(side_effect=refuse_then_answer)
        mock.post(f"{A2}/v1/completions").mock(side_effect=refuse_then_answer)
        resp = await post(app_with(admitter), "a")
    assert resp.status_code == 200 and calls == 3
    assert (admitter.revived, admitter.released) == (["a"], ["a"])


async def test_without_revival_the_refusal_is_answered_and_the_slot_released() -> None:
    admitter = CountingAdmitter(revive=False)
    with respx.mock() as mock:
        mock.post(f"{B}/v1/completions").mock(side_effect=httpx.ConnectError("refused"))
        resp = await post(app_with(admitter), "b")
    assert resp.status_code == 502
    assert (admitter.admitted, admitter.revived, admitter.released) == (["b"], ["b"], ["b"])
