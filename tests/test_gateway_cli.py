"""`python -m gateway`: configuration errors exit 2 with the problem; settings come from env."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.settings import GatewaySettings

pytestmark = pytest.mark.gateway


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=30, env=env)


def test_bad_registry_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[models.a]\nurl = "http://127.0.0.1:1"\nprot = 3\n')
    proc = run("--registry", str(path))
    assert proc.returncode == 2
    assert f"{path}: invalid registry" in proc.stderr
    assert "model 'a': unknown field 'prot' (did you mean 'port'?)" in proc.stderr


def test_missing_registry_exits_2(tmp_path: Path) -> None:
    proc = run("--registry", str(tmp_path / "none.toml"))
    assert proc.returncode == 2 and "file not found" in proc.stderr


def test_bad_flag_exits_2() -> None:
    proc = run("--port", "not-a-number")
    assert proc.returncode == 2 and "--port" in proc.stderr


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "9123")
    monkeypatch.setenv("GATEWAY_READ_TIMEOUT", "42")
    monkeypatch.setenv("FLEET_REGISTRY", "/etc/x.toml")
    s = GatewaySettings()
    assert (s.port, s.read_timeout, s.registry) == (9123, 42.0, "/etc/x.toml")
    assert GatewaySettings(port=1).port == 1


def test_serves_and_answers_health(gateway_factory) -> None:
    gw = gateway_factory('[models.a]\nurl = "http://127.0.0.1:9"\n')
    assert httpx.get(f"{gw.base_url}/health", timeout=5).json() == {"status": "ok", "models": 1}
