"""Reading request bodies, and finding (and, where the upstream needs it, setting) their
`model`.

Bodies are read whole (`read_body`) within two limits: one body's size (413) and the bytes
all requests hold at once (`BodyBudget`, 503 with Retry-After), so many large bodies under
the first limit cannot exhaust memory together. A client that leaves mid-upload ends its
request as 499 (client closed request), not as a gateway failure; one whose body does not
arrive within GATEWAY_BODY_TIMEOUT is answered 408 by the server (gateway/server.py) and
recorded as such here.

JSON bodies are parsed once (orjson when available); multipart bodies (audio transcription
and translation) are scanned for the `model` form field without decoding the file parts; a
form with more than one `model` field is refused (the gateway would route by one and vLLM
read another).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Self

from starlette.requests import Request

from gateway import errors

try:  # orjson is several times faster on large chat bodies; json is the fallback.
    import orjson

    if tuple(int(p) for p in re.findall(r"\d+", orjson.__version__)[:3]) < (3, 9, 15):
        # Older orjson overflows the C stack on deeply nested input (CVE-2024-27454): one
        # 2 MB body of brackets would kill the gateway process.
        raise ImportError("orjson < 3.9.15 is unsafe on untrusted input")

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _DecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - exercised without orjson (or with an unsafe one)
    def _loads(data: bytes) -> Any:
        return json.loads(data)

    def _dumps(obj: Any) -> bytes:  # ASCII escapes keep lone surrogates ("\ud800") encodable
        return json.dumps(obj, separators=(",", ":")).encode()

    # ValueError: bad JSON or UTF-8, integers beyond int_max_str_digits; RecursionError: nesting.
    _DecodeError = (ValueError, RecursionError)

_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME_MODEL_RE = re.compile(rb'content-disposition:[^\r\n]*;\s*name="?model"?(?:[;\s\r]|$)',
                            re.IGNORECASE)


class BodyBudget:
    """The request body bytes held at once across all requests, against `limit`."""

    __slots__ = ("held", "limit", "retry_after")

    def __init__(self, limit: int, retry_after: int) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.held = 0

    def hold(self) -> Hold:
        """One request's share: `with budget.hold() as hold:` gives it back on exit."""
        return Hold(self)


class Hold:
    __slots__ = ("budget", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.budget.held -= self.size
        self.size = 0

    def take(self, size: int) -> None:
        budget = self.budget
        if budget.held + size > budget.limit:
            raise errors.buffers_full(budget.limit, budget.retry_after)
        budget.held += size
        self.size += size


async def read_body(request: Request, limit: int, hold: Hold | None = None) -> bytes:
    """The whole body: 413 beyond `limit` bytes, 503 when `hold`'s budget is spent (a
    declared length is taken whole before anything is read; a chunked body as it arrives),
    499 when the client leaves mid-upload."""
    declared = request.headers.get("content-length")
    counted = hold  # chunked: each chunk is taken from the budget as it arrives
    if declared is not None and declared.isdigit():
        size = int(declared)
        if size > limit:
            raise errors.body_too_large(limit)
        if hold is not None:
            hold.take(size)  # the server's parser delivers no more than the declared length
            counted = None
    # The ASGI messages read directly: Starlette's `request.stream()` is an async generator
    # stepped three times for a body that came whole.
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            late = request.scope.get("gateway.body_late")  # the server closed it: too slow
            if late is not None:
                raise errors.body_late(late)
            raise errors.upload_abandoned(getattr(request.state, "request_id", "-"))
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            if counted is not None:
                counted.take(len(chunk))
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


@dataclass(slots=True)
class ParsedBody:
    """What the gateway learnt from a body: its kind, and the model it names (if any)."""

    kind: str                           # "json" | "multipart" | "empty"
    model: str | None
    data: dict[str, Any] | None = None  # the parsed JSON object
    boundary: bytes | None = None       # multipart boundary
    span: tuple[int, int] | None = None  # byte span of the multipart model value


def parse(body: bytes, content_type: str) -> ParsedBody:
    """Read the `model` field of a JSON or multipart body; raise GatewayError if malformed."""
    if not body.strip():
        return ParsedBody("empty", None)
    if content_type[:19].lower() == "multipart/form-data":
        return _parse_multipart(body, content_type)
    try:
        data = _loads(body)
    except _DecodeError as exc:
        raise errors.invalid_json(str(exc).split("\n")[0]) from None
    if not isinstance(data, dict):
        raise errors.not_an_object()
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise errors.invalid_model_field(model)
    return ParsedBody("json", model, data=data)


def with_model(parsed: ParsedBody, body: bytes, model: str) -> bytes:
    """`body` with its model field set to `model` (only called when it must change)."""
    if parsed.kind == "json" and parsed.data is not None:
        try:
            return _dumps({**parsed.data, "model": model})
        except (TypeError, ValueError, RecursionError):  # nested deeper than the encoder goes
            raise errors.body_not_reencodable(model) from None
    if parsed.kind == "empty":
        return _dumps({"model": model})
    if parsed.kind == "multipart" and parsed.boundary is not None:
        value = model.encode()
        if parsed.span is not None:
            start, end = parsed.span
            return body[:start] + value + body[end:]
        part = (b"--" + parsed.boundary + b'\r\nContent-Disposition: form-data; name="model"'
                b"\r\n\r\n" + value + b"\r\n")
        return part + body
    return body


def _parse_multipart(body: bytes, content_type: str) -> ParsedBody:
    match = _BOUNDARY_RE.search(content_type)
    if not match:
        raise errors.invalid_multipart("the content-type has no boundary parameter")
    boundary = match.group(1).strip().encode("latin-1")
    delimiter = b"--" + boundary
    if delimiter not in body:
        raise errors.invalid_multipart("the body does not contain the declared boundary")
    pos = body.find(delimiter)
    found: ParsedBody | None = None
    while pos != -1:
        head_start = pos + len(delimiter)
        if body[head_start:head_start + 2] == b"--":
            break  # closing delimiter
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end == -1:
            raise errors.invalid_multipart("a part has no header terminator")
        next_pos = body.find(b"\r\n" + delimiter, head_end + 4)
        if next_pos == -1:
            raise errors.invalid_multipart("a part is not terminated by the boundary")
        if _NAME_MODEL_RE.search(body[head_start:head_end + 2]):
            if found is not None:  # vLLM reads the last, the gateway would route by the first
                raise errors.invalid_multipart("the form has more than one `model` field; "
                                               "send exactly one")
            start, end = head_end + 4, next_pos
            try:
                model = body[start:end].decode("utf-8").strip()
            except UnicodeDecodeError:
                raise errors.invalid_multipart("the model field is not UTF-8") from None
            found = ParsedBody("multipart", model or None, boundary=boundary, span=(start, end))
        pos = next_pos + 2
    return found or ParsedBody("multipart", None, boundary=boundary)
