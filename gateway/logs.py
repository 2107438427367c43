"""The gateway's log lines: text with key=value fields, or one JSON object a line.

A record may carry structured fields (`extra={"fields": {...}}`): the access line does (request
id, method, path, model, status, durations), so do reloads and admin actions. Text renders
them as `key=value` after the message; JSON puts them beside `ts`, `level`, `logger`, `msg`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

ACCESS_LOGGER = "gateway.access"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return line


def _text(value: Any) -> str:
    text = str(value) if value is not None else "-"
    if not text or any(c in text for c in ' "=') or not text.isprintable():
        return json.dumps(text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging to stderr in `fmt` ("text" or "json") at `level` (e.g. "info")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def access_line(fields: Mapping[str, Any]) -> None:
    """One access line (logger `gateway.access`, level info)."""
    logging.getLogger(ACCESS_LOGGER).info("request", extra={"fields": dict(fields)})

