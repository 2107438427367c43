"""The gateway app in isolation: upstreams mocked with respx, the app called in-process.

Covers routing (name, alias, prefix, multipart), body rewriting, every error the gateway
answers itself, pass-through of upstream errors, request ids and headers. The same paths
run over real sockets against the simulator in test_gateway_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from fleet.registry import parse_registry
from gateway.app import create_app
from gateway.settings import GatewaySettings

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

A = "http://127.0.0.1:9001"
R = "http://127.0.0.1:9002"
REG = parse_registry(f"""
[models.a]
source = "org/a"
port = 9001
aliases = ["gpt-4o-mini"]
[models.r]
url = "{R}"
served_model_name = "tiny"
""")
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def gw() -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    settings = GatewaySettings(max_body_bytes=1000, retry_after=3)
    app = create_app(REG, settings)
    with respx.mock(assert_all_called=False) as mock:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                yield client, mock


def error_of(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"]
    assert body["error"]["code"] == status
    return body["error"]


def echo(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=request.content,
                          headers={"content-type": "application/json",
                                   "x-seen-path": request.url.path,
                                   "x-seen-id": request.headers.get("x-request-id", "")})


async def test_routes_by_name_and_alias_byte_for_byte(gw) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").mock(side_effect=echo)
    for name in ("a", "gpt-4o-mini"):
        raw = json.dumps({"model": name, **CHAT}, indent=1).encode()
        resp = await client.post("/v1/chat/completions", content=raw,
                                 headers={"content-type": "application/json"})
        assert resp.status_code == 200 and resp.content == raw  # served name: not re-encoded


async def test_remote_model_gets_its_served_name(gw) -> None:
    client, mock = gw
    mock.post(f"{R}/v1/completions").mock(side_effect=echo)
    resp = await client.post("/v1/completions", json={"model": "r", "prompt": "x"})
    assert resp.json() == {"model": "tiny", "prompt": "x"}


async def test_prefix_route_fills_in_the_model(gw) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").mock(side_effect=echo)
    mock.post(f"{R}/tokenize").mock(side_effect=echo)
    resp = await client.post("/gpt-4o-mini/v1/chat/completions", json=CHAT)
    assert resp.json() == {**CHAT, "model": "a"}
    resp = await client.post("/r/tokenize", json={"prompt": "x"})
    assert resp.json()["model"] == "tiny" and resp.headers["x-seen-path"] == "/tokenize"


async def test_prefix_and_body_disagree(gw) -> None:
    client, _ = gw
    err = error_of(await client.post("/a/v1/chat/completions", json={"model": "r", **CHAT}), 400)
    assert "`a`" in err["message"] and "`r`" in err["message"]


async def test_multipart_routed_by_form_field(gw) -> None:
    client, mock = gw
    mock.post(f"{R}/v1/audio/transcriptions").mock(side_effect=echo)
    resp = await client.post("/v1/audio/transcriptions", data={"model": "r"},
                             files={"file": ("a.wav", b"RIFF....", "audio/wav")})
    assert resp.status_code == 200
    assert b'name="model"\r\n\r\ntiny\r\n' in resp.content


async def test_unknown_model_lists_valid_names(gw) -> None:
    client, _ = gw
    err = error_of(await client.post("/v1/chat/completions", json={"model": "nope", **CHAT}), 404)
    assert err["type"] == "NotFoundError" and err["param"] == "model"
    assert "`nope`" in err["message"] and "a, gpt-4o-mini, r" in err["message"]
    err = error_of(await client.post("/nope/v1/chat/completions", json=CHAT), 404)
    assert "`nope`" in err["message"]


async def test_bad_bodies(gw) -> None:
    client, _ = gw
    err = error_of(await client.post("/v1/chat/completions", content=b'{"model": "a", '), 400)
    assert "not valid JSON" in err["message"]
    err = error_of(await client.post("/v1/chat/completions", json=CHAT), 400)
    assert "names no model" in err["message"] and "a, gpt-4o-mini, r" in err["message"]
    err = error_of(await client.post("/v1/chat/completions", content=b""), 400)
    assert err["param"] == "model"
    error_of(await client.post("/v1/chat/completions", json=[1]), 400)
    error_of(await client.post("/v1/chat/completions", json={"model": ["a"]}), 400)


async def test_body_too_large(gw) -> None:
    client, _ = gw
    big = json.dumps({"model": "a", "prompt": "x" * 2000}).encode()
    err = error_of(await client.post("/v1/completions", content=big), 413)
    assert "1000 bytes" in err["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted while read
        for _ in range(20):
            yield b" " * 100

    error_of(await client.post("/v1/completions", content=chunks()), 413)


@pytest.mark.parametrize(("exc", "status"), [
    (httpx.ConnectError("[Errno 111] Connect call failed ('127.0.0.1', 9001)"), 502),
    (httpx.RemoteProtocolError("Server disconnected"), 502),
    (httpx.ConnectTimeout("timed out"), 503),
    (httpx.ReadTimeout("timed out"), 504),
])
async def test_upstream_failures(gw, exc: Exception, status: int) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").mock(side_effect=exc)
    resp = await client.post("/v1/chat/completions", json={"model": "a", **CHAT},
                             headers={"x-request-id": "req-up-1"})
    err = error_of(resp, status)
    assert "`a`" in err["message"] and "req-up-1" in err["message"]
    # The upstream's address and the client library's words stay in the gateway's log.
    assert "9001" not in err["message"] and str(exc) not in err["message"], err["message"]
    assert ("retry-after" in resp.headers) == (status == 503)


async def test_upstream_errors_pass_through_unchanged(gw) -> None:
    client, mock = gw
    raw = (b'{"error":{"message":"temperature must be non-negative, got -3.0.","type":'
           b'"BadRequestError","param":"temperature","code":400}}')
    mock.post(f"{A}/v1/chat/completions").respond(400, content=raw,
                                                 headers={"content-type": "application/json"})
    resp = await client.post("/v1/chat/completions", json={"model": "a", "temperature": -3})
    assert (resp.status_code, resp.content) == (400, raw)


async def test_upstream_503_gets_retry_after(gw) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").respond(503, json={"error": {"message": "x"}})
    resp = await client.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "3"


async def test_request_id_kept_forwarded_and_returned(gw) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").mock(side_effect=echo)
    resp = await client.post("/v1/chat/completions", json={"model": "a", **CHAT},
                             headers={"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123" == resp.headers["x-seen-id"]
    resp = await client.post("/v1/chat/completions", json={"model": "a", **CHAT})
    generated = resp.headers["x-request-id"]
    assert len(generated) == 32 and resp.headers["x-seen-id"] == generated
    resp = await client.post("/v1/chat/completions", json={"model": "nope"})
    assert len(resp.headers["x-request-id"]) == 32  # errors carry one too


async def test_stream_headers_and_hop_by_hop(gw) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").respond(
        200, content=b"data: {}\n\ndata: [DONE]\n\n",
        headers={"content-type": "text/event-stream; charset=utf-8", "connection": "close",
                 "server": "uvicorn", "vary": "Origin"})
    resp = await client.post("/v1/chat/completions", json={"model": "a", "stream": True, **CHAT})
    assert resp.content == b"data: {}\n\ndata: [DONE]\n\n"
    assert resp.headers["x-accel-buffering"] == "no" and resp.headers["cache-control"] == "no-cache"
    assert resp.headers["vary"] == "Origin" and "connection" not in resp.headers


class BreakingStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"n":1}\n\n'
        yield b'data: {"n":'
        raise httpx.ReadError("connection reset by peer")


async def test_upstream_breaking_mid_stream_ends_with_an_error_event(gw) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").respond(
        200, stream=BreakingStream(), headers={"content-type": "text/event-stream"})
    resp = await client.post("/v1/chat/completions", json={"model": "a", "stream": True, **CHAT},
                             headers={"x-request-id": "rid-broken"})
    events = resp.content.split(b"\n\n")
    assert events[0] == b'data: {"n":1}'
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["code"] == 502 and "broke off" in error["message"]
    # The client library's words are for the log; the caller gets the request id.
    assert "reset by peer" not in error["message"] and "ReadError" not in error["message"]
    assert "rid-broken" in error["message"]


async def test_models_listing_and_lookup(gw) -> None:
    client, mock = gw
    mock.get(f"{A}/health").respond(200)
    mock.get(f"{R}/health").mock(side_effect=httpx.ConnectError("refused"))
    resp = await client.get("/v1/models")
    data = {m["id"]: m for m in resp.json()["data"]}
    # Aliases are entries of their own (model pickers in chat UIs list ids only).
    assert resp.json()["object"] == "list" and list(data) == ["a", "gpt-4o-mini", "r"]
    assert data["a"]["object"] == "model" and data["a"]["aliases"] == ["gpt-4o-mini"]
    assert (data["a"]["state"], data["r"]["state"]) == ("ready", "unreachable")
    alias = data["gpt-4o-mini"]
    assert alias["object"] == "model" and alias["alias_of"] == "a" and alias["state"] == "ready"
    assert "alias_of" not in data["a"]
    assert (await client.get("/v1/models/gpt-4o-mini")).json()["id"] == "a"
    error_of(await client.get("/v1/models/nope"), 404)


async def test_models_listing_without_alias_entries() -> None:
    app = create_app(REG, GatewaySettings(list_aliases=False))
    with respx.mock(assert_all_called=False) as mock:
        mock.get(f"{A}/health").respond(200)
        mock.get(f"{R}/health").respond(200)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            data = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in data] == ["a", "r"]


async def test_instance_health_through_the_gateway(gw) -> None:
    client, mock = gw
    mock.get(f"{A}/health").respond(200)
    mock.get(f"{R}/health").mock(side_effect=httpx.ConnectError("refused"))
    assert (await client.get("/a/health")).status_code == 200
    assert (await client.get("/gpt-4o-mini/health")).status_code == 200
    error_of(await client.get("/r/health"), 502)
    assert (await client.get("/health")).json() == {"status": "ok", "models": 2}


@pytest.mark.parametrize("path", ["/sleep", "/wake_up", "/collective_rpc", "/a/sleep",
                                  "/a/wake_up", "/a/reset_prefix_cache", "/a/start_profile",
                                  "/a/is_sleeping", "/a/metrics", "/v1/nothing", "/a/../sleep"])
async def test_dev_endpoints_and_unknown_paths_are_unreachable(gw, path: str) -> None:
    client, mock = gw
    route = mock.route(host="127.0.0.1")
    for method in ("GET", "POST"):
        resp = await client.request(method, path, json={"model": "a"})
        assert resp.status_code in (404, 405)
        error_of(resp, resp.status_code)
    assert not route.called


async def test_wrong_method(gw) -> None:
    client, _ = gw
    err = error_of(await client.get("/v1/chat/completions"), 405)
    assert "GET" in err["message"]
    error_of(await client.get("/a/v1/chat/completions"), 405)


async def test_unexpected_failure_is_a_json_500(gw) -> None:
    client, mock = gw
    mock.post(f"{A}/v1/chat/completions").mock(side_effect=RuntimeError("boom"))
    app_client = httpx.AsyncClient(transport=httpx.ASGITransport(
        app=client._transport.app, raise_app_exceptions=False), base_url="http://gw")
    resp = await app_client.post("/v1/chat/completions", json={"model": "a", **CHAT})
    err = error_of(resp, 500)
    assert "request id" in err["message"] and "Traceback" not in resp.text
    await app_client.aclose()


async def test_a_reload_during_a_listing_or_a_request_is_no_500() -> None:
    """`apply` swaps the routing table while handlers await: they use what they started with
    (listings) or answer 404 for a model the reload removed (requests)."""
    import asyncio

    app = create_app(REG, GatewaySettings())
    gw = app.state.gateway
    probing, release = asyncio.Event(), asyncio.Event()

    async def slow_health(request: httpx.Request) -> httpx.Response:
        probing.set()
        await release.wait()
        return httpx.Response(200)

    with respx.mock(assert_all_called=False) as mock:
        mock.get(f"{A}/health").mock(side_effect=slow_health)
        mock.get(f"{R}/health").respond(200)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                listing = asyncio.create_task(client.get("/v1/models"))
                await probing.wait()
                gw.apply(parse_registry(f'[models.r]\nurl = "{R}"\nserved_model_name = "tiny"\n'))
                release.set()
                resp = await listing
                assert resp.status_code == 200
                assert [m["id"] for m in resp.json()["data"]] == ["a", "gpt-4o-mini", "r"]

                async def body() -> AsyncIterator[bytes]:  # the reload lands mid-body
                    yield b'{"messages": []'
                    gw.apply(parse_registry(f'[models.r]\nurl = "{R}"\n'))
                    yield b"}"

                gw.apply(REG)
                resp = await client.post("/a/v1/chat/completions", content=body())
                assert resp.status_code == 404 and "`a`" in resp.json()["error"]["message"]
