"""Hostile and malformed input against the gateway: property-based fuzzing (hypothesis).

The property, for every input: the gateway never crashes and never answers a 5xx of its own
(the upstream, a simulator, is healthy); each answer the gateway makes itself is JSON, and each
of its errors has vLLM's shape `{"error": {"message", "type", "param", "code"}}`. Answers the
upstream made pass through whatever their status (`support.reliability.judge`).

- in-process (the app on one event loop, its upstream a real simulator process): JSON values,
  absurd chat parameters, deep nesting and extreme numbers under both JSON backends the
  gateway can run with (orjson when usable, else the standard library), raw bytes and invalid
  UTF-8 under any content type, multipart forms, and, through a bare ASGI call because httpx
  normalises URLs and checks headers, path tricks and arbitrary headers;
- over real sockets against `python -m gateway`: a smaller raw-HTTP fuzz, the bodies that
  can take a process down (2 MB of nested brackets, bodies and headers beyond the limits),
  and header floods (many fields, huge fields, huge request lines, heads sent in pieces)
  against small head limits: 431 exactly when a limit is passed, and /health stays fast.

Hypothesis runs derandomized (the same examples on every run), with bounded example counts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.body
from fleet.registry import parse_registry
from gateway.app import MODEL_ENDPOINTS, create_app
from gateway.settings import GatewaySettings
from support.reliability import (
    from_upstream,
    judge,
    parse_response,
    raw_exchange,
    read_until_closed,
    registry_for,
    wait_for,
)
from support.sim_fixtures import SimServer, start_sim

pytestmark = pytest.mark.gateway

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
BODY_LIMIT = 64 * 1024
NAMES = ["tiny", "tiny-alias", "other", "other-alias", "nope", ""]
PATHS = [*MODEL_ENDPOINTS, "/tiny/v1/chat/completions", "/tiny-alias/v1/completions",
         "/other/tokenize", "/nope/v1/chat/completions", "/tiny/v1/embeddings"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "",
                 "multipart/form-data", "multipart/form-data; boundary=xyz",
                 'multipart/form-data; boundary="a b"', "application/x-www-form-urlencoded",
                 "application/octet-stream", "APPLICATION/JSON"]

Answer = tuple[int, dict[str, str], bytes]
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"


def field_value(raw: bytes) -> bytes:
    """`raw` cut down to what HTTP allows in a header value (RFC 9110 5.5): servers refuse the
    rest before an application sees it, and framing (CR, LF) is the server's business."""
    return bytes(c for c in raw if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")


FIELD_VALUE = st.binary(max_size=64).map(field_value)


# -- the app in-process ---------------------------------------------------------------------------
class InProcess:
    """The gateway app on a private event loop, in front of a simulator process."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, app: Any,
                 client: httpx.AsyncClient) -> None:
        self.portal, self.app, self.client = portal, app, client

    def http(self, method: str, url: str, content: bytes = b"",
             headers: dict[str, str] | None = None) -> Answer:
        """Through httpx's ASGITransport; any exception escaping the app is raised here."""
        resp = self.portal.call(lambda: self.client.request(method, url, content=content,
                                                            headers=headers))
        return resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, resp.content

    def asgi(self, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]],
             body: bytes = b"") -> Answer:
        """A bare ASGI call with the scope uvicorn would build, path and headers untouched."""
        return self.portal.call(_asgi_call, self.app, method, raw_path, headers, body)


async def _asgi_call(app: Any, method: str, raw_path: bytes,
                     headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
    path_b, _, query = raw_path.partition(b"?")
    path = path_b.decode("latin-1")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": method, "scheme": "http",
             "path": urllib.parse.unquote(path) if "%" in path else path,
             "raw_path": path_b, "query_string": query, "root_path": "",
             "headers": [(k.lower(), v) for k, v in headers],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
    done = anyio.Event()
    sent = False
    status, out_headers, chunks = 0, {}, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers.update({k.decode("latin-1").lower(): v.decode("latin-1")
                                for k, v in message.get("headers", [])})
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    with anyio.fail_after(20):
        await app(scope, receive, send)
    assert status, "the app returned without starting a response"
    return status, out_headers, b"".join(chunks)


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimServer]:
    server = start_sim(served_names=("tiny",), max_model_len=256)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(upstream: SimServer) -> Iterator[InProcess]:
    # Two registry models on the same simulator: `other` needs its body's model rewritten.
    registry = parse_registry(registry_for(tiny=upstream) + "\n".join([
        "[models.other]", f'url = "{upstream.base_url}"', 'served_model_name = "tiny"',
        'aliases = ["other-alias"]', ""]))
    app = create_app(registry, GatewaySettings(max_body_bytes=BODY_LIMIT))
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)):
            transport = httpx.ASGITransport(app=app)
            client = portal.call(lambda: _make_client(transport))
            try:
                yield InProcess(portal, app, client)
            finally:
                portal.call(client.aclose)


async def _make_client(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=20)


def check(answer: Answer, what: object, head: bool = False) -> None:
    verdict = judge(*answer, head=head)
    assert verdict is None, f"{verdict}\ninput: {what!r}"[:3000]


# -- JSON backends ----------------------------------------------------------------------------------
def _stdlib_body_module() -> Any:
    """A private copy of gateway.body loaded as if orjson were not installed."""
    spec = importlib.util.find_spec("gateway.body")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("orjson")
    sys.modules["orjson"] = None  # type: ignore[assignment]  # makes `import orjson` fail
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["orjson"]
        else:
            sys.modules["orjson"] = saved
    return module


_STDLIB = _stdlib_body_module()
BACKENDS = ["as-installed", "stdlib"]  # what this environment gives, and the fallback


@contextlib.contextmanager
def json_backend(name: str) -> Iterator[None]:
    """Run gateway.body with the JSON functions of `name` for the duration."""
    if name == "as-installed":
        yield
        return
    names = ("_loads", "_dumps", "_DecodeError")
    saved = {n: getattr(gateway.body, n) for n in names}
    try:
        for n in names:
            setattr(gateway.body, n, getattr(_STDLIB, n))
        yield
    finally:
        for n, value in saved.items():
            setattr(gateway.body, n, value)


# -- strategies -------------------------------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\udc00b"])
TEXT = st.text(max_size=20) | SURROGATES
NUMBERS = (st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([1e308, -1e308, 5e-324, -0.0, 2 ** 63, -(2 ** 63) - 1, 2 ** 64]))
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)
MODELS = st.sampled_from(NAMES) | st.none() | SCALARS | st.lists(SCALARS, max_size=2)


def dumps(value: Any, ascii_only: bool) -> bytes:
    """JSON text as a lax client would send it (NaN and Infinity allowed, surrogates kept)."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8",
                                                                          "surrogatepass")


@st.composite
def json_requests(draw: st.DrawFn) -> tuple[str, bytes, str]:
    value = draw(JSON_VALUES)
    if draw(st.booleans()):  # an object naming a model, so most bodies get routed
        value = {**(value if isinstance(value, dict) else {"x": value}), "model": draw(MODELS)}
    return (draw(st.sampled_from(PATHS)), dumps(value, draw(st.booleans())),
            draw(st.sampled_from(CONTENT_TYPES[:3])))


ABSURD_INTS = st.sampled_from([-1, 0, 1, 2, 255, 256, 10 ** 6, 2 ** 31, 2 ** 63, -(2 ** 63),
                               10 ** 30]) | st.integers()
ABSURD = (ABSURD_INTS | st.sampled_from([1e308, -1e308, float("nan"), float("inf"), 1.5, "16",
                                         "", None, True, [], {}]) | st.floats())


@st.composite
def chat_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(NAMES[:4]) | MODELS)}
    body["messages"] = draw(st.sampled_from([
        [{"role": "user", "content": "hi"}], [], "hi", None,
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "nobody", "content": 3}], [{}]]) | st.lists(JSON_VALUES, max_size=2))
    for key in ("max_tokens", "temperature", "top_p", "seed", "logprobs", "top_logprobs",
                "stream", "stream_options", "n", "stop", "max_completion_tokens"):
        if draw(st.booleans()):
            body[key] = draw(ABSURD)
    if isinstance(body.get("n"), (int, float)) and not 0 < body["n"] < 4:
        body["n"] = 2  # the simulator renders n choices: keep its work small
    if isinstance(body.get("max_tokens"), (int, float)) and body["max_tokens"] > 64:
        body["max_tokens"] = draw(st.sampled_from([65, 256, 10 ** 9, 1e308]))  # the upstream's 400
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions",
                                 "/tiny/v1/chat/completions", "/other/v1/chat/completions"]))
    if path.endswith("/completions") and "chat" not in path:
        body["prompt"] = body.pop("messages")
    return path, body


# -- in-process: JSON ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(request=json_requests())
def test_fuzzed_json_bodies(gw: InProcess, backend: str, request: tuple[str, bytes, str]) -> None:
    path, body, content_type = request
    with json_backend(backend):
        check(gw.http("POST", path, body, {"content-type": content_type}), request)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(request=chat_bodies(), ascii_only=st.booleans())
def test_fuzzed_chat_parameters(gw: InProcess, backend: str,
                                request: tuple[str, dict[str, Any]], ascii_only: bool) -> None:
    path, body = request
    with json_backend(backend):
        check(gw.http("POST", path, dumps(body, ascii_only),
                      {"content-type": "application/json"}), request)


def _nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


EXTREMES = [b"1e308", b"-1e308", b"1e309", b"-1e400", b"1e-400", b"NaN", b"-Infinity",
            b"9" * 5000, b"-" + b"9" * 400, b"18446744073709551616", b"-0", b"0.0000001e-320",
            b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u0000"', b"[]", b"{}"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_nesting_and_extreme_numbers(gw: InProcess, backend: str) -> None:
    chat = b'"messages":[{"role":"user","content":"hi"}],"max_tokens":2'
    with json_backend(backend):
        for depth in (64, 254, 256, 300, 1000, 1025, 5000, 10_000):
            for kind in ("array", "object"):
                for model in (b'"tiny"', b'"tiny-alias"', b'"other"', None):
                    head = b"{" + (b'"model":' + model + b"," if model else b"") + chat
                    body = head + b',"x":' + _nested(depth, kind) + b"}"
                    path = "/v1/chat/completions" if model else "/other/v1/chat/completions"
                    check(gw.http("POST", path, body, {"content-type": "application/json"}),
                          (depth, kind, model))
        for value in EXTREMES:
            for field in (b"max_tokens", b"temperature", b"x"):
                for model in (b"tiny", b"other"):
                    body = b'{"model":"' + model + b'",' + chat.replace(b',"max_tokens":2', b"") \
                        + b',"' + field + b'":' + value + b"}"
                    check(gw.http("POST", "/v1/chat/completions", body,
                                  {"content-type": "application/json"}), body[:200])


# -- in-process: bytes, content types, multipart, size ---------------------------------------------
@FUZZ
@given(body=st.binary(max_size=300) | st.sampled_from([
    b"\xff\xfe{}", b'{"model":"tiny\xff"}', b'{"model":"tiny","messages":"\xc3\x28"}',
    b"\xef\xbb\xbf{}", b'{"model":"other","x":"\xed\xa0\x80"}', b"\x00" * 8, b" \t\r\n"]),
    content_type=st.sampled_from(CONTENT_TYPES) | st.text(max_size=40),
    path=st.sampled_from(PATHS))
def test_fuzzed_raw_bytes_and_content_types(gw: InProcess, body: bytes, content_type: str,
                                            path: str) -> None:
    headers = [(b"content-type", field_value(content_type.encode("utf-8", "surrogatepass")))]
    check(gw.asgi("POST", path.encode(), headers, body), (path, content_type, body))


PART_NAMES = st.sampled_from(['"model"', "model", '"file"', '"model"; filename="x"',
                              '"language"', '""', '"mo"del"']) | st.text(max_size=12)
PART_VALUES = st.sampled_from([b"tiny", b"tiny-alias", b"other", b"nope", b"", b"\xff\xfe",
                               b" tiny ", b"\x00"]) | st.binary(max_size=40)


@st.composite
def multipart_forms(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(st.sampled_from(["xyz", "----b0undary", "a b", "=", "--"])
                    | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                              max_size=12))
    declared = draw(st.sampled_from([boundary, f'"{boundary}"', boundary + "x", ""]))
    parts = []
    for name, value in draw(st.lists(st.tuples(PART_NAMES, PART_VALUES), max_size=4)):
        disposition = draw(st.sampled_from(["Content-Disposition", "content-disposition",
                                            "Content-Type"]))
        parts.append(b"--" + boundary.encode() + b"\r\n" + disposition.encode()
                     + b": form-data; name=" + name.encode("utf-8", "surrogatepass")
                     + draw(st.sampled_from([b"\r\n\r\n", b"\r\n", b"\n\n"])) + value + b"\r\n")
    ending = draw(st.sampled_from([b"--" + boundary.encode() + b"--\r\n", b"", b"--",
                                   b"--" + boundary.encode()]))
    ctype = draw(st.sampled_from(["multipart/form-data", "Multipart/Form-Data"]))
    return f"{ctype}; boundary={declared}" if declared else ctype, b"".join(parts) + ending


@FUZZ
@given(form=multipart_forms(), path=st.sampled_from(["/v1/audio/transcriptions",
                                                     "/tiny/v1/audio/translations",
                                                     "/other/v1/audio/transcriptions",
                                                     "/v1/chat/completions"]))
def test_fuzzed_multipart_forms(gw: InProcess, form: tuple[str, bytes], path: str) -> None:
    content_type, body = form
    check(gw.asgi("POST", path.encode(), [(b"content-type", content_type.encode())], body),
          (path, content_type, body))


def test_bodies_beyond_the_limit_are_413(gw: InProcess) -> None:
    big = b'{"model":"tiny","x":"' + b"a" * BODY_LIMIT + b'"}'
    for headers in ([(b"content-type", b"application/json")],  # no length: counted as read
                    [(b"content-length", str(len(big)).encode())]):
        status, _, body = answer = gw.asgi("POST", b"/v1/chat/completions", headers, big)
        check(answer, headers)
        assert status == 413 and b"GATEWAY_MAX_BODY_BYTES" in body
    status, _, _ = answer = gw.http("POST", "/v1/chat/completions", big)
    check(answer, "httpx")
    assert status == 413


# -- in-process: paths, methods, headers -----------------------------------------------------------
SEGMENTS = st.sampled_from(["", ".", "..", "%2e%2e", "%2E.", ".%2e", "%2f", "%2F..", "v1", "v2",
                            "tiny", "tiny-alias", "other", "nope", "chat", "completions",
                            "models", "health", "sleep", "wake_up", "metrics", "sim",
                            "requests", "tokenize", "%00", "%ff", "%", "~", "x" * 300,
                            "%252e%252e", ";", "tiny;v=1"])
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE",
                           "CONNECT", "FOO"])
# Request targets are ASCII: uvicorn refuses other bytes before the app runs (and Starlette
# could not decode them), so only what a server delivers is fuzzed here.
QUERIES = st.sampled_from([b"", b"?", b"?a=b", b"?%ff", b"?x=%00&y", b"?" + b"q" * 5000,
                           b"?a=1&a=2", b"?level=2&mode=abort", b"?%C3%A9=%FF", b"?#x",
                           b"?a=%%%", b"?=&=&"])


@FUZZ
@given(prefix=st.sampled_from(["", "/tiny", "/tiny-alias", "/other", "/nope", "/v1", "/"]),
       segments=st.lists(SEGMENTS, min_size=1, max_size=7),
       method=st.sampled_from(["GET", "POST"]) | METHODS, query=QUERIES, with_body=st.booleans())
def test_fuzzed_paths_and_methods(gw: InProcess, prefix: str, segments: list[str], method: str,
                                  query: bytes, with_body: bool) -> None:
    raw_path = (prefix + "/" + "/".join(segments)).encode() + query
    body = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
    headers = [(b"content-type", b"application/json")] if with_body else []
    status, headers_out, out = answer = gw.asgi(method, raw_path, headers,
                                                body if with_body else b"")
    check(answer, (method, raw_path), head=method == "HEAD")
    path = urllib.parse.unquote(raw_path.split(b"?")[0].decode())
    # Nothing but the instance endpoints the gateway names may reach the upstream.
    if from_upstream(*answer):
        rest = path.split("/", 2)[2] if path.count("/") >= 2 else ""
        assert "/" + rest in (*MODEL_ENDPOINTS, "/health", "/v1/models", "/version", "/load") \
            or path in MODEL_ENDPOINTS, (method, raw_path, status)



HEADER_NAMES = st.sampled_from(["x-request-id", "content-type", "accept", "accept-encoding",
                                "authorization", "connection", "expect", "host", "te",
                                "upgrade", "x-forwarded-for", "cookie", "keep-alive",
                                "content-encoding", "trailer", "proxy-authorization"]) \
    | st.text(TOKEN_CHARS, min_size=1, max_size=20)
REQUEST_IDS = st.text(st.characters(min_codepoint=32, max_codepoint=255), min_size=1,
                      max_size=140)


@FUZZ
@given(headers=st.lists(st.tuples(HEADER_NAMES, FIELD_VALUE), max_size=8),
       request_id=st.none() | REQUEST_IDS,
       target=st.sampled_from([("POST", b"/v1/chat/completions"), ("GET", b"/tiny/health"),
                               ("POST", b"/other/v1/completions"), ("GET", b"/v1/models"),
                               ("POST", b"/nope/v1/chat/completions")]))
def test_fuzzed_headers(gw: InProcess, headers: list[tuple[str, bytes]],
                        request_id: str | None, target: tuple[str, bytes]) -> None:
    method, path = target
    raw = [(name.encode(), value) for name, value in headers if name != "x-request-id"]
    if request_id is not None:
        raw.append((b"x-request-id", request_id.encode("latin-1")))
    body = (b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"prompt":"hi",'
            b'"max_tokens":1}')
    answer = gw.asgi(method, path, raw, body if method == "POST" else b"")
    check(answer, (target, raw))
    echoed = answer[1].get("x-request-id", "")
    if request_id is not None and request_id.isascii() and request_id.isprintable() \
            and len(request_id) <= 128:
        assert echoed == request_id, (request_id, echoed)
    else:  # refused: a fresh id, the same on every path
        assert echoed != request_id and len(echoed) == 32 and echoed.isalnum(), (request_id,
                                                                                  echoed)


# -- over real sockets -----------------------------------------------------------------------------
@pytest.fixture
def served(sim_factory, gateway_factory) -> tuple[Any, SimServer]:
    sim = sim_factory(served_names=("tiny",), max_model_len=256)
    other = "\n".join(["[models.other]", f'url = "{sim.base_url}"',
                       'served_model_name = "tiny"', 'aliases = ["other-alias"]', ""])
    gw = gateway_factory(registry_for(tiny=sim) + other,
                         extra_env={"GATEWAY_MAX_BODY_BYTES": str(4 * 1024 * 1024)})
    return gw, sim


def _request(method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
             content_length: bool = True) -> bytes:
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"host: gw", b"connection: close"]
    head += [k + b": " + v for k, v in headers]
    if content_length:
        head.append(b"content-length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _check_socket_answer(answer: tuple[int, dict[str, str], bytes], what: object) -> None:
    status, headers, body = answer
    if status == 400 and body == b"Invalid HTTP request received.":
        return  # uvicorn's parser refused the request line or a header: the app never ran
    check(answer, what)


def _alive(gw: Any) -> None:
    assert gw.process.poll() is None, "the gateway process died"
    assert httpx.get(f"{gw.base_url}/health", timeout=5).status_code == 200


def test_over_sockets_hostile_bodies_headers_and_paths(served) -> None:
    gw, _ = served
    chat = b'{"model":"MODEL","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"x":'
    cases: list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes, bool]] = []
    json_ct = [(b"content-type", b"application/json")]
    for model in (b"tiny", b"other"):
        for depth in (300, 10_000, 1_000_000):  # 1e6: 2 MB that overflow a recursive parser
            body = chat.replace(b"MODEL", model) + _nested(depth, "array") + b"}"
            cases.append(("POST", b"/v1/chat/completions", json_ct, body, True))
    big = b'{"model":"tiny","x":"' + b"a" * (4 * 1024 * 1024) + b'"}'
    cases += [
        ("POST", b"/v1/chat/completions", json_ct, big, True),            # 413 by length
        ("POST", b"/v1/chat/completions", json_ct, b"\xff\xfe\x00{", True),
        ("POST", b"/v1/chat/completions", [(b"content-type", b"text/html")], b"<html>", True),
        ("POST", b"/v1/chat/completions", json_ct + [(b"x-big", b"h" * 1_000_000)],
         chat.replace(b"MODEL", b"tiny") + b"1}", True),
        ("POST", b"/v1/chat/completions", json_ct + [(b"x-h%d" % i, b"v" * 1000)
                                                     for i in range(500)],
         chat.replace(b"MODEL", b"other") + b"1}", True),
    ]
    for path in (b"/%2e%2e/", b"//v1/chat/completions", b"/v1/chat/completions/../../sleep",
                 b"/tiny/../sleep", b"/tiny/%2e%2e/sleep", b"/tiny/v1/../../metrics",
                 b"/tiny/%2fsleep", b"/tiny//health", b"/../../etc/passwd",
                 b"/tiny/sim/requests", b"/tiny/v1/chat/completions/..%2f..%2fsleep"):
        for method in ("GET", "POST"):
            cases.append((method, path, json_ct, chat.replace(b"MODEL", b"tiny") + b"1}", True))
    for method, target, headers, body, with_length in cases:
        what = (method, target, len(body), body[:60])
        try:
            answer = raw_exchange(gw.port, _request(method, target, headers, body, with_length))
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}; gateway exit code {gw.process.poll()}") from None
        _check_socket_answer(answer, what)
        if len(body) > 4 * 1024 * 1024:
            assert answer[0] == 413, answer[:2]
        if sum(len(k) + len(v) + 4 for k, v in headers) > 64 * 1024:  # GATEWAY_MAX_HEADER_BYTES
            assert answer[0] == 431, (what, answer[:2])
        _alive(gw)

    # A body beyond the limit without a length (chunked) is cut off at the limit.
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
               b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
    piece = b"a" * 65536
    chunked += (b"%x\r\n" % len(piece) + piece + b"\r\n") * 80 + b"0\r\n\r\n"
    answer = raw_exchange(gw.port, chunked)
    _check_socket_answer(answer, "chunked 5 MiB")
    assert answer[0] == 413
    _alive(gw)


RAW_METHODS = st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "G ET", "",
                               "POST\x00"])
RAW_TARGETS = st.lists(SEGMENTS, min_size=1, max_size=6).map(lambda s: ("/" + "/".join(s)).encode())
RAW_HEADERS = st.lists(st.tuples(st.text(TOKEN_CHARS, min_size=1, max_size=12).map(str.encode),
                                 st.binary(max_size=40).map(
                                     lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
                       max_size=5)  # any bytes but CR/LF: the server's parser judges them


@settings(FUZZ, max_examples=80)
@given(method=RAW_METHODS, target=RAW_TARGETS, query=QUERIES, headers=RAW_HEADERS,
       body=st.sampled_from([b"", b'{"model":"tiny","prompt":"hi","max_tokens":1}',
                             b'{"model":"other","messages":[]}', b"{", b"\xff"])
       | st.binary(max_size=100))
def test_over_sockets_fuzzed_requests(served, method: str, target: bytes, query: bytes,
                                      headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    gw, _ = served
    request = _request(method, target + query,
                       [(k, v) for k, v in headers if k not in (b"content-length", b"host",
                                                                b"transfer-encoding")]
                       + [(b"content-type", b"application/json")], body)
    _check_socket_answer(raw_exchange(gw.port, request), request[:500])
    wait_for(lambda: gw.process.poll() is None, 0, "gateway process alive")


# -- over real sockets: header floods against small limits ----------------------------------------
HEAD_LIMIT, COUNT_LIMIT = 8192, 40


@pytest.fixture
def limited(sim_factory, gateway_factory) -> Any:
    sim = sim_factory(served_names=("tiny",), max_model_len=256)
    return gateway_factory(registry_for(tiny=sim), extra_env={
        "GATEWAY_MAX_HEADER_BYTES": str(HEAD_LIMIT), "GATEWAY_MAX_HEADER_COUNT": str(COUNT_LIMIT),
        "GATEWAY_HEADER_TIMEOUT": "5"})


@settings(FUZZ, max_examples=60)
@given(count=st.sampled_from([0, 1, COUNT_LIMIT - 5, COUNT_LIMIT - 4, COUNT_LIMIT - 3, 200,
                              5000]) | st.integers(0, 300),
       size=st.sampled_from([0, 1, 100, HEAD_LIMIT // 2, HEAD_LIMIT, 10 * HEAD_LIMIT])
       | st.integers(0, 3 * HEAD_LIMIT),
       line=st.sampled_from([1, 100, HEAD_LIMIT, 4 * HEAD_LIMIT]),
       pieces=st.sampled_from([1, 2, 7, 64]),
       target=st.sampled_from([("POST", b"/v1/chat/completions"), ("GET", b"/v1/models"),
                               ("GET", b"/health")]))
def test_header_floods_get_431_and_leave_the_gateway_fast(
        limited, count: int, size: int, line: int, pieces: int,
        target: tuple[str, bytes]) -> None:
    gw = limited
    method, path = target
    per = size // count if count else 0
    fields = [(b"x-f%d" % i, b"v" * per) for i in range(count)]
    query = b"?q=" + b"a" * line
    body = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
    request = _request(method, path + query, [(b"content-type", b"application/json"), *fields],
                       body if method == "POST" else b"")
    head_bytes = request.index(b"\r\n\r\n") + 4
    fields_total = count + 4  # host, connection, content-type, content-length
    step = max(1, len(request) // pieces)
    data = b""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
        try:
            for i in range(0, len(request), step):  # the head arrives in pieces
                sock.sendall(request[i:i + step])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused part-way
        data, _ = read_until_closed(sock, 20)
    status, headers, answer = parse_response(data)
    what = (method, path, count, size, line, pieces, head_bytes)
    _check_socket_answer((status, headers, answer), what)
    if head_bytes > HEAD_LIMIT + 4 or fields_total > COUNT_LIMIT:
        assert status == 431, (what, status, answer[:300])
    if head_bytes <= HEAD_LIMIT and fields_total <= COUNT_LIMIT:
        assert status != 431, (what, answer[:300])
    started = time.monotonic()
    _alive(gw)
    assert time.monotonic() - started < 1.0, "/health slowed down"
