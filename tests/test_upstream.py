"""Pooled upstream clients and the mapping of transport failures to client errors."""

from __future__ import annotations

import httpx
import pytest

from gateway.settings import GatewaySettings
from gateway.upstream import Upstreams, map_failure

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

S = GatewaySettings(connect_timeout=2, read_timeout=30, retry_after=9)


@pytest.mark.parametrize(("exc", "status", "said", "logged"), [
    (httpx.ConnectError("refused"), 502, "refused or dropped", "connection refused"),
    (httpx.ConnectError("the name 'vllm-m' does not resolve: [Errno -2] Name or service not "
                        "known"), 502, "refused or dropped", "'vllm-m' does not resolve"),
    (httpx.RemoteProtocolError("b'ZZZZ' bad"), 502, "refused or dropped",
     "RemoteProtocolError: b'ZZZZ' bad"),
    (httpx.ReadError("reset by peer"), 502, "refused or dropped", "ReadError: reset by peer"),
    (httpx.ConnectTimeout("t"), 503, "not ready", "no connection within 2 s"),
    (httpx.PoolTimeout("t"), 503, "not ready", "connections to it are busy"),
    (httpx.ReadTimeout("t"), 504, "within 30 s", "timed out"),
    (httpx.WriteTimeout("t"), 504, "did not answer", "timed out"),
])
def test_failures_map_to_statuses(exc: httpx.HTTPError, status: int, said: str,
                                  logged: str) -> None:
    err = map_failure(exc, "qwen", "http://127.0.0.1:8001", S)
    assert err.status == status
    assert said in err.message and "`qwen`" in err.message
    # The address and the client library's text are for the log, never for the caller.
    assert "8001" not in err.message and "127.0.0.1" not in err.message
    assert "ZZZZ" not in err.message and "Error" not in err.message
    assert err.internal is not None and logged in err.internal and "8001" in err.internal
    assert (err.retry_after == 9) == (status == 503)


def test_a_models_own_read_timeout_is_the_one_stated() -> None:
    own = httpx.Timeout(connect=1, read=3, write=60, pool=10)
    err = map_failure(httpx.ReadTimeout("t"), "qwen", "http://127.0.0.1:8001", S, own)
    assert "within 3 s" in err.message and "600" not in err.message, err.message
    assert "`read_timeout` of `qwen`" in err.message
    err = map_failure(httpx.ConnectTimeout("t"), "qwen", "http://127.0.0.1:8001", S, own)
    assert "within 1 s" in (err.internal or "")


async def test_one_client_per_instance_with_explicit_timeouts() -> None:
    ups = Upstreams(S)
    ups.open(["http://a:1", "http://b:2", "http://a:1"])
    first = ups.client("http://a:1")
    assert first is ups.client("http://a:1") and first is not ups.client("http://b:2")
    assert first.timeout == httpx.Timeout(connect=2, read=30, write=60, pool=10)
    await ups.aclose()
    assert first.is_closed
