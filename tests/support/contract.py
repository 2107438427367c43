"""The vLLM 0.32.0 contract: what a server must look like from outside to pass for vLLM.

Target-agnostic checks, written from the reference captures of a real vLLM 0.32.0 CPU server.
Every check has the signature `check_x(base_url, model, max_model_len) -> None` and raises
AssertionError on a difference, so one list (`ALL_CHECKS`) runs against the simulator
(gateway tier), a real vLLM (vllm tier) or the gateway in front of either.

Only shapes are checked (field names and order, types, nulls, status, content types, SSE
framing, id formats, usage arithmetic); generated text, token ids and counts that depend on
the model are not. Requests send `ignore_eos` so a real model generates exactly `max_tokens`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import openai

TIMEOUT = httpx.Timeout(60.0, connect=10.0)
JSON_CT = "application/json"
SSE_CT = "text/event-stream; charset=utf-8"
CHAT_ID = re.compile(r"^chatcmpl-[0-9a-f]{16}$")
CMPL_ID = re.compile(r"^cmpl-[0-9a-f]{16}$")
FINGERPRINT = re.compile(r"^vllm-0\.32\.0-[0-9a-f]+$")
UNKNOWN_MODEL = "nope-not-served"

# Field order as vLLM 0.32.0 writes it (from the reference captures).
CHAT_KEYS = ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
             "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
             "ec_transfer_params", "metrics"]
CHAT_CHOICE_KEYS = ["index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids",
                    "routed_experts"]
CHAT_MESSAGE_KEYS = ["role", "content", "refusal", "annotations", "audio", "function_call",
                     "reasoning"]
USAGE_KEYS = ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
              "completion_tokens_details"]
STREAM_USAGE_KEYS = ["prompt_tokens", "total_tokens", "completion_tokens"]
CHUNK_ROLE_KEYS = ["id", "object", "created", "model", "choices", "prompt_token_ids",
                   "prompt_text"]
CHUNK_KEYS = ["id", "object", "created", "model", "choices"]
CHUNK_ROLE_CHOICE_KEYS = ["index", "delta", "logprobs", "finish_reason"]
CHUNK_CHOICE_KEYS = ["index", "delta", "logprobs", "finish_reason", "token_ids"]
CHUNK_LAST_CHOICE_KEYS = ["index", "delta", "logprobs", "finish_reason", "stop_reason",
                          "token_ids"]
CMPL_KEYS = ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
             "usage", "kv_transfer_params", "ec_transfer_params", "metrics"]
CMPL_CHOICE_KEYS = ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                    "prompt_logprobs", "prompt_token_ids", "routed_experts"]
CMPL_CHUNK_CHOICE_KEYS = ["index", "text", "logprobs", "finish_reason", "stop_reason",
                          "prompt_token_ids", "token_ids"]
MODEL_KEYS = ["id", "object", "created", "owned_by", "root", "parent", "max_model_len",
              "permission"]
PERMISSION_KEYS = ["id", "object", "created", "allow_create_engine", "allow_sampling",
                   "allow_logprobs", "allow_search_indices", "allow_view", "allow_fine_tuning",
                   "organization", "group", "is_blocking"]
ERROR_KEYS = ["message", "type", "param", "code"]
FINISHED = ("length", "stop")

Check = Callable[[str, str, int], None]


def _client() -> httpx.Client:
    return httpx.Client(timeout=TIMEOUT)


def _chat_body(model: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


def _keys(obj: dict[str, Any], expected: list[str], what: str) -> None:
    assert list(obj) == expected, f"{what}: keys {list(obj)} != {expected}"


def _content_type(r: httpx.Response, expected: str) -> None:
    assert r.headers.get("content-type") == expected, (
        f"{r.request.url.path}: content-type {r.headers.get('content-type')!r} != {expected!r}")


def _usage(usage: dict[str, Any], keys: list[str], completion: int | None) -> None:
    _keys(usage, keys, "usage")
    assert all(isinstance(usage[k], int) for k in STREAM_USAGE_KEYS), usage
    assert usage["prompt_tokens"] > 0, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    if completion is not None:
        assert usage["completion_tokens"] == completion, usage


def sse_events(r: httpx.Response) -> list[str]:
    """The `data:` payloads of a complete SSE body, checking vLLM's framing on the way."""
    text = r.read().decode()
    assert text.endswith("\n\n"), f"SSE body does not end with a blank line: {text[-80:]!r}"
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, f"bad SSE event {event!r}"
        payloads.append(event[len("data: "):])
    assert payloads and payloads[-1] == "[DONE]", f"stream does not end with [DONE]: {payloads[-1:]}"
    return payloads[:-1]


def _error(r: httpx.Response, status: int, err_type: str, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, f"HTTP {r.status_code} != {status}: {r.text}"
    _content_type(r, JSON_CT)
    body = r.json()
    assert list(body) == ["error"], body
    err = body["error"]
    _keys(err, ERROR_KEYS, "error")
    assert err["type"] == err_type, err
    assert err["code"] == status, err
    assert isinstance(err["message"], str) and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


# -- plain endpoints ---------------------------------------------------------------------------
def check_health(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.get(base_url + "/health")
    assert r.status_code == 200, r.status_code
    assert r.content == b"", r.content


def check_unknown_path(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.get(base_url + "/v1/nothing-here")
    assert r.status_code == 404, r.status_code
    _content_type(r, JSON_CT)
    assert r.json() == {"detail": "Not Found"}, r.text


def check_version(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.get(base_url + "/version")
    assert r.status_code == 200, r.status_code
    assert r.json() == {"version": "0.32.0"}, r.text


def check_models(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.get(base_url + "/v1/models")
    assert r.status_code == 200, r.status_code
    _content_type(r, JSON_CT)
    body = r.json()
    _keys(body, ["object", "data"], "model list")
    assert body["object"] == "list"
    entries = {m["id"]: m for m in body["data"]}
    assert model in entries, f"{model!r} not in {list(entries)}"
    for m in body["data"]:
        _keys(m, MODEL_KEYS, "model")
        assert m["object"] == "model" and m["owned_by"] == "vllm", m
        assert isinstance(m["created"], int) and isinstance(m["root"], str), m
        assert m["parent"] is None, m
        assert len(m["permission"]) == 1, m
        _keys(m["permission"][0], PERMISSION_KEYS, "permission")
        assert re.fullmatch(r"modelperm-[0-9a-f]{16}", m["permission"][0]["id"]), m
    assert entries[model]["max_model_len"] == max_model_len, entries[model]


def check_tokenize(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.post(base_url + "/tokenize", json={"model": model, "prompt": "Hello world"})
    assert r.status_code == 200, r.text
    _content_type(r, JSON_CT)
    body = r.json()
    _keys(body, ["count", "max_model_len", "tokens", "token_strs"], "tokenize")
    assert body["count"] == len(body["tokens"]) > 0, body
    assert all(isinstance(t, int) for t in body["tokens"]), body
    assert body["max_model_len"] == max_model_len, body
    assert body["token_strs"] is None, body


def check_detokenize(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        ids = c.post(base_url + "/tokenize", json={"model": model, "prompt": "Hello world"})
        r = c.post(base_url + "/detokenize", json={"model": model, "tokens": ids.json()["tokens"]})
    assert r.status_code == 200, r.text
    _content_type(r, JSON_CT)
    body = r.json()
    _keys(body, ["prompt"], "detokenize")
    assert isinstance(body["prompt"], str), body
    assert "Hello" in body["prompt"] and "world" in body["prompt"], body


# -- chat ------------------------------------------------------------------------------------------
def check_chat(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.post(base_url + "/v1/chat/completions", json=_chat_body(model, 8))
    assert r.status_code == 200, r.text
    _content_type(r, JSON_CT)
    body = r.json()
    _keys(body, CHAT_KEYS, "chat completion")
    assert CHAT_ID.match(body["id"]), body["id"]
    assert body["object"] == "chat.completion" and body["model"] == model, body
    assert isinstance(body["created"], int), body
    assert FINGERPRINT.match(body["system_fingerprint"]), body["system_fingerprint"]
    for k in ("service_tier", "prompt_logprobs", "prompt_token_ids", "prompt_text",
              "kv_transfer_params", "ec_transfer_params", "metrics"):
        assert body[k] is None, (k, body[k])
    assert len(body["choices"]) == 1, body
    choice = body["choices"][0]
    _keys(choice, CHAT_CHOICE_KEYS, "chat choice")
    assert choice["index"] == 0 and choice["finish_reason"] in FINISHED, choice
    _keys(choice["message"], CHAT_MESSAGE_KEYS, "chat message")
    assert choice["message"]["role"] == "assistant", choice
    assert isinstance(choice["message"]["content"], str), choice
    _usage(body["usage"], USAGE_KEYS, 8)


def _check_chat_stream(base_url: str, model: str, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream": True}
    if include_usage:
        extra["stream_options"] = {"include_usage": True}
    with _client() as c, c.stream("POST", base_url + "/v1/chat/completions",
                                   json=_chat_body(model, 4, **extra)) as r:
        assert r.status_code == 200, r.read()
        _content_type(r, SSE_CT)
        payloads = sse_events(r)
    chunks = [json.loads(p) for p in payloads]
    assert len(chunks) >= 2, chunks
    ids = {ch["id"] for ch in chunks}
    assert len(ids) == 1 and CHAT_ID.match(ids.pop()), chunks
    first = chunks[0]
    _keys(first, CHUNK_ROLE_KEYS, "first chunk")
    _keys(first["choices"][0], CHUNK_ROLE_CHOICE_KEYS, "first chunk choice")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}, first
    usage_chunk = chunks.pop() if include_usage else None
    last = chunks[-1]
    for ch in chunks:
        assert ch["object"] == "chat.completion.chunk" and ch["model"] == model, ch
        assert isinstance(ch["created"], int), ch
    for ch in chunks[1:-1]:
        _keys(ch, CHUNK_KEYS, "content chunk")
        _keys(ch["choices"][0], CHUNK_CHOICE_KEYS, "content chunk choice")
        assert list(ch["choices"][0]["delta"]) == ["content"], ch
        assert ch["choices"][0]["finish_reason"] is None, ch
    _keys(last, CHUNK_KEYS if include_usage else CHUNK_KEYS + ["system_fingerprint"],
          "last chunk")
    _keys(last["choices"][0], CHUNK_LAST_CHOICE_KEYS, "last chunk choice")
    assert last["choices"][0]["finish_reason"] in FINISHED, last
    if usage_chunk is None:
        assert FINGERPRINT.match(last["system_fingerprint"]), last
        return
    _keys(usage_chunk, CHUNK_KEYS + ["usage", "system_fingerprint"], "usage chunk")
    assert usage_chunk["choices"] == [], usage_chunk
    assert FINGERPRINT.match(usage_chunk["system_fingerprint"]), usage_chunk
    _usage(usage_chunk["usage"], STREAM_USAGE_KEYS, 4)


def check_chat_stream(base_url: str, model: str, max_model_len: int) -> None:
    _check_chat_stream(base_url, model, include_usage=False)


def check_chat_stream_usage(base_url: str, model: str, max_model_len: int) -> None:
    _check_chat_stream(base_url, model, include_usage=True)


def check_chat_without_model(base_url: str, model: str, max_model_len: int) -> None:
    """A body without `model` is served by the default model (real vLLM answers 200)."""
    body = _chat_body(model, 2)
    del body["model"]
    with _client() as c:
        r = c.post(base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion", r.text


def check_openai_client(base_url: str, model: str, max_model_len: int) -> None:
    """The official client parses both answers (non-stream and stream with usage)."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=60.0,
                           max_retries=0)
    try:
        messages: Any = [{"role": "user", "content": "Hello"}]
        done = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                              temperature=0, extra_body={"ignore_eos": True})
        assert done.choices[0].message.role == "assistant"
        assert isinstance(done.choices[0].message.content, str)
        assert done.usage is not None and done.usage.completion_tokens == 4
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert isinstance(text, str)
        comp = client.completions.create(model=model, prompt="Hello", max_tokens=3,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert comp.usage is not None and comp.usage.completion_tokens == 3
    finally:
        client.close()


# -- completions -----------------------------------------------------------------------------------
def check_completions(base_url: str, model: str, max_model_len: int) -> None:
    body = {"model": model, "prompt": "Hello", "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    with _client() as c:
        r = c.post(base_url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    _content_type(r, JSON_CT)
    out = r.json()
    _keys(out, CMPL_KEYS, "completion")
    assert CMPL_ID.match(out["id"]) and out["object"] == "text_completion", out
    assert out["model"] == model and FINGERPRINT.match(out["system_fingerprint"]), out
    choice = out["choices"][0]
    _keys(choice, CMPL_CHOICE_KEYS, "completion choice")
    assert isinstance(choice["text"], str) and choice["finish_reason"] in FINISHED, choice
    _usage(out["usage"], USAGE_KEYS, 5)


def check_completions_stream(base_url: str, model: str, max_model_len: int) -> None:
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with _client() as c, c.stream("POST", base_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        _content_type(r, SSE_CT)
        chunks = [json.loads(p) for p in sse_events(r)]
    assert chunks, chunks
    assert len({ch["id"] for ch in chunks}) == 1 and CMPL_ID.match(chunks[0]["id"]), chunks
    for ch in chunks[:-1]:
        _keys(ch, CHUNK_KEYS, "completion chunk")
        _keys(ch["choices"][0], CMPL_CHUNK_CHOICE_KEYS, "completion chunk choice")
        assert ch["choices"][0]["finish_reason"] is None, ch
    last = chunks[-1]
    _keys(last, CHUNK_KEYS + ["system_fingerprint"], "last completion chunk")
    _keys(last["choices"][0], CMPL_CHUNK_CHOICE_KEYS, "last completion chunk choice")
    assert last["choices"][0]["finish_reason"] in FINISHED, last
    assert FINGERPRINT.match(last["system_fingerprint"]), last
    for ch in chunks:
        assert ch["object"] == "text_completion" and ch["model"] == model, ch


# -- errors ----------------------------------------------------------------------------------------
def check_error_unknown_model(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.post(base_url + "/v1/chat/completions",
                   json={"model": UNKNOWN_MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    err = _error(r, 404, "NotFoundError", "model")
    m = re.fullmatch(rf"The model `{UNKNOWN_MODEL}` does not exist\. Valid aliases: (.+)\.",
                     err["message"])
    assert m, err["message"]
    assert model in m.group(1).split(", "), err["message"]


def check_error_bad_json(base_url: str, model: str, max_model_len: int) -> None:
    raw = '{"model":"%s","messages":[' % model
    with _client() as c:
        r = c.post(base_url + "/v1/chat/completions", content=raw.encode(),
                   headers={"content-type": "application/json"})
    err = _error(r, 400, "Bad Request", f"body.{len(raw)}")
    assert err["message"].startswith("1 validation error:\n  {'type': 'json_invalid'"), err


def check_error_missing_messages(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.post(base_url + "/v1/chat/completions", json={"model": model})
    err = _error(r, 400, "Bad Request", "body.messages")
    assert err["message"] == ("1 validation error:\n  {'type': 'missing', 'loc': "
                              "'body.messages', 'msg': 'Field required', "
                              "'input': '<dict of 1 items>'}"), err


def check_error_too_many_tokens(base_url: str, model: str, max_model_len: int) -> None:
    too_many = max_model_len * 10
    with _client() as c:
        r = c.post(base_url + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": too_many})
    err = _error(r, 400, "BadRequestError", "max_tokens")
    assert err["message"] == (
        f"max_tokens={too_many} cannot be greater than max_model_len={max_model_len}. "
        f"Please request fewer output tokens. (parameter=max_tokens, value={too_many})"), err


def check_error_bad_temperature(base_url: str, model: str, max_model_len: int) -> None:
    with _client() as c:
        r = c.post(base_url + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}],
            "temperature": -3})
    err = _error(r, 400, "BadRequestError", "temperature")
    assert err["message"] == ("temperature must be non-negative, got -3.0. "
                              "(parameter=temperature, value=-3.0)"), err


ALL_CHECKS: tuple[Check, ...] = (
    check_health, check_unknown_path, check_version, check_models, check_tokenize,
    check_detokenize, check_chat, check_chat_stream, check_chat_stream_usage,
    check_chat_without_model, check_openai_client, check_completions, check_completions_stream,
    check_error_unknown_model, check_error_bad_json, check_error_missing_messages,
    check_error_too_many_tokens, check_error_bad_temperature,
)
