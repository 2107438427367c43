"""vLLM 0.32.0's error bodies: `{"error": {"message", "type", "param", "code"}}`.

Two families, as the real server answers them:
- request validation (FastAPI/pydantic): status 400, type "Bad Request", the message lists the
  pydantic errors as Python dict reprs, `param` is the first error's location ("body.messages");
- semantic errors raised by the serving code: type "BadRequestError" or "NotFoundError", the
  message ends with "(parameter=X, value=Y)" when it is about one parameter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

_PHRASES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


def error_body(message: str, err_type: str, param: str | None, code: int) -> bytes:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class SimHTTPError(Exception):
    """An error the server answers with `status` and a vLLM-shaped body."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, self.err_type, self.param, self.status)


def bad_request(message: str, param: str | None = None, value: Any = None) -> SimHTTPError:
    """A BadRequestError; with `param`, the message gets vLLM's "(parameter=, value=)" tail."""
    if param is not None:
        message = f"{message} (parameter={param}, value={value})"
    return SimHTTPError(400, message, "BadRequestError", param)


def model_not_found(name: str, valid: Sequence[str]) -> SimHTTPError:
    message = f"The model `{name}` does not exist. Valid aliases: {', '.join(valid)}."
    return SimHTTPError(404, message, "NotFoundError", "model")


def validation_error(errors: Sequence[dict[str, Any]]) -> SimHTTPError:
    """FastAPI's request-validation answer as vLLM 0.32.0 renders it."""
    n = len(errors)
    head = f"{n} validation error{'s' if n != 1 else ''}:"
    message = head + "".join("\n  " + repr(e) for e in errors)
    param = errors[0]["loc"] if errors else None
    return SimHTTPError(400, message, _PHRASES[400], param)


def describe_input(value: Any) -> Any:
    """How vLLM's validation messages show an offending input (containers summarised)."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return value
