"""fleet.health.HttpProbe against respx-mocked vLLM endpoints."""

from __future__ import annotations

import httpx
import pytest
import respx

from fleet.errors import ProbeError
from fleet.health import HttpProbe

pytestmark = pytest.mark.unit

URL = "http://127.0.0.1:18001"


@pytest.fixture
def probe() -> HttpProbe:
    return HttpProbe(timeout=0.5, action_timeout=1.0)


@respx.mock
def test_health(probe: HttpProbe) -> None:
    route = respx.get(f"{URL}/health")
    route.return_value = httpx.Response(200)
    assert probe.health(URL).ok
    route.return_value = httpx.Response(503)
    assert probe.health(URL).detail == "HTTP 503"
    route.side_effect = httpx.ConnectError("refused")
    assert probe.health(URL).detail == "connection refused"
    route.side_effect = httpx.ReadTimeout("slow")
    assert probe.health(URL).detail == "no answer within 0.5s"


@respx.mock
def test_is_sleeping(probe: HttpProbe) -> None:
    route = respx.get(f"{URL}/is_sleeping")
    route.return_value = httpx.Response(200, json={"is_sleeping": True})
    assert probe.is_sleeping(URL) is True
    route.return_value = httpx.Response(200, json={"is_sleeping": False})
    assert probe.is_sleeping(URL) is False
    route.return_value = httpx.Response(404, json={"detail": "Not Found"})
    assert probe.is_sleeping(URL) is None  # no sleep mode: not an error


@respx.mock
def test_sleep_and_wake(probe: HttpProbe) -> None:
    sleep = respx.post(f"{URL}/sleep", params={"level": "1"}).mock(
        return_value=httpx.Response(200, json={"status": "sleeping", "level": 1}))
    wake = respx.post(f"{URL}/wake_up").mock(return_value=httpx.Response(
        500, json={"error": {"message": "boom"}}))
    probe.sleep(URL)
    assert sleep.called
    with pytest.raises(ProbeError, match=r"POST http://127.0.0.1:18001/wake_up answered HTTP "
                                         r"500: .*boom"):
        probe.wake_up(URL)
    assert wake.called
    sleep.side_effect = httpx.ConnectError("refused")
    with pytest.raises(ProbeError, match="ConnectError"):
        probe.sleep(URL, level=1)
