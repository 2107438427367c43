"""`POST /v1/infer`: the older single-call inference API, answered through `/v1/completions`.

    {"model_id": "llama", "input": "Once upon", "params": {"max_tokens": 16, "temperature": 0}}
    -> {"text": " a time", "model_id": "llama", "finish_reason": "length"}

`params` are merged into the completions body (`max_tokens`, `temperature`, `top_p`, `stop`,
`seed`, any other vLLM sampling parameter; `max_new_tokens` and `stop_sequences` are accepted
as synonyms of `max_tokens` and `stop`). Never streamed. The request goes the same way as any
other (keys and allow-lists, limits and queue, activation, failover, metrics); errors are in
vLLM's shape, and the upstream's own errors pass through unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from gateway import auth, errors
from gateway import body as bodies
from gateway.ports import Forwarder
from gateway.relay import UpstreamBroken

FIELDS = ("model_id", "input", "params")
RESERVED = ("model", "prompt", "stream", "stream_options")
SYNONYMS = {"max_new_tokens": "max_tokens", "stop_sequences": "stop"}
_DROP = (b"accept-encoding", b"content-type")  # the answer is parsed: no content coding


def completion_body(upstream_model: str, text: str, params: dict[str, Any]) -> dict[str, Any]:
    """The /v1/completions body for an infer request; GatewayError 400 for a bad `params`."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in RESERVED:
            raise errors.GatewayError(400, f"`params.{key}` is set by /v1/infer itself; remove "
                                           f"it (use /v1/completions for full control).",
                                      param=f"params.{key}")
        name = SYNONYMS.get(key, key)
        if name in out:
            raise errors.GatewayError(400, f"`params` sets `{name}` twice (as `{key}` too); "
                                           f"keep one.", param=f"params.{key}")
        out[name] = value
    return {**out, "model": upstream_model, "prompt": text, "stream": False}


def parse_request(payload: bytes) -> tuple[str, str, dict[str, Any]]:
    parsed = bodies.parse(payload, "application/json")
    if parsed.data is None:
        raise errors.GatewayError(400, "The body must be a JSON object with `model_id`, `input` "
                                       "and optional `params`.", param="body")
    data = parsed.data
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise errors.GatewayError(400, f"Unknown field(s) {', '.join(unknown)}; /v1/infer takes "
                                       f"{', '.join(FIELDS)}.", param=unknown[0])
    model_id, text, params = data.get("model_id"), data.get("input"), data.get("params", {})
    if not isinstance(model_id, str) or not model_id:
        raise errors.GatewayError(400, "`model_id` must name a model (a name or alias).",
                                  param="model_id")
    if not isinstance(text, str):
        raise errors.GatewayError(400, "`input` must be a string (the prompt).", param="input")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise errors.GatewayError(400, "`params` must be an object of sampling parameters.",
                                  param="params")
    return model_id, text, params


def answer(status: int, content: bytes, model_id: str, model: str) -> tuple[int, bytes]:
    """The infer answer (status, JSON body) for the upstream's completion answer."""
    try:
        data = json.loads(content) if content else None
    except ValueError:
        data = None
    if status == 200:
        try:
            choice = data["choices"][0]  # type: ignore[index]
            result = {"text": choice["text"], "model_id": model_id,
                      "finish_reason": choice.get("finish_reason")}
        except (TypeError, KeyError, IndexError):
            raise errors.upstream_bad_answer(model, 200, "not a completion: " +
                                             content[:200].decode("utf-8", "replace")) from None
        return 200, json.dumps(result, ensure_ascii=False).encode()
    if isinstance(data, dict) and "error" in data:
        return status, content  # vLLM's error, unchanged
    raise errors.upstream_bad_answer(model, status, content[:200].decode("utf-8", "replace"))


async def infer(proxy: Forwarder, request: Request) -> Response:
    with proxy.budget.hold() as hold:  # the body's bytes count until it has been sent
        return await _infer(proxy, request, await proxy.read_body(request, hold))


async def _infer(proxy: Forwarder, request: Request, payload: bytes) -> Response:
    model_id, text, params = parse_request(payload)
    state = proxy.state
    route = state.table.resolve(model_id)
    if route is None:
        principal = getattr(request.state, "principal", None)
        raise errors.unknown_model(model_id, auth.visible_names(principal, state.registry))
    body = json.dumps(completion_body(route.upstream_model, text, params),
                      ensure_ascii=False).encode()
    scope = dict(request.scope)  # same state (request id, principal), own headers
    scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k not in _DROP]
    scope["headers"] += [(b"content-type", b"application/json"), (b"accept-encoding", b"identity")]
    inner = Request(scope, request.receive)
    response = await proxy.send(inner, state, route, "POST", "/v1/completions", body)
    try:
        status, content = await _collect(response, inner)
    except UpstreamBroken as exc:
        raise errors.GatewayError(502, f"The answer of model `{route.model}` broke off; retry "
                                       f"the request.", internal=str(exc)) from None
    status, out = answer(status, content, model_id, route.model)
    return Response(out, status_code=status, media_type="application/json",
                    headers={"x-request-id": getattr(request.state, "request_id", "-")})


async def _collect(response: Response, request: Request) -> tuple[int, bytes]:
    """Run an ASGI response in-process and keep what it sends (status and body)."""
    status = 0
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await response(request.scope, request.receive, send)
    return status, b"".join(chunks)
