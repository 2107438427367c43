"""The `fleet` CLI: exit codes, stdout/stderr split, --json shapes (fake engine, no Docker)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet.cli import main
from fleet.errors import DockerUnreachable
from support.fleet_fakes import REGISTRY_TOML, FakeWorld, make_fleet, make_registry
from support.registries import WriteRegistry

pytestmark = pytest.mark.unit


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
def registry_file(write_registry: WriteRegistry) -> Path:
    return write_registry(REGISTRY_TOML)


@pytest.fixture
def cli(world: FakeWorld, registry_file: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    def factory(registry, args, progress):  # type: ignore[no-untyped-def]
        fleet = make_fleet(world, registry, tmp_path)
        fleet._progress = progress
        return fleet

    def run(*argv: str, registry: Path | None = registry_file, fake: bool = True) -> Run:
        out, err = io.StringIO(), io.StringIO()
        full = [*(["--registry", str(registry)] if registry else []), *argv]
        code = main(full, fleet_builder=factory if fake else None, stdout=out, stderr=err)
        return Run(code, out.getvalue(), err.getvalue())

    return run


def test_status_table_and_json(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("status")
    assert r.code == 0 and r.err == ""
    assert r.out.splitlines()[0].split() == ["MODEL", "REPLICA", "STATE", "PORT", "GPUS",
                                             "FRACTION", "UPTIME", "HEALTH", "DETAIL"]
    assert r.out.splitlines()[1].split() == ["a", "0", "absent", "18001", "0", "0.6", "-", "-"]
    r = cli("status", "--json")
    rows = r.json()
    assert [row["name"] for row in rows] == ["a", "b", "c"]
    # the shape of before, plus `replica`
    assert set(rows[0]) == {"name", "state", "port", "gpus", "fraction", "uptime", "health",
                            "container", "detail", "replica"}
    assert rows[0]["gpus"] == [0] and rows[0]["state"] == "absent" and rows[0]["replica"] == 0


def test_global_options_work_after_the_command_too(cli, registry_file: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("status", "--json", "--registry", str(registry_file), registry=None)
    assert r.code == 0 and len(r.json()) == 3


def test_up_then_switch_prints_timings_on_stderr_and_data_on_stdout(cli, world) -> None:  # type: ignore[no-untyped-def]
    r = cli("up")
    assert r.code == 0, r.err
    assert "a: create" in r.out and "awake: a" in r.out
    r = cli("switch", "b")
    assert r.code == 0, r.err
    assert "sleeping a" in r.err
    timing = [line for line in r.err.splitlines() if line.startswith("switch b: ")]
    assert timing and all(k in timing[0] for k in ("evict", "start", "healthy", "total"))
    assert "awake: b" in r.out
    r = cli("switch", "a", "--json")
    report = r.json()
    assert report["operation"] == "switch" and report["target"] == ["a"]
    assert [(x["model"], x["action"]) for x in report["actions"]] == [("b", "stop"),
                                                                       ("a", "wake")]
    assert set(report["timings"]) == {"evict", "start", "healthy", "total"}
    assert report["awake"] == ["a"]


def test_plan_switch_is_a_dry_run(cli, world) -> None:  # type: ignore[no-untyped-def]
    cli("up")
    world.calls.clear()
    r = cli("plan", "switch", "b")
    assert r.code == 0
    assert "sleep a" in r.out and "start b" in r.out
    assert cli("switch", "b", "--dry-run").out == r.out
    plan = cli("plan", "switch", "b", "--json").json()
    assert plan["evict"][0]["model"] == "a" and plan["start_action"] == "start"
    assert world.calls == []


def test_failed_switch_exits_1_with_log_lines_and_state(cli, world) -> None:  # type: ignore[no-untyped-def]
    world.crash.add("b")
    r = cli("switch", "b")
    assert r.code == 1
    assert "RuntimeError: simulated failure at start" in r.err
    assert "fleet state now:" in r.err and "to recover:" in r.err
    assert r.out == ""


def test_refused_switch_exits_1(world, registry_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    def factory(registry, args, progress):  # type: ignore[no-untyped-def]
        return make_fleet(world, registry, tmp_path, busy=lambda m: True)

    out, err = io.StringIO(), io.StringIO()
    assert main(["--registry", str(registry_file), "up"], fleet_builder=factory,
                stdout=out, stderr=err) == 0
    code = main(["--registry", str(registry_file), "switch", "b"], fleet_builder=factory,
                stdout=out, stderr=err)
    assert code == 1 and "[busy]" in err.getvalue()


def test_docker_unreachable_exits_1_with_the_message(cli, world) -> None:  # type: ignore[no-untyped-def]
    world.unreachable = DockerUnreachable("cannot reach the Docker daemon at tcp://x: is "
                                          "dockerd running?")
    r = cli("status")
    assert r.code == 1
    assert r.err.strip() == "fleet: cannot reach the Docker daemon at tcp://x: is dockerd running?"


def test_real_engine_against_a_closed_port_exits_1(cli, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FLEET_LOCK_FILE", str(tmp_path / "lock"))  # never the machine's lock
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    r = cli("status", fake=False)
    assert r.code == 1
    assert "cannot reach the Docker daemon at tcp://127.0.0.1:1" in r.err
    assert "Connection refused" in r.err and "is dockerd running?" in r.err
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    r = cli("--docker-host", "tcp://127.0.0.1:1", "up", fake=False)  # the option wins
    assert r.code == 1 and "at tcp://127.0.0.1:1 " in r.err


def test_usage_and_config_errors_exit_2(cli, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.x]\nsource = "org/x"\nprot = 1\n')
    r = cli("status", registry=bad)
    assert r.code == 2 and "unknown field 'prot' (did you mean 'port'?)" in r.err
    r = cli("status", registry=tmp_path / "missing.toml")
    assert r.code == 2 and "file not found" in r.err
    assert cli("switch", "nope").code == 2
    assert "remote model" in cli("switch", "remote").err
    assert cli().code == 2  # no command
    assert cli("frobnicate").code == 2
    monkeypatch.setenv("FLEET_EXTRA_LABELS", "no-equals-sign")
    r = cli("status", fake=False)
    assert r.code == 2 and "FLEET_EXTRA_LABELS" in r.err


def test_check_verdict_and_exit_codes(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("check")
    assert r.code == 0 and "ok: 3 managed model(s)" in r.out
    over = tmp_path / "over.toml"
    over.write_text(REGISTRY_TOML.replace("autostart = false\n", "", 1))  # a and b autostart
    r = cli("check", registry=over)
    assert r.code == 2 and "[gpu-overcommit]" in r.out
    data = cli("check", "--json", registry=over).json()
    assert data["ok"] is False and data["violations"][0]["kind"] == "gpu-overcommit"


def test_compose_writes_and_checks_drift(cli, registry_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "compose.yaml"
    r = cli("compose")
    assert r.code == 0 and r.out.strip() == str(target)
    assert "container_name: vllm-fleet-a" in target.read_text()
    assert "hf_secret_value" not in target.read_text()
    assert cli("compose", "--check").code == 0
    target.write_text(target.read_text().replace("18001", "18011"))
    r = cli("compose", "--check")
    assert r.code == 1 and "-" in r.out and "18011" in r.out and "re-render" in r.err
    assert cli("compose", "--output", "-").out.startswith("# generated from models.toml")


def test_compose_one_file_per_registry(cli, registry_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """models.cpu.toml renders compose.cpu.yaml beside it; --check compares with that file;
    rendering one registry never overwrites another's file."""
    cpu = tmp_path / "models.cpu.toml"
    cpu.write_text(registry_file.read_text().replace("18001", "18301"))
    assert cli("compose").code == 0
    main_text = (tmp_path / "compose.yaml").read_text()
    r = cli("compose", registry=cpu)
    assert r.code == 0 and r.out.strip() == str(tmp_path / "compose.cpu.yaml")
    cpu_text = (tmp_path / "compose.cpu.yaml").read_text()
    assert cpu_text.startswith("# generated from models.cpu.toml") and "18301" in cpu_text
    assert (tmp_path / "compose.yaml").read_text() == main_text      # untouched
    assert (tmp_path / "compose.docker-socket.yaml").is_file()      # the opt-in override
    assert cli("compose", "--check", registry=cpu).code == 0
    assert cli("compose", "--check").code == 0
    # another registry's file is refused as an explicit output (exit 2), unless --force
    r = cli("compose", "--output", str(tmp_path / "compose.yaml"), registry=cpu)
    assert r.code == 2 and "rendered from models.toml" in r.err and "--force" in r.err
    assert (tmp_path / "compose.yaml").read_text() == main_text
    hand_made = tmp_path / "mine.yaml"
    hand_made.write_text("services: {}\n")
    r = cli("compose", "--output", str(hand_made), registry=cpu)
    assert r.code == 2 and "not rendered by `fleet compose`" in r.err
    assert cli("compose", "--output", str(hand_made), "--force", registry=cpu).code == 0
    assert hand_made.read_text().startswith("# generated from models.cpu.toml")


def test_logs(cli, world) -> None:  # type: ignore[no-untyped-def]
    cli("up")
    r = cli("logs", "a", "--tail", "5")
    assert r.code == 0 and "INFO starting a" in r.out
    assert cli("logs", "a", "--follow").out == "INFO starting a\n"
    r = cli("logs", "b")
    assert r.code == 1 and "has no container" in r.err


def test_python_dash_m_fleet() -> None:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    r = subprocess.run([sys.executable, "-m", "fleet", "--help"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0 and "switch" in r.stdout


def test_make_registry_matches_file(registry_file: Path) -> None:
    assert set(make_registry().models) == {"a", "b", "c", "remote"}


def test_scale_status_and_logs_of_replicas(cli, world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from support.fleet_fakes import REPLICA_TOML

    path = tmp_path / "replicas.toml"
    path.write_text(REPLICA_TOML)
    r = cli("up", "auto", registry=path)
    assert r.code == 0, r.err
    assert r.out.splitlines()[0] == "auto[0]: create"
    r = cli("scale", "auto", "3", registry=path)
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["auto[1]: create", "auto[2]: create", "awake: auto"]
    assert "scale auto: start" in r.err
    rows = cli("status", "--json", registry=path).json()
    assert [(x["name"], x["replica"], x["port"], x["state"]) for x in rows if x["name"] == "auto"] \
        == [("auto", 0, 18111, "healthy"), ("auto", 1, 18112, "healthy"),
            ("auto", 2, 18113, "healthy")]
    table = cli("status", registry=path).out.splitlines()
    assert table[4].split()[:4] == ["auto", "1", "healthy", "18112"]  # after pool 0, 1, auto 0
    report = cli("scale", "auto", "1", "--json", registry=path).json()
    assert [(a["replica"], a["action"]) for a in report["actions"]] == [(2, "stop"), (1, "stop")]
    assert cli("logs", "auto", "--replica", "1", registry=path).out == "INFO starting auto\n"
    r = cli("scale", "auto", "7", registry=path)
    assert r.code == 2 and "it takes 1 to 3" in r.err
    assert cli("up", registry=path).code == 0   # pool beside auto: 0.6 + 0.2
    r = cli("scale", "auto", "3", registry=path)
    assert r.code == 1 and "[gpu-overcommit]" in r.err


def test_host_inventory_overridden_by_flags(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("check").code == 0
    r = cli("check", "--host-gpus", "5")  # the registry's models use GPU 0
    assert r.code == 2 and "is not in [host].gpus" in r.err
    r = cli("--host-gpus", "0,x", "check")
    assert r.code == 2 and "'0,x' is not a comma-separated list of GPU ids" in r.err
    r = cli("--host-cpus", "0", "check")
    assert r.code == 2 and "cpus" in r.err


def test_status_with_the_gateway_figures(cli, world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import httpx
    import respx

    assert cli("up").code == 0
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", "sekret")
    sched = {"state": "draining", "oldest_wait": 4.25, "draining_because": "quantum over"}
    body = {"models": {"a": {"in_flight": 3, "queued": 1, "scheduler": sched, "replicas": [
        {"index": 0, "outstanding": 3, "ejected": False}]}}}
    with respx.mock() as mock:
        route = mock.get("http://gw:8000/admin/status").respond(200, json=body)
        r = cli("status", "--json", "--gateway", "http://gw:8000")
        assert route.calls[0].request.headers["authorization"] == "Bearer sekret"
        rows = {row["name"]: row for row in r.json()}
        assert rows["a"]["gateway"] == {"in_flight": 3, "queued": 1, "outstanding": 3,
                                        "ejected": False, "scheduler": sched}
        r = cli("status", "--gateway", "http://gw:8000")
        assert "a [0]: 3 in flight, 1 queued, 3 outstanding; draining, oldest waiting 4.2s, " \
               "draining: quantum over" in r.out
        mock.get("http://down:8000/admin/status").mock(side_effect=httpx.ConnectError("no"))
        r = cli("status", "--gateway", "http://down:8000")
        assert r.code == 0 and "no figures from the gateway at http://down:8000" in r.err
