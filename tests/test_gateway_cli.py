"""`python -m gateway`: configuration errors exit 2 with the problem; settings come from env."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway import cli
from gateway.settings import GatewaySettings
from support.gateway_fixtures import REPO
from support.reliability import process_output

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


def test_service_addressing_on_a_swarm_without_its_network_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text('[cluster]\nengine = "swarm"\n[nodes.n1]\naddress = "10.9.0.1"\n'
                    '[models.m]\nsource = "org/m"\nport = 8001\n')
    proc = run("--registry", str(path), env={**os.environ, "GATEWAY_UPSTREAM_HOST": "service"})
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: invalid registry" in proc.stderr
    assert "[cluster] sets no `network`" in proc.stderr and "unset GATEWAY_UPSTREAM_HOST" \
        in proc.stderr


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


# -- what a newcomer trips on -------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_unknown_gateway_variable_is_an_error_with_a_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.a]\nurl = "http://127.0.0.1:9"\n')
    # GATEWAY_API_KEY (for GATEWAY_API_KEYS) would otherwise leave the gateway open.
    proc = run("--registry", str(path), "--port", "1",
               env=clean_env(GATEWAY_API_KEY="sk-1", GATEWAY_MAX_BODY="10"))
    assert proc.returncode == 2, proc.stderr
    assert "unknown setting GATEWAY_API_KEY (did you mean GATEWAY_API_KEYS?)" in proc.stderr
    assert "unknown setting GATEWAY_MAX_BODY (did you mean GATEWAY_MAX_BODY_BYTES?)" in proc.stderr


def test_a_bad_value_names_the_variable_or_the_flag() -> None:
    proc = run("--header-timeout", "soon", env=clean_env(GATEWAY_MAX_BODY_BYTES="lots"))
    assert proc.returncode == 2
    assert "invalid setting GATEWAY_MAX_BODY_BYTES=lots:" in proc.stderr, proc.stderr
    assert "invalid setting --header-timeout soon:" in proc.stderr, proc.stderr
    proc = run("--no-list-aliases", "--retry-after", "0", env=clean_env())
    assert proc.returncode == 2 and "--retry-after 0: Input should be greater" in proc.stderr


def test_help_shows_every_setting_as_a_flag_with_its_variable_and_default() -> None:
    proc = run("--help", env=clean_env())
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for name in GatewaySettings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        env = "GATEWAY_" + name.upper()
        assert f"env {env}" in text, env
    for shown in ("default 65536", "default 100", "default 10.0", "default 4096",
                  "default 268435456", "--list-aliases", "--no-list-aliases", "example:"):
        assert shown in text, shown


def test_flags_set_the_settings() -> None:
    settings, problems, _ = cli.load_settings(
        ["--max-header-bytes", "8192", "--no-list-aliases", "--header-timeout", "2.5"], {})
    assert settings is not None and not problems
    assert (settings.max_header_bytes, settings.list_aliases, settings.header_timeout) == (
        8192, False, 2.5)


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "gateway", "--version"],
    [sys.executable, "-m", "fleet", "--version"],
    [sys.executable, "-m", "vllm_sim", "--version"],
])
def test_version_on_every_command(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\b\d+\.\d+\.\d+\b", proc.stdout), proc.stdout
    assert "vllm-fleet" in proc.stdout


@pytest.mark.parametrize("sub", ["up", "down", "switch", "sleep", "wake", "scale", "status",
                                 "logs", "check", "compose", "plan", "plan switch"])
def test_fleet_subcommand_help_has_a_description_and_an_example(sub: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "fleet", *sub.split(), "--help"],
                          capture_output=True, text=True, timeout=30, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    _, _, rest = proc.stdout.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert description.strip() and not description.startswith(("positional", "options")), (
        proc.stdout)
    assert "example:\n  fleet " + sub in proc.stdout, proc.stdout


def test_the_start_banner_says_where_how_many_and_whether_keys_are_on(gateway_factory) -> None:
    registry = '[models.a]\nurl = "http://127.0.0.1:9"\n[models.b]\nurl = "http://127.0.0.1:9"\n'
    gw = gateway_factory(registry)
    out = process_output(gw.process)
    assert f"listening on http://127.0.0.1:{gw.port}" in out, out
    assert "2 model(s)" in out and "API keys off" in out, out
    gw = gateway_factory(registry, extra_env={"GATEWAY_API_KEYS": "sk-a,sk-b"})
    out = process_output(gw.process)
    assert "API keys on (2)" in out and "sk-a" not in out, out
