"""Finding and setting the model of JSON and multipart bodies."""

from __future__ import annotations

import json

import pytest

from gateway import body
from gateway.errors import GatewayError

pytestmark = pytest.mark.unit

BOUNDARY = "XyZ123"
CT = f"multipart/form-data; boundary={BOUNDARY}"


def form(fields: dict[str, str], file: bytes = b"RIFF\x00\x01binary\r\n--not-a-boundary") -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'.encode() + file + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def test_json_model() -> None:
    parsed = body.parse(b'{"model": "a", "messages": []}', "application/json")
    assert (parsed.kind, parsed.model) == ("json", "a")


def test_json_without_model_and_empty_body() -> None:
    assert body.parse(b'{"messages": []}', "application/json").model is None
    assert body.parse(b"  ", "").kind == "empty"


@pytest.mark.parametrize("raw", [b"{bad", b'{"model": "a"', b"\xff\xfe", b"nan"])
def test_invalid_json_is_a_400(raw: bytes) -> None:
    with pytest.raises(GatewayError) as info:
        body.parse(raw, "application/json")
    assert info.value.status == 400 and "not valid JSON" in info.value.message


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"3"])
def test_non_object_is_a_400(raw: bytes) -> None:
    with pytest.raises(GatewayError) as info:
        body.parse(raw, "application/json")
    assert info.value.status == 400 and "JSON object" in info.value.message


def test_model_must_be_a_string() -> None:
    with pytest.raises(GatewayError) as info:
        body.parse(b'{"model": 3}', "application/json")
    assert info.value.param == "model"


def test_with_model_json_keeps_everything_else() -> None:
    raw = b'{"model": "alias", "messages": [{"role": "user", "content": "hi"}], "n": 1}'
    parsed = body.parse(raw, "application/json")
    out = json.loads(body.with_model(parsed, raw, "served"))
    assert out == {"model": "served", "messages": [{"role": "user", "content": "hi"}], "n": 1}
    assert json.loads(body.with_model(body.parse(b"", ""), b"", "m")) == {"model": "m"}


def test_multipart_model_found_without_touching_the_file() -> None:
    raw = form({"model": "whisper", "language": "en"})
    parsed = body.parse(raw, CT)
    assert (parsed.kind, parsed.model) == ("multipart", "whisper")
    replaced = body.with_model(parsed, raw, "served-name")
    assert body.parse(replaced, CT).model == "served-name"
    assert replaced.replace(b"served-name", b"whisper") == raw


def test_multipart_without_model_gets_one_inserted() -> None:
    raw = form({"language": "en"})
    parsed = body.parse(raw, CT)
    assert parsed.model is None
    assert body.parse(body.with_model(parsed, raw, "w"), CT).model == "w"


def test_multipart_quoted_boundary_and_errors() -> None:
    raw = form({"model": "m"})
    assert body.parse(raw, f'multipart/form-data; boundary="{BOUNDARY}"').model == "m"
    for ct, data in [("multipart/form-data", raw), (CT, b"no boundary here"),
                     (CT, f"--{BOUNDARY}\r\nno header end".encode())]:
        with pytest.raises(GatewayError) as info:
            body.parse(data, ct)
        assert info.value.status == 400 and "multipart" in info.value.message


def test_multipart_with_two_model_fields_is_a_400() -> None:
    # The gateway would route by the first, vLLM reads the last: refuse the ambiguity.
    two = form({"model": "a"}).replace(
        f"--{BOUNDARY}--".encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nb\r\n'
        f"--{BOUNDARY}--".encode())
    with pytest.raises(GatewayError) as info:
        body.parse(two, CT)
    assert info.value.status == 400 and "more than one `model` field" in info.value.message
    assert body.parse(form({"model": "a", "language": "en"}), CT).model == "a"


# -- reading bodies within the limits -------------------------------------------------------------
class FakeRequest:
    """What `read_body` uses of a Starlette request: headers, receive(), state, scope."""

    def __init__(self, chunks: list[bytes], length: int | None = None,
                 disconnect_after: int | None = None) -> None:
        self.headers = {} if length is None else {"content-length": str(length)}
        self._chunks, self._disconnect_after = chunks, disconnect_after
        self._sent = 0
        self.state = type("State", (), {"request_id": "rid-1"})()
        self.scope: dict[str, object] = {}

    async def receive(self) -> dict[str, object]:
        i, self._sent = self._sent, self._sent + 1
        if self._disconnect_after is not None and i >= self._disconnect_after:
            return {"type": "http.disconnect"}
        if i >= len(self._chunks):
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": self._chunks[i], "more_body": True}


@pytest.mark.anyio
async def test_the_global_budget_refuses_with_503_and_is_given_back() -> None:
    budget = body.BodyBudget(100, retry_after=7)
    with budget.hold() as first:
        assert await body.read_body(FakeRequest([b"a" * 60]), 1000, first) == b"a" * 60
        with budget.hold() as second:  # by the declared length: nothing is read
            with pytest.raises(GatewayError) as info:
                await body.read_body(FakeRequest([b"b" * 50], length=50), 1000, second)
            assert info.value.status == 503 and info.value.retry_after == 7
            assert "GATEWAY_MAX_BUFFERED_BYTES" in info.value.message
            with pytest.raises(GatewayError) as info:  # no length: counted as read
                await body.read_body(FakeRequest([b"b" * 30, b"b" * 30]), 1000, second)
            assert info.value.status == 503
        assert budget.held == 60
    assert budget.held == 0
    with budget.hold() as again:
        assert await body.read_body(FakeRequest([b"c" * 100], length=100), 1000, again)


@pytest.mark.anyio
async def test_a_client_leaving_mid_upload_is_a_499_not_a_failure() -> None:
    budget = body.BodyBudget(1000, retry_after=1)
    with budget.hold() as hold, pytest.raises(GatewayError) as info:
        await body.read_body(FakeRequest([b"x" * 10] * 5, disconnect_after=2), 1000, hold)
    assert info.value.status == 499 and "rid-1" in info.value.message
    assert budget.held == 0


@pytest.mark.anyio
async def test_a_body_closed_by_the_server_for_being_late_is_recorded_as_408() -> None:
    late = FakeRequest([b"x" * 10] * 5, disconnect_after=1)
    late.scope["gateway.body_late"] = 1.5  # what gateway/server.py sets before closing
    with pytest.raises(GatewayError) as info:
        await body.read_body(late, 1000)
    assert info.value.status == 408 and "1.5 s" in info.value.message
    assert "GATEWAY_BODY_TIMEOUT" in info.value.message


@pytest.mark.anyio
async def test_the_per_body_limit_is_413() -> None:
    with pytest.raises(GatewayError) as info:
        await body.read_body(FakeRequest([b"x"], length=2000), 1000)
    assert info.value.status == 413
