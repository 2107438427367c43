"""The gateway over real sockets: `python -m gateway` in front of simulator processes.

The official `openai` client is the caller. What it gets through the gateway must equal what
it gets from the simulator directly (ids and timestamps aside).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.gateway

MSG = [{"role": "user", "content": "Hello there"}]


def registry_for(**servers: Any) -> str:
    lines = []
    for name, sim in servers.items():
        served = sim.served_names[0]
        lines += [f"[models.{name}]", f'url = "{sim.base_url}"', f'served_model_name = "{served}"',
                  f'aliases = ["{name}-alias"]', ""]
    return "\n".join(lines)


@pytest.fixture
def two_models(sim_factory, gateway_factory):
    a = sim_factory(served_names=("tiny-a",))
    b = sim_factory(served_names=("tiny-b",))
    gw = gateway_factory(registry_for(a=a, b=b))
    return gw, a, b


def strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("*" if k in ("id", "created", "model") else strip_volatile(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def test_openai_client_chat_completions_and_models_as_direct(two_models) -> None:
    gw, a, _ = two_models
    via = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="x", max_retries=0)
    direct = openai.OpenAI(base_url=f"{a.base_url}/v1", api_key="x", max_retries=0)

    got = via.chat.completions.create(model="a", messages=MSG, max_tokens=5)
    want = direct.chat.completions.create(model="tiny-a", messages=MSG, max_tokens=5)
    assert strip_volatile(got.model_dump()) == strip_volatile(want.model_dump())
    assert got.usage.completion_tokens == 5

    got_c = via.completions.create(model="a-alias", prompt="Hello", max_tokens=4)
    want_c = direct.completions.create(model="tiny-a", prompt="Hello", max_tokens=4)
    assert strip_volatile(got_c.model_dump()) == strip_volatile(want_c.model_dump())

    chunks = list(via.chat.completions.create(model="a", messages=MSG, max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}))
    direct_chunks = list(direct.chat.completions.create(
        model="tiny-a", messages=MSG, max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert [strip_volatile(c.model_dump()) for c in chunks] == \
        [strip_volatile(c.model_dump()) for c in direct_chunks]
    assert chunks[-1].usage is not None

    listed = {m.id: m for m in via.models.list()}
    assert set(listed) == {"a", "a-alias", "b", "b-alias"}  # aliases are entries too
    assert listed["a-alias"].model_extra["alias_of"] == "a"
    assert listed["a"].model_extra["state"] == "ready"
    assert listed["a"].model_extra["aliases"] == ["a-alias"]


def test_route_prefix_and_aliases_reach_the_right_model(two_models) -> None:
    gw, _, _ = two_models
    for prefix, served in (("a", "tiny-a"), ("b", "tiny-b"), ("b-alias", "tiny-b")):
        client = openai.OpenAI(base_url=f"{gw.base_url}/{prefix}/v1", api_key="x", max_retries=0)
        # the body's model may be omitted under a prefix: send it raw to prove it
        resp = client.post("/chat/completions", cast_to=httpx.Response,
                           body={"messages": MSG, "max_tokens": 2})
        assert resp.json()["model"] == served
        out = client.chat.completions.create(model=prefix, messages=MSG, max_tokens=2)
        assert out.model == served
    health = httpx.get(f"{gw.base_url}/b/health", timeout=5)
    assert health.status_code == 200


def test_stream_is_relayed_as_it_is_generated(sim_factory, gateway_factory) -> None:
    itl = 0.2
    sim = sim_factory(served_names=("slow",), itl_ms=int(itl * 1000))
    gw = gateway_factory(registry_for(s=sim))
    arrivals: list[float] = []
    body = {"model": "s", "messages": MSG, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", json=body,
                      timeout=10) as resp:
        assert resp.headers["x-accel-buffering"] == "no"
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 4
    # Each token came about one inter-token delay after the previous one: the first reached
    # the client before the second was generated, so nothing was buffered on the way.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) > itl * 0.5, gaps


def test_client_disconnect_aborts_upstream_within_a_second(sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("slow",), itl_ms=100)
    gw = gateway_factory(registry_for(s=sim))
    body = {"model": "s", "messages": MSG, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", json=body,
                      timeout=10) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
    closed_at = time.monotonic()
    record: dict[str, Any] = {}
    while time.monotonic() - closed_at < 1.0:  # poll the simulator's own request record
        state = httpx.get(sim.url("/sim/requests"), timeout=2).json()
        record = state["requests"][-1]
        if record["outcome"] is not None and state["running"] == 0:
            break
        time.sleep(0.02)
    assert record.get("outcome") == "aborted", record
    assert time.monotonic() - closed_at < 1.0
    assert record["completion_tokens"] < 500


def test_upstream_errors_pass_through_and_gateway_errors_are_json(two_models) -> None:
    gw, a, _ = two_models
    bad = {"messages": MSG, "temperature": -3}
    direct = httpx.post(f"{a.base_url}/v1/chat/completions", json={"model": "tiny-a", **bad})
    via = httpx.post(f"{gw.base_url}/v1/chat/completions", json={"model": "a", **bad})
    assert (via.status_code, via.content) == (direct.status_code, direct.content)
    assert via.status_code == 400

    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=MSG)
    assert "`nope`" in info.value.message and "a-alias" in info.value.message
    resp = httpx.post(f"{gw.base_url}/v1/chat/completions", content=b'{"model":',
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == 400


def test_dead_upstream_is_a_502_and_others_keep_serving(two_models) -> None:
    gw, a, b = two_models
    b.process.terminate()
    b.process.wait(timeout=10)
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="b", messages=MSG, max_tokens=2)
    assert info.value.status_code == 502
    assert "fleet up b" in info.value.message
    assert client.chat.completions.create(model="a", messages=MSG, max_tokens=2).choices
    states = {m["id"]: m["state"] for m in httpx.get(f"{gw.base_url}/v1/models").json()["data"]}
    assert states == {"a": "ready", "a-alias": "ready", "b": "unreachable",
                      "b-alias": "unreachable"}
