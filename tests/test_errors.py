"""Gateway errors have vLLM's exact shape and say what to do."""

from __future__ import annotations

import json

import pytest

from gateway import errors

pytestmark = pytest.mark.unit


def test_shape_matches_vllm() -> None:
    err = errors.unknown_model("nope", ["b", "a"])
    data = json.loads(err.body())
    assert list(data) == ["error"]
    assert list(data["error"]) == ["message", "type", "param", "code"]
    assert data["error"]["type"] == "NotFoundError" and data["error"]["code"] == 404
    assert "`nope`" in data["error"]["message"] and "a, b" in data["error"]["message"]


def test_compact_like_vllm_and_retry_after_header() -> None:
    err = errors.upstream_not_ready("m", "http://h:1", "loading", 7)
    assert err.body().startswith(b'{"error":{"message":')
    response = err.response({"x-request-id": "r1"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7" and response.headers["x-request-id"] == "r1"


def test_sse_error_event_is_one_complete_event() -> None:
    event = errors.upstream_broken_stream("m", "ReadError")
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert json.loads(event[6:])["error"]["code"] == 502
