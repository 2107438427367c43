"""`POST /v1/infer`: translation to /v1/completions, the answer's shape, and errors (upstream
mocked with respx; against the simulator in test_gateway_service.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from fleet.registry import parse_registry
from gateway import compat, errors
from gateway.app import create_app
from gateway.settings import GatewaySettings

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

R = "http://127.0.0.1:9301"
REG = parse_registry(f'[models.r]\nurl = "{R}"\nserved_model_name = "tiny"\naliases = ["rr"]\n')
COMPLETION = {"id": "cmpl-1", "object": "text_completion", "model": "tiny",
              "choices": [{"index": 0, "text": " world", "finish_reason": "length"}]}


@pytest.fixture
async def gw() -> AsyncIterator[tuple[httpx.AsyncClient, respx.MockRouter]]:
    app = create_app(REG, GatewaySettings())
    with respx.mock(assert_all_called=False) as mock:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://gw") as client:
                yield client, mock


def test_completion_body_merges_params() -> None:
    body = compat.completion_body("tiny", "Hi", {"max_new_tokens": 3, "temperature": 0,
                                                 "stop_sequences": ["\n"], "seed": 1})
    assert body == {"max_tokens": 3, "temperature": 0, "stop": ["\n"], "seed": 1,
                    "model": "tiny", "prompt": "Hi", "stream": False}
    for bad in ({"stream": True}, {"prompt": "x"}, {"max_tokens": 1, "max_new_tokens": 2}):
        with pytest.raises(errors.GatewayError) as info:
            compat.completion_body("tiny", "Hi", bad)
        assert info.value.status == 400 and info.value.param.startswith("params.")


@pytest.mark.parametrize(("body", "param"), [
    (b'{"input": "x"}', "model_id"),
    (b'{"model_id": "r", "input": 3}', "input"),
    (b'{"model_id": "r", "input": "x", "params": [1]}', "params"),
    (b'{"model_id": "r", "input": "x", "prompt": "y"}', "prompt"),
    (b'[1]', "body"),
    (b'', "body"),
])
def test_bad_requests_name_the_field(body: bytes, param: str) -> None:
    with pytest.raises(errors.GatewayError) as info:
        compat.parse_request(body)
    assert info.value.status == 400 and info.value.param == param


def test_answer_shapes() -> None:
    status, out = compat.answer(200, json.dumps(COMPLETION).encode(), "rr", "r")
    assert status == 200
    assert json.loads(out) == {"text": " world", "model_id": "rr", "finish_reason": "length"}
    raw = b'{"error":{"message":"too long","type":"BadRequestError","param":null,"code":400}}'
    assert compat.answer(400, raw, "rr", "r") == (400, raw)
    with pytest.raises(errors.GatewayError) as info:
        compat.answer(200, b'{"object": "list"}', "rr", "r")
    assert info.value.status == 502
    with pytest.raises(errors.GatewayError) as info:
        compat.answer(500, b"Internal Server Error", "rr", "r")
    assert info.value.status == 500 and "Internal Server Error" not in info.value.message
    assert "Internal Server Error" in (info.value.internal or "")  # for the log only


async def test_infer_through_the_app(gw) -> None:
    client, mock = gw
    route = mock.post(f"{R}/v1/completions").respond(200, json=COMPLETION)
    resp = await client.post("/v1/infer", json={"model_id": "rr", "input": "Hello",
                                                "params": {"max_tokens": 2, "top_p": 0.5}},
                             headers={"accept-encoding": "gzip", "x-request-id": "inf-1"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "inf-1"
    assert resp.json() == {"text": " world", "model_id": "rr", "finish_reason": "length"}
    sent = route.calls.last.request
    assert json.loads(sent.content) == {"max_tokens": 2, "top_p": 0.5, "model": "tiny",
                                        "prompt": "Hello", "stream": False}
    assert sent.url.path == "/v1/completions" and sent.headers["accept-encoding"] == "identity"
    assert sent.headers["x-request-id"] == "inf-1"


async def test_infer_errors_are_vllm_shaped(gw) -> None:
    client, mock = gw
    raw = (b'{"error":{"message":"max_tokens must be at least 1","type":"BadRequestError",'
           b'"param":"max_tokens","code":400}}')
    mock.post(f"{R}/v1/completions").respond(400, content=raw,
                                             headers={"content-type": "application/json"})
    resp = await client.post("/v1/infer", json={"model_id": "r", "input": "x",
                                                "params": {"max_tokens": 0}})
    assert (resp.status_code, resp.content) == (400, raw)
    resp = await client.post("/v1/infer", json={"model_id": "nope", "input": "x"})
    assert resp.status_code == 404 and "`nope`" in resp.json()["error"]["message"]
    resp = await client.post("/v1/infer", content=b"{")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == 400
    mock.post(f"{R}/v1/completions").mock(side_effect=httpx.ConnectError("refused"))
    resp = await client.post("/v1/infer", json={"model_id": "r", "input": "x"})
    assert resp.status_code == 502 and resp.json()["error"]["type"] == "BadGatewayError"
    assert (await client.get("/v1/infer")).status_code == 405
