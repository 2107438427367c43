"""Pytest fixtures: the gateway as a real process (`python -m gateway`) on a real port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_until_ok(url: str, deadline_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200; fail with the process output if it dies or time runs out."""
    end = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            out = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise AssertionError(f"process exited with {process.returncode} before {url} "
                                 f"answered:\n{out[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)  # poll interval, not synchronisation: the deadline bounds the wait
    raise AssertionError(f"{url} did not answer 200 within {deadline_s} s (last: {last!r})")


@dataclass
class GatewayProcess:
    base_url: str
    port: int
    process: subprocess.Popen[bytes]
    registry: Path


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """`start(registry_text, **env) -> GatewayProcess`: run the gateway CLI on a free port."""
    started: list[GatewayProcess] = []

    def start(registry_text: str, extra_env: dict[str, str] | None = None) -> GatewayProcess:
        path = tmp_path / f"models-{len(started)}.toml"
        path.write_text(registry_text)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--registry", str(path), "--port", str(port),
             "--log-level", "warning"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        gw = GatewayProcess(f"http://127.0.0.1:{port}", port, proc, path)
        started.append(gw)
        wait_until_ok(f"{gw.base_url}/health", 30, proc)
        return gw

    yield start
    for gw in started:
        gw.process.terminate()
        try:
            gw.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gw.process.kill()
            gw.process.wait(timeout=10)
