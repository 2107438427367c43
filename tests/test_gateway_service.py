"""The gateway's service layer over real sockets: `python -m gateway` in front of simulator
processes.

- every route of the app (walked from `app.routes`, so a new route cannot escape) needs its
  key: an API key, the admin key, or none for the public ones; vLLM's development endpoints
  stay unreachable whatever the key;
- a registry reload (POST /admin/reload and SIGHUP) with a stream in flight: the stream
  completes intact; an invalid registry leaves routing unchanged;
- /metrics reflects the requests served; `POST /v1/infer` answers from /v1/completions.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Route as StarletteRoute

from fleet.registry import parse_registry
from gateway.app import create_app
from gateway.settings import GatewaySettings

pytestmark = pytest.mark.gateway

MSG = [{"role": "user", "content": "Hello"}]
API, ADMIN = "sk-api-test", "sk-admin-test"
KEYS = {"GATEWAY_API_KEYS": API, "GATEWAY_ADMIN_KEY": ADMIN}
PUBLIC_PATHS = {"/health", "/metrics", "/ui", "/ui/", "/ui/static/dashboard.js"}  # no data
SAMPLE = {"model": "a", "model_id": "a", "rest": "v1/chat/completions", "name": "dashboard.js"}
ADMIN_PATHS = ("/admin", "/ui/api/logs/")


def registry_for(**servers: Any) -> str:
    return "".join(f'[models.{name}]\nurl = "{sim.base_url}"\nserved_model_name = '
                   f'"{sim.served_names[0]}"\n\n' for name, sim in servers.items())


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def concrete(path: str) -> str:
    """A route's path with its parameters filled in (`{model}` -> a, ...)."""
    return re.sub(r"{(\w+)(:\w+)?}", lambda m: SAMPLE[m.group(1)], path)


def walk(registry_text: str) -> list[tuple[str, str, str]]:
    """(method, path, route path) for every route and method of the app."""
    app = create_app(parse_registry(registry_text), GatewaySettings(api_keys=API,
                                                                    admin_key=ADMIN))
    out = []
    for route in app.routes:
        assert isinstance(route, StarletteRoute), f"unexpected route kind {route!r}: walk it too"
        for method in sorted(route.methods or {"GET", "POST", "DELETE"}):
            if method != "HEAD":
                out.append((method, concrete(route.path), route.path))
    return out


def test_every_route_needs_its_key(sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("tiny",))
    reg = registry_for(a=sim)
    gw = gateway_factory(reg, KEYS)
    calls = walk(reg)
    seen_paths = {route_path for _, _, route_path in calls}
    for expected in ("/v1/chat/completions", "/v1/infer", "/admin/reload", "/{model}/{rest:path}",
                     "/admin/switch/{model:path}", "/metrics"):
        assert expected in seen_paths
    body = {"model": "a", "messages": MSG, "max_tokens": 1}
    with httpx.Client(base_url=gw.base_url, timeout=10) as client:
        for method, path, route_path in calls:
            def status(**headers: str) -> int:
                return client.request(method, path, json=body, headers=headers).status_code

            where = f"{method} {path} ({route_path})"
            if path in PUBLIC_PATHS:
                assert status() in (200, 307), where
                continue
            assert status() == 401, where
            assert status(**bearer("sk-wrong")) == 401, where
            if route_path.startswith(ADMIN_PATHS):
                assert status(**bearer(API)) == 403, where  # known, but not the admin key
                assert status(**bearer(ADMIN)) not in (401, 403), where
            else:
                assert status(**bearer(API)) not in (401, 403), where
                assert status(**{"x-api-key": API}) not in (401, 403), where
        assert client.post("/v1/chat/completions", json=body,
                           headers=bearer(API)).status_code == 200


def test_admin_endpoints_are_off_without_an_admin_key(sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("tiny",))
    reg = registry_for(a=sim)
    gw = gateway_factory(reg, {"GATEWAY_API_KEYS": API})
    admin_calls = [(m, p) for m, p, rp in walk(reg) if rp.startswith(ADMIN_PATHS)]
    assert len(admin_calls) >= 5
    for method, path in admin_calls:
        for headers in ({}, bearer(API), bearer(ADMIN)):
            resp = httpx.request(method, f"{gw.base_url}{path}", headers=headers, timeout=10)
            assert resp.status_code == 403, (method, path)
            assert "GATEWAY_ADMIN_KEY" in resp.json()["error"]["message"]


DEV_PATHS = ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache",
             "/start_profile", "/stop_profile", "/a/sleep", "/a/wake_up", "/a/is_sleeping",
             "/a/collective_rpc", "/a/reset_prefix_cache", "/a/start_profile", "/a/../sleep",
             "/a/%2e%2e/sleep", "/a//sleep", "/admin/../sleep", "/v1/../sleep"]


def test_dev_endpoints_are_unreachable_with_any_key(sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("tiny",), env={"VLLM_SERVER_DEV_MODE": "1"})
    gw = gateway_factory(registry_for(a=sim), KEYS)
    with httpx.Client(base_url=gw.base_url, timeout=10) as client:
        for path in DEV_PATHS:
            for method in ("GET", "POST"):
                for key in (API, ADMIN):
                    resp = client.request(method, path, json={"model": "a"},
                                          headers=bearer(key))
                    assert resp.status_code in (404, 405), (method, path, resp.text)
    assert httpx.get(sim.url("/is_sleeping"), timeout=5).json() == {"is_sleeping": False}
    assert httpx.get(sim.url("/sim/requests"), timeout=5).json()["requests"] == []


# -- reload -----------------------------------------------------------------------------------


class Stream:
    """A streamed chat request read in a thread; `first` is set once a chunk arrived."""

    def __init__(self, base_url: str, model: str, max_tokens: int) -> None:
        self.first = threading.Event()
        self.lines: list[str] = []
        self.error: BaseException | None = None
        body = {"model": model, "messages": MSG, "max_tokens": max_tokens, "stream": True}
        self.thread = threading.Thread(target=self._run, args=(base_url, body), daemon=True)
        self.thread.start()

    def _run(self, base_url: str, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                              headers=bearer(API), timeout=30) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.first.set()
        except BaseException as exc:  # reported by result()
            self.error = exc
        finally:
            self.first.set()

    def result(self) -> list[str]:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.lines


def content_tokens(lines: list[str]) -> int:
    return sum(1 for line in lines if '"content":"' in line and '"content":""' not in line)


def poll(check: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)  # poll interval; the deadline bounds the wait
    raise AssertionError(f"{what} not seen within {deadline_s} s")


def model_ids(base_url: str) -> set[str]:
    resp = httpx.get(f"{base_url}/v1/models", headers=bearer(API), timeout=10)
    return {m["id"] for m in resp.json()["data"]}


@pytest.mark.parametrize("trigger", ["admin", "sighup"])
def test_reload_keeps_a_stream_in_flight(sim_factory, gateway_factory, trigger: str) -> None:
    slow = sim_factory(served_names=("slow",), itl_ms=100)
    other = sim_factory(served_names=("other",))
    gw = gateway_factory(registry_for(s=slow), KEYS)
    stream = Stream(gw.base_url, "s", max_tokens=20)
    assert stream.first.wait(10) and stream.error is None
    # The new registry drops the streaming model and adds another.
    gw.registry.write_text(registry_for(b=other))
    if trigger == "admin":
        resp = httpx.post(f"{gw.base_url}/admin/reload", headers=bearer(ADMIN), timeout=10)
        assert resp.status_code == 200, resp.text
        assert (resp.json()["added"], resp.json()["removed"]) == (["b"], ["s"])
    else:
        gw.process.send_signal(signal.SIGHUP)
        poll(lambda: model_ids(gw.base_url) == {"b"}, "the reloaded registry")
    assert stream.thread.is_alive()  # the reload happened while the stream was in flight
    lines = stream.result()
    assert content_tokens(lines) == 20 and lines[-1] == "data: [DONE]", lines[-3:]
    assert httpx.get(slow.url("/sim/requests"), timeout=5).json()["requests"][-1][
        "outcome"] == "completed"
    chat = {"messages": MSG, "max_tokens": 2}
    assert httpx.post(f"{gw.base_url}/v1/chat/completions", json={"model": "b", **chat},
                      headers=bearer(API), timeout=10).status_code == 200
    assert httpx.post(f"{gw.base_url}/v1/chat/completions", json={"model": "s", **chat},
                      headers=bearer(API), timeout=10).status_code == 404


def test_invalid_registry_leaves_routing_unchanged(sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("tiny",))
    gw = gateway_factory(registry_for(a=sim), KEYS)
    good = gw.registry.read_text()
    gw.registry.write_text(good + '[models.b]\nurl = "http://127.0.0.1:1"\nprot = 1\n')
    resp = httpx.post(f"{gw.base_url}/admin/reload", headers=bearer(ADMIN), timeout=10)
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["type"] == "BadRequestError"
    assert "unknown field 'prot'" in err["message"] and str(gw.registry) in err["message"]
    gw.process.send_signal(signal.SIGHUP)
    poll(lambda: metric(gw.base_url, "gateway_reloads_total", outcome="invalid") == 2,
         "the rejected SIGHUP reload")
    assert model_ids(gw.base_url) == {"a"}
    assert httpx.post(f"{gw.base_url}/v1/chat/completions", headers=bearer(API), timeout=10,
                      json={"model": "a", "messages": MSG, "max_tokens": 1}).status_code == 200
    assert gw.process.poll() is None


# -- metrics and compatibility ----------------------------------------------------------------


def metric(base_url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def test_metrics_reflect_requests(sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("tiny",), itl_ms=50)
    gw = gateway_factory(registry_for(a=sim))
    url = f"{gw.base_url}/v1/chat/completions"
    for _ in range(3):
        assert httpx.post(url, json={"model": "a", "messages": MSG, "max_tokens": 2},
                          timeout=10).status_code == 200
    assert httpx.post(url, json={"model": "a", "messages": MSG, "temperature": -1},
                      timeout=10).status_code == 400
    assert httpx.post(url, json={"model": "zz", "messages": MSG}, timeout=10).status_code == 404
    stream = Stream(gw.base_url, "a", max_tokens=20)
    assert stream.first.wait(10)
    poll(lambda: metric(gw.base_url, "gateway_in_flight_requests", model="a") == 1,
         "the stream in flight")
    assert content_tokens(stream.result()) == 20
    base = gw.base_url
    assert metric(base, "gateway_requests_total", model="a", status="200") == 4
    assert metric(base, "gateway_requests_total", model="a", status="400") == 1
    assert metric(base, "gateway_rejected_requests_total", status="404") == 1
    assert metric(base, "gateway_request_duration_seconds_count", model="a") == 5
    assert metric(base, "gateway_time_to_first_chunk_seconds_count", model="a") == 1
    assert metric(base, "gateway_request_duration_seconds_bucket", model="a", le="0.5") < 5
    assert metric(base, "gateway_in_flight_requests", model="a") == 0
    assert metric(base, "gateway_queued_requests", model="a") == 0


def test_infer_answers_like_completions(sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("tiny",))
    gw = gateway_factory(registry_for(a=sim))
    direct = httpx.post(sim.url("/v1/completions"), timeout=10, json={
        "model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})
    resp = httpx.post(f"{gw.base_url}/v1/infer", timeout=10, json={
        "model_id": "a", "input": "Once upon a time",
        "params": {"max_new_tokens": 5, "temperature": 0}})
    assert resp.status_code == 200, resp.text
    choice = direct.json()["choices"][0]
    assert resp.json() == {"text": choice["text"], "model_id": "a",
                           "finish_reason": choice["finish_reason"]}
    too_long = httpx.post(f"{gw.base_url}/v1/infer", timeout=10, json={
        "model_id": "a", "input": "x", "params": {"max_tokens": 10**6}})
    direct_err = httpx.post(sim.url("/v1/completions"), timeout=10, json={
        "model": "tiny", "prompt": "x", "max_tokens": 10**6, "stream": False})
    assert (too_long.status_code, too_long.content) == (direct_err.status_code,
                                                        direct_err.content)
    assert too_long.status_code == 400
