"""Log lines: key=value text and JSON, with the structured fields an access line carries."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.logs import JsonFormatter, TextFormatter, configure_logging

pytestmark = pytest.mark.unit


def record(fields: dict[str, object] | None) -> logging.LogRecord:
    rec = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", None, None)
    if fields is not None:
        rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_text_lines_carry_key_value_fields() -> None:
    line = TextFormatter().format(record({"request_id": "abc", "status": 200, "model": None,
                                          "path": "/v1/x y"}))
    assert line == 'INFO gateway.access: request request_id=abc status=200 model=- path="/v1/x y"'
    assert TextFormatter().format(record(None)) == "INFO gateway.access: request"


def test_json_lines() -> None:
    entry = json.loads(JsonFormatter().format(record({"request_id": "abc", "status": 200})))
    assert entry["msg"] == "request" and entry["level"] == "info"
    assert (entry["logger"], entry["request_id"], entry["status"]) == ("gateway.access", "abc", 200)


def test_configure_logging_replaces_root_handlers() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("warning", "json")
        assert root.level == logging.WARNING and len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


@pytest.mark.anyio
async def test_access_lines_carry_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    import httpx
    import respx

    from fleet.registry import parse_registry
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    app = create_app(parse_registry('[models.a]\nurl = "http://127.0.0.1:9601"\n'),
                     GatewaySettings(access_log=True, api_keys="sk-1"))
    with respx.mock() as mock, caplog.at_level(logging.INFO, logger="gateway.access"):
        mock.post("http://127.0.0.1:9601/v1/completions").respond(200, json={})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gw") as client:
            await client.post("/v1/completions", json={"model": "a"},
                              headers={"authorization": "Bearer sk-1", "x-request-id": "r-1"})
            await client.post("/v1/completions", json={"model": "a"},
                              headers={"x-request-id": "r-2"})
            await client.get("/health", headers={"x-request-id": "r-3"})
    lines = [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    assert [(f["request_id"], f["status"], f["model"]) for f in lines] == [
        ("r-1", 200, "a"), ("r-2", 401, None), ("r-3", 200, None)]
    assert lines[0]["key"] == "env#1" and lines[0]["duration_ms"] >= 0
    assert "sk-1" not in caplog.text
