"""Every error the gateway itself produces, in vLLM's shape.

`{"error": {"message", "type", "param", "code"}}`, as vLLM 0.32.0 answers (see the reference
captures). Each message names the model involved and says what to do. Upstream errors are
never re-wrapped: they pass through byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from starlette.responses import Response

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class GatewayError(Exception):
    """An error answered to the client as a vLLM-shaped JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        err_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.err_type = err_type or _TYPES.get(status, "Error")

    def body(self) -> bytes:
        return error_body(self.status, self.message, param=self.param, err_type=self.err_type)

    def response(self, headers: Mapping[str, str] | None = None) -> Response:
        extra = dict(headers or {})
        if self.retry_after is not None:
            extra["retry-after"] = str(self.retry_after)
        return Response(self.body(), status_code=self.status, headers=extra,
                        media_type="application/json")


def error_body(status: int, message: str, *, param: str | None = None,
               err_type: str | None = None) -> bytes:
    payload = {"error": {"message": message, "type": err_type or _TYPES.get(status, "Error"),
                         "param": param, "code": status}}
    try:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate from the request, e.g. a model "\ud800"
        return json.dumps(payload, separators=(",", ":")).encode()


def sse_error_event(status: int, message: str) -> bytes:
    """An error delivered inside an already started event stream (the OpenAI clients raise it)."""
    return b"data: " + error_body(status, message) + b"\n\n"


def _names(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed) if listed else "(none: the registry is empty)"


def unknown_model(model: str, valid: Iterable[str]) -> GatewayError:
    return GatewayError(404, f"The model `{model}` does not exist. Valid models and aliases: "
                             f"{_names(valid)}. Add it to the registry (models.toml) or use one "
                             f"of these names.", param="model")


def missing_model(valid: Iterable[str]) -> GatewayError:
    return GatewayError(400, "The request names no model: set the `model` field to one of: "
                             f"{_names(valid)}, or call the per-model route /{{model}}/v1/....",
                        param="model")


def invalid_model_field(value: object) -> GatewayError:
    return GatewayError(400, f"The `model` field must be a string, got {type(value).__name__}.",
                        param="model")


def invalid_json(detail: str) -> GatewayError:
    return GatewayError(400, f"The request body is not valid JSON: {detail}. Send a JSON object "
                             f"with content-type: application/json.", param="body")


def not_an_object() -> GatewayError:
    return GatewayError(400, "The request body must be a JSON object (e.g. {\"model\": ..., "
                             "\"messages\": [...]}).", param="body")


def invalid_multipart(detail: str) -> GatewayError:
    return GatewayError(400, f"The multipart form could not be read: {detail}.", param="body")


def body_not_reencodable(model: str) -> GatewayError:
    return GatewayError(400, f"The request body is nested too deeply for the gateway to set its "
                             f"`model` to `{model}`. Flatten the body, or send it to the model "
                             f"under the name it serves (then it passes unchanged).",
                        param="body")


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body exceeds the gateway's limit of {limit} bytes. "
                             f"Send a smaller body or raise GATEWAY_MAX_BODY_BYTES.",
                        param="body")


def upstream_refused(model: str, url: str, detail: str) -> GatewayError:
    return GatewayError(502, f"Model `{model}` at {url} refused or dropped the connection "
                             f"({detail}). It is not running or crashed: check `fleet status` "
                             f"and start it with `fleet up {model}`.")


def upstream_not_ready(model: str, url: str, detail: str, retry_after: int) -> GatewayError:
    return GatewayError(503, f"Model `{model}` at {url} is not ready ({detail}). It may still be "
                             f"loading; retry after {retry_after} s or check `fleet status`.",
                        retry_after=retry_after)


def upstream_timeout(model: str, url: str, seconds: float | None) -> GatewayError:
    after = f" within {seconds:g} s" if seconds else ""
    return GatewayError(504, f"Model `{model}` at {url} did not answer{after}. It may be "
                             f"overloaded; retry later or raise the read timeout "
                             f"(GATEWAY_READ_TIMEOUT).")


def upstream_broken_stream(model: str, detail: str) -> bytes:
    return sse_error_event(502, f"The stream from model `{model}` broke off ({detail}); the "
                                f"answer is incomplete. Retry the request.")


def not_found(path: str) -> GatewayError:
    return GatewayError(404, f"No route for {path}. The gateway serves the OpenAI API under "
                             f"/v1/... and per-model routes under /{{model}}/v1/....")


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(405, f"Method {method} is not allowed on {path}.")


def internal_error(request_id: str) -> GatewayError:
    return GatewayError(500, f"The gateway failed to handle this request (request id "
                             f"{request_id}); this is a bug, please report it with the id.")


def client_gone(model: str) -> GatewayError:
    """The client went away before its answer started (nobody reads this one: it is what
    the access log and the metrics record, 499 as nginx names it)."""
    return GatewayError(499, f"The client closed the request to model `{model}` before its "
                             f"answer started; its place in line and its upstream request "
                             f"were dropped.", err_type="ClientClosedRequest")
