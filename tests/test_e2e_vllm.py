"""The whole product on real vLLM: fleet-managed vLLM CPU containers behind the gateway.

One module-scoped fleet and gateway, driven in order like an operator and a user would:
the registry is models.cpu.toml with free ports and a one-core budget (so the two models
time-share), tiny-b not autostarted. The official `openai` client is the caller; vLLM's own
`/metrics` is the witness for aborts; `fleet` runs as its CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from support.docker_fixtures import docker_cli
from support.gateway_fixtures import wait_until_ok
from support.ports import free_port
from support.vllm_fixtures import CPU_REGISTRY, VllmEnv

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parent.parent
MSG = [{"role": "user", "content": "Hello"}]
FLEET_TIMEOUT = 600


@dataclass
class Stack:
    registry: Path
    env: dict[str, str]
    gateway: str
    ports: dict[str, int]
    timings: dict[str, Any]

    def fleet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "fleet", "--registry", str(self.registry),
                               *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=FLEET_TIMEOUT)
        if check:
            assert proc.returncode == 0, f"fleet {' '.join(args)}: {proc.stderr[-3000:]}"
        return proc

    def status(self) -> dict[str, str]:
        rows = json.loads(self.fleet("status", "--json").stdout)
        return {r["name"]: r["state"] for r in rows}

    def direct(self, model: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[model]}{path}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key="x", max_retries=0,
                             timeout=FLEET_TIMEOUT)


def write_registry(path: Path, *, ttl: dict[str, float] | None = None) -> dict[str, int]:
    """models.cpu.toml with free ports, an absolute models_dir and a one-core budget."""
    data = tomllib.loads(CPU_REGISTRY.read_text())
    data["host"]["cpus"] = 1
    data["defaults"]["models_dir"] = str((CPU_REGISTRY.parent / "models").resolve())
    ports = {}
    for name, model in data["models"].items():
        ports[name] = model["port"] = free_port()
        model["health_timeout"] = 300
        if ttl and name in ttl:
            model["ttl"] = ttl[name]
    data["models"]["tiny-b"]["autostart"] = False
    path.write_text(json.dumps(data))
    return ports


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def stack(vllm_ready: VllmEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    registry = tmp / "models.json"
    ports = write_registry(registry)
    key, value = vllm_ready.label.split("=", 1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLEET_EXTRA_LABELS": f"{key}={value}",
           "FLEET_NAME_PREFIX": f"vfe-{vllm_ready.run_id}", "FLEET_LOCK_FILE": str(tmp / "lock")}
    port = free_port()
    stack = Stack(registry, env, f"http://127.0.0.1:{port}", ports, {})
    t0 = time.monotonic()
    stack.fleet("up")
    stack.timings["fleet up tiny-a"] = time.monotonic() - t0
    gw = subprocess.Popen([sys.executable, "-m", "gateway", "--registry", str(registry),
                           "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_ok(f"{stack.gateway}/health", 30, gw)
        yield stack
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        stack.fleet("down", check=False)
        print("\ne2e timings:", json.dumps(stack.timings, indent=1))


def test_chat_completions_and_models_through_the_gateway(stack: Stack) -> None:
    client = stack.client()
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=8)
    assert chat.model == "tiny-a" and chat.usage.completion_tokens == 8
    comp = client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
    assert comp.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(model="tiny-a", messages=MSG, max_tokens=6,
                                                 stream=True))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    listed = client.models.list().data
    states = {m.id: m.model_extra["state"] for m in listed if not m.model_extra.get("alias_of")}
    assert states == {"tiny-a": "ready", "tiny-b": "unreachable"}
    aliases = {m.id: m.model_extra["alias_of"] for m in listed if m.model_extra.get("alias_of")}
    assert aliases["gpt-4o-mini"] == "tiny-a" and aliases["tiny-stream"] == "tiny-b"


def test_on_demand_activation_switches_to_the_requested_model(stack: Stack) -> None:
    import concurrent.futures

    client = stack.client()

    def ask(_: int) -> str:
        out = client.chat.completions.create(model="tiny-stream", messages=MSG, max_tokens=4)
        return out.model

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # four requests, one activation
        assert list(pool.map(ask, range(4))) == ["tiny-b"] * 4
    stack.timings["on-demand activation tiny-b (first token)"] = time.monotonic() - t0
    assert stack.status() == {"tiny-a": "stopped", "tiny-b": "healthy"}


def test_stream_relayed_and_disconnect_aborts_in_vllm(stack: Stack) -> None:
    metrics_url = stack.direct("tiny-b", "/metrics")
    before = httpx.get(metrics_url, timeout=10).text
    body = {"model": "tiny-b", "messages": MSG, "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    arrivals = []
    t0 = time.monotonic()
    with httpx.stream("POST", f"{stack.gateway}/v1/chat/completions", json=body,
                      timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - t0)
            if len(arrivals) == 6:
                break  # leaving the block closes the connection: the client went away
    closed = time.monotonic()
    running = None
    while time.monotonic() - closed < 1.0:
        after = httpx.get(metrics_url, timeout=5).text
        running = metric(after, "vllm:num_requests_running")
        if running == 0:
            break
        time.sleep(0.05)
    assert running == 0, "vLLM still runs the abandoned request 1 s after the disconnect"
    generated = metric(after, "vllm:generation_tokens_total") - metric(before,
                                                                       "vllm:generation_tokens_total")
    assert generated < 1500
    assert metric(after, "vllm:request_success_total") == metric(before,
                                                                 "vllm:request_success_total")
    assert arrivals[-1] - arrivals[1] > 0  # chunks arrived spread out, not in one burst
    stack.timings["disconnect: tokens generated before abort"] = generated


def test_sleep_and_wake_through_vllm_sleep_endpoints(stack: Stack) -> None:
    stack.fleet("sleep", "tiny-b")
    assert httpx.get(stack.direct("tiny-b", "/is_sleeping"), timeout=10).json() == {
        "is_sleeping": True}
    assert stack.status()["tiny-b"] == "sleeping"
    stack.fleet("wake", "tiny-b")
    assert httpx.get(stack.direct("tiny-b", "/is_sleeping"), timeout=10).json() == {
        "is_sleeping": False}
    assert stack.status()["tiny-b"] == "healthy"


def test_switch_back_and_forth_with_phase_timings(stack: Stack) -> None:
    for target, other in (("tiny-a", "tiny-b"), ("tiny-b", "tiny-a")):
        proc = stack.fleet("switch", target, "--json")
        report = json.loads(proc.stdout)
        timings = report["timings"]
        assert {"evict", "start", "healthy", "total"} <= set(timings)
        assert "total" in proc.stderr or "healthy" in proc.stderr  # timings shown to people
        stack.timings[f"switch to {target}"] = timings
        states = stack.status()
        assert states[target] == "healthy" and states[other] in ("sleeping", "stopped")
    answer = stack.client().chat.completions.create(model="tiny-b", messages=MSG, max_tokens=3)
    assert answer.usage.completion_tokens == 3


def test_killed_container_is_a_gateway_error_and_fleet_up_restores_it(stack: Stack) -> None:
    rows = json.loads(stack.fleet("status", "--json").stdout)
    container = next(r["container"] for r in rows if r["name"] == "tiny-b")
    client = stack.client()
    stream = client.chat.completions.create(model="tiny-b", messages=MSG, max_tokens=1500,
                                            stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices is not None
    docker_cli("kill", container, timeout=30)
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "broke off" in str(info.value) or "502" in str(info.value)
    assert stack.status()["tiny-b"] in ("stopped", "absent")
    t0 = time.monotonic()
    stack.fleet("up", "tiny-b")
    stack.timings["fleet up tiny-b after kill"] = time.monotonic() - t0
    assert stack.status()["tiny-b"] == "healthy"
    assert client.chat.completions.create(model="tiny-b", messages=MSG, max_tokens=2).choices


def test_mixed_load_on_one_core_every_request_answered(stack: Stack) -> None:
    """The scheduler on real vLLM: clients of both models at once on a one-core budget;
    the models take turns (drained, switched) and every request is answered."""
    import concurrent.futures

    client = stack.client()

    def ask(model: str) -> tuple[str, float]:
        t0 = time.monotonic()
        out = client.chat.completions.create(model=model, messages=MSG, max_tokens=4)
        return out.model, time.monotonic() - t0

    jobs = ["tiny-a", "tiny-b"] * 4
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, jobs))
    assert sorted(m for m, _ in results) == sorted(jobs)
    stack.timings["mixed load, one core, 8 requests"] = {
        "total": round(time.monotonic() - t0, 1),
        **{f"worst {m}": round(max(t for n, t in results if n == m), 1) for m in set(jobs)}}
    status = httpx.get(f"{stack.gateway}/admin/status", timeout=10)
    if status.status_code == 200:  # without an admin key the status is not served
        stack.timings["scheduler"] = status.json().get("scheduler")


def test_idle_ttl_puts_a_model_to_sleep(stack: Stack, tmp_path: Path) -> None:
    registry = tmp_path / "ttl.json"
    data = json.loads(stack.registry.read_text())
    data["models"]["tiny-b"]["ttl"] = 2
    registry.write_text(json.dumps(data))
    port = free_port()
    gw = subprocess.Popen([sys.executable, "-m", "gateway", "--registry", str(registry),
                           "--port", str(port), "--log-level", "warning"], cwd=REPO,
                          env={**stack.env, "GATEWAY_IDLE_CHECK_INTERVAL": "0.5"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_ok(f"http://127.0.0.1:{port}/health", 30, gw)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=FLEET_TIMEOUT)
        assert client.chat.completions.create(model="tiny-b", messages=MSG, max_tokens=2).choices
        t0 = time.monotonic()
        state = None
        while time.monotonic() - t0 < 60:
            state = stack.status()["tiny-b"]
            if state == "sleeping":
                break
            time.sleep(0.5)
        assert state == "sleeping", "tiny-b was not put to sleep after its 2 s idle ttl"
        stack.timings["idle ttl: request end to sleeping"] = time.monotonic() - t0
        # and a request wakes it again
        assert client.chat.completions.create(model="tiny-b", messages=MSG, max_tokens=2).choices
        assert stack.status()["tiny-b"] == "healthy"
    finally:
        gw.terminate()
        gw.wait(timeout=30)
