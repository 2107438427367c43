"""Every error the gateway itself produces, in vLLM's shape.

`{"error": {"message", "type", "param", "code"}}`, as vLLM 0.32.0 answers (see the reference
captures). Each message names the model involved and says what to do. Upstream errors are
never re-wrapped: they pass through byte for byte.

What a caller needs and no more: upstream addresses, raw upstream bytes and the HTTP
client's exception text never go into a message. They go into `GatewayError.internal`,
which the app logs under the request id, and the message then ends with that id
(`GatewayError.for_request`), so an operator can find the details.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

from starlette.responses import Response

log = logging.getLogger("gateway")

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    429: "RateLimitError",
    431: "RequestHeaderFieldsTooLargeError",
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
        internal: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.err_type = err_type or _TYPES.get(status, "Error")
        self.internal = internal  # for the log only: addresses, upstream text, client errors

    def for_request(self, request_id: str) -> GatewayError:
        """Log the internal details under `request_id`; the message then points to them."""
        if self.internal is not None:
            log.warning("request %s: %s (answered %d)", request_id, self.internal, self.status)
            self.message = (f"{self.message} The gateway's log has the details under request "
                            f"id {request_id}.")
            self.internal = None
        return self

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
    return ", ".join(listed) if listed else "(none)"


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


def buffers_full(limit: int, retry_after: int) -> GatewayError:
    return GatewayError(503, f"The gateway holds as many request bytes as it may at once "
                             f"({limit} bytes across all requests, GATEWAY_MAX_BUFFERED_BYTES). "
                             f"Retry after {retry_after} s.", param="body",
                        retry_after=retry_after)


def upstream_refused(model: str, url: str, detail: str) -> GatewayError:
    return GatewayError(502, f"Model `{model}` refused or dropped the connection. It is not "
                             f"running or crashed: check `fleet status` and start it with "
                             f"`fleet up {model}`.", internal=f"model {model} at {url}: {detail}")


def upstream_not_ready(model: str, url: str, detail: str, retry_after: int) -> GatewayError:
    return GatewayError(503, f"Model `{model}` is not ready. It may still be loading or be "
                             f"busy; retry after {retry_after} s or check `fleet status`.",
                        retry_after=retry_after, internal=f"model {model} at {url}: {detail}")


def upstream_timeout(model: str, url: str, seconds: float | None,
                     setting: str = "the model's read_timeout or GATEWAY_READ_TIMEOUT"
                     ) -> GatewayError:
    after = f" within {seconds:g} s" if seconds else " in time"
    return GatewayError(504, f"Model `{model}` did not answer{after}. It may be overloaded; "
                             f"retry later or raise {setting}.",
                        internal=f"model {model} at {url}: timed out")


def upstream_broken_stream(model: str, detail: str, request_id: str | None = None) -> bytes:
    """The error event ending a stream that broke off; `detail` goes to the log only."""
    log.warning("request %s: the stream from model %s broke off: %s", request_id or "-", model,
                detail)
    suffix = f" (request id {request_id})" if request_id else ""
    return sse_error_event(502, f"The stream from model `{model}` broke off; the answer is "
                                f"incomplete. Retry the request{suffix}.")


def upstream_bad_answer(model: str, status: int, detail: str) -> GatewayError:
    """An upstream answer the gateway had to interpret and could not (e.g. /v1/infer)."""
    return GatewayError(status if status >= 400 else 502,
                        f"Model `{model}` answered {status} with a body the gateway could not "
                        f"use. Retry the request; if it persists, check the model's logs.",
                        internal=f"model {model} answered {status}: {detail}")


def activation_failed(model: str, timeout: float, reason: str, retry_after: int,
                      kind: str | None = None) -> GatewayError:
    """`kind`: what the caller may know (e.g. "the models in its way are busy"); `reason`,
    the fleet's own words (container logs, addresses), goes to the log only."""
    why = f" ({kind})" if kind else ""
    return GatewayError(503, f"Model `{model}` is not awake and could not be activated within "
                             f"{timeout:g} s{why}. Retry after {retry_after} s; if it persists, "
                             f"ask the operator (`fleet status`, `fleet logs {model}`).",
                        retry_after=retry_after,
                        internal=f"activation of model {model} failed: {reason}")


def upload_abandoned(request_id: str) -> GatewayError:
    """The client closed the connection before its request body was read (nobody sees this:
    it is what the access log and the metrics record, 499)."""
    return GatewayError(499, f"The client closed the connection before the request body was "
                             f"read (request id {request_id}).", err_type="ClientClosedRequest")


def body_late(timeout: float) -> GatewayError:
    """The request body did not arrive within GATEWAY_BODY_TIMEOUT of its headers (the
    server answers it and closes the connection; this is what the log and metrics record)."""
    return GatewayError(408, f"The request body did not arrive within {timeout:g} s of its "
                             f"headers (GATEWAY_BODY_TIMEOUT). Send the body at once, or raise "
                             f"the limit.")


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
