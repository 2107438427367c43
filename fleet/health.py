"""HTTP to a model's vLLM server: health, sleep, wake (not Docker, so not in the engine).

`Probe` is the interface `fleet.lifecycle` uses; `HttpProbe` speaks to a real vLLM (or the
simulator) over httpx with explicit timeouts. Every call answers a plain value or raises
`ProbeError` with the URL and the reason, never an httpx exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import httpx

from fleet.errors import ProbeError


@dataclass(frozen=True)
class HealthResult:
    """One `/health` answer: `ok` when HTTP 200; `detail` says why not."""

    ok: bool
    detail: str = ""


class Probe(Protocol):
    def health(self, base_url: str) -> HealthResult: ...

    def is_sleeping(self, base_url: str) -> bool | None:
        """True/False from `/is_sleeping`; None when the server does not answer it."""

    def sleep(self, base_url: str, level: int = 1) -> None: ...

    def wake_up(self, base_url: str) -> None: ...


class HttpProbe:
    """`Probe` over httpx. `timeout` bounds health calls; `action_timeout` sleep and wake."""

    def __init__(self, *, timeout: float = 2.0, action_timeout: float = 120.0) -> None:
        self._timeout = timeout
        self._action_timeout = action_timeout
        self._client = httpx.Client(timeout=httpx.Timeout(timeout), trust_env=False)

    def close(self) -> None:
        self._client.close()

    def health(self, base_url: str) -> HealthResult:
        url = f"{base_url}/health"
        try:
            r = self._client.get(url)
        except httpx.ConnectError:
            return HealthResult(False, "connection refused")
        except httpx.TimeoutException:
            return HealthResult(False, f"no answer within {self._timeout:g}s")
        except httpx.HTTPError as exc:
            return HealthResult(False, f"{type(exc).__name__}: {exc}")
        if r.status_code == 200:
            return HealthResult(True)
        return HealthResult(False, f"HTTP {r.status_code}")

    def is_sleeping(self, base_url: str) -> bool | None:
        try:
            r = self._client.get(f"{base_url}/is_sleeping")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        try:
            value = r.json().get("is_sleeping")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None

    def sleep(self, base_url: str, level: int = 1) -> None:
        self._post(f"{base_url}/sleep", params={"level": str(level)})

    def wake_up(self, base_url: str) -> None:
        self._post(f"{base_url}/wake_up")

    def _post(self, url: str, params: dict[str, str] | None = None) -> None:
        try:
            r = self._client.post(url, params=params, timeout=self._action_timeout)
        except httpx.HTTPError as exc:
            raise ProbeError(f"POST {url} failed: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            body = r.text[:300].strip()
            raise ProbeError(f"POST {url} answered HTTP {r.status_code}: {body}")
