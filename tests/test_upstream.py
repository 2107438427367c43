"""Pooled upstream clients and the mapping of transport failures to client errors."""

from __future__ import annotations

import httpx
import pytest

from gateway.settings import GatewaySettings
from gateway.upstream import Upstreams, map_failure

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

S = GatewaySettings(connect_timeout=2, read_timeout=30, retry_after=9)


@pytest.mark.parametrize(("exc", "status", "words"), [
    (httpx.ConnectError("refused"), 502, "connection refused"),
    (httpx.RemoteProtocolError("reset"), 502, "RemoteProtocolError"),
    (httpx.ReadError("reset by peer"), 502, "ReadError"),
    (httpx.ConnectTimeout("t"), 503, "no connection within 2 s"),
    (httpx.PoolTimeout("t"), 503, "connections to it are busy"),
    (httpx.ReadTimeout("t"), 504, "within 30 s"),
    (httpx.WriteTimeout("t"), 504, "did not answer"),
])
def test_failures_map_to_statuses(exc: httpx.HTTPError, status: int, words: str) -> None:
    err = map_failure(exc, "qwen", "http://127.0.0.1:8001", S)
    assert err.status == status
    assert words in err.message and "`qwen`" in err.message and "8001" in err.message
    assert (err.retry_after == 9) == (status == 503)


async def test_one_client_per_instance_with_explicit_timeouts() -> None:
    ups = Upstreams(S)
    ups.open(["http://a:1", "http://b:2", "http://a:1"])
    first = ups.client("http://a:1")
    assert first is ups.client("http://a:1") and first is not ups.client("http://b:2")
    assert first.timeout == httpx.Timeout(connect=2, read=30, write=60, pool=10)
    await ups.aclose()
    assert first.is_closed
