"""The vLLM simulator as a process: flags, load delay, streaming timing, aborts, metrics, sleep."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from support.ports import free_port
from support.sim_fixtures import SimFactory, SimServer

pytestmark = pytest.mark.gateway

TIMEOUT = httpx.Timeout(10.0)


def _chat(model: str = "tiny", max_tokens: int = 3, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": max_tokens, **extra}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text `text`."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def requests_of(server: SimServer) -> list[dict[str, Any]]:
    return httpx.get(server.url("/sim/requests"), timeout=TIMEOUT).json()["requests"]


# -- flags ---------------------------------------------------------------------------------------
def test_unknown_flag_is_a_usage_error() -> None:
    r = subprocess.run([sys.executable, "-m", "vllm_sim", "--model", "m", "--no-such-flag"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert "unrecognized arguments: --no-such-flag" in r.stderr
    assert r.stderr.startswith("usage: vllm serve"), r.stderr[:200]


def test_several_served_names_and_vllm_flag_forms(sim_factory: SimFactory) -> None:
    server = sim_factory(served_names=("alpha", "beta"), model="/models/base",
                         args=("--max_num_seqs=4", "--dtype=float32", "--enforce-eager",
                               "--gpu-memory-utilization", "0.1", "--max-model-len=1k"))
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as c:
        models = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["alpha", "beta"]
        assert {m["root"] for m in models} == {"/models/base"}
        assert {m["max_model_len"] for m in models} == {1000}  # "1k" is 1000, as in vLLM
        assert c.post("/v1/chat/completions", json=_chat("beta")).json()["model"] == "beta"
        no_model = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=no_model).json()["model"] == "alpha"
        err = c.post("/v1/chat/completions", json=_chat("gamma")).json()["error"]
        assert err["message"] == "The model `gamma` does not exist. Valid aliases: alpha, beta."
    assert "Starting vLLM API server 0 on http://127.0.0.1:%d" % server.port in server.logs()


def test_fail_at_start_exits_nonzero_without_listening() -> None:
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "vllm_sim", "--model", "m", "--port", str(port)],
                       capture_output=True, text=True, timeout=30,
                       env={**_env(), "VLLM_SIM_FAIL_AT_START": "1"})
    assert r.returncode == 1, r
    assert "Engine core initialization failed" in r.stderr
    assert "Starting vLLM API server" not in r.stdout


def _env() -> dict[str, str]:
    import os
    return {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}


# -- loading -------------------------------------------------------------------------------------
def test_port_closed_until_loaded(sim_factory: SimFactory) -> None:
    load = 1.5
    started = time.monotonic()
    server = sim_factory(load_seconds=load, wait=False)
    refused = 0
    while True:
        assert server.process.poll() is None, server.logs()
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1.0):
                opened = time.monotonic()
                break
        except ConnectionRefusedError:
            refused += 1
        assert time.monotonic() - started < 15, "never listened"
        time.sleep(0.02)
    assert refused > 0
    assert opened - started >= load, f"listening after {opened - started:.2f} s < {load} s"
    server.wait_healthy(timeout=5)
    assert "Starting vLLM API server" in server.logs()


def test_sigterm_while_loading_exits_at_once(sim_factory: SimFactory) -> None:
    server = sim_factory(load_seconds=60, wait=False)
    poll(lambda: "Starting to load model" in server.logs(), 10.0, "the simulator loads")
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 2.0


# -- streaming -----------------------------------------------------------------------------------
def _timed_events(server: SimServer, body: dict[str, Any]) -> tuple[float, list[tuple[float, str]]]:
    with httpx.Client(timeout=TIMEOUT) as c:
        t0 = time.monotonic()
        with c.stream("POST", server.url("/v1/chat/completions"), json=body) as r:
            assert r.status_code == 200
            events = [(time.monotonic(), line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ")]
    return t0, events


def test_stream_chunks_are_flushed_one_by_one(sim_factory: SimFactory) -> None:
    itl = 1.0
    server = sim_factory(itl_ms=itl * 1000, ttft_ms=0)
    arrivals: list[float] = []
    generated_at_first: list[int] = []
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", server.url("/v1/chat/completions"),
                      json=_chat(max_tokens=2, stream=True)) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 1:  # what has the server generated at this point?
                        generated_at_first += [q["completion_tokens"]
                                               for q in requests_of(server)]
    # The first token reached the client while the second was not generated yet ...
    assert generated_at_first == [1]
    # ... and the second came one inter-token delay later, in its own body part.
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= itl * 0.5, arrivals


def test_ttft_delays_the_first_token(sim_factory: SimFactory) -> None:
    server = sim_factory(ttft_ms=500)
    t0, events = _timed_events(server, _chat(max_tokens=2, stream=True))
    assert events[0][0] - t0 >= 0.45


def test_client_disconnect_aborts_the_stream_within_a_second(sim_factory: SimFactory) -> None:
    server = sim_factory(itl_ms=200)
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", server.url("/v1/chat/completions"),
                      json=_chat(max_tokens=100, stream=True)) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:  # role chunk and two tokens
                    break
        closed = time.monotonic()  # leaving the block closes the connection
    rec = poll(lambda: [q for q in requests_of(server) if q["outcome"] == "aborted"], 1.0,
               "the request is recorded as aborted")[0]
    assert time.monotonic() - closed < 1.0
    assert rec["abort_reason"] == "client_disconnect"
    assert 2 <= rec["completion_tokens"] < 10, rec
    text = httpx.get(server.url("/metrics"), timeout=TIMEOUT).text
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:generation_tokens_total") < 10
    for reason in ("length", "stop", "abort"):  # as in vLLM: not counted as a success
        assert metric(text, "vllm:request_success_total", finished_reason=reason) == 0


def test_client_disconnect_aborts_a_unary_request(sim_factory: SimFactory) -> None:
    server = sim_factory(ttft_ms=5000)
    body = json.dumps(_chat(max_tokens=4)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(body), body))
        poll(lambda: [q for q in requests_of(server) if q["state"] == "running"], 2.0,
             "the request runs")
    closed = time.monotonic()
    poll(lambda: [q for q in requests_of(server) if q["outcome"] == "aborted"], 1.0,
         "the request is recorded as aborted")
    assert time.monotonic() - closed < 1.0


# -- metrics -------------------------------------------------------------------------------------
def test_metrics_count_requests_and_tokens(sim_factory: SimFactory) -> None:
    server = sim_factory(served_names=("first", "second"))
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as c:
        before = c.get("/metrics")
        assert before.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
        assert metric(before.text, "vllm:request_success_total", finished_reason="length") == 0
        a = c.post("/v1/chat/completions", json=_chat("first", max_tokens=3)).json()
        b = c.post("/v1/completions", json={"model": "second", "prompt": "one two three",
                                             "max_tokens": 5}).json()
        stream = c.post("/v1/chat/completions", json=_chat("second", max_tokens=2, stream=True))
        assert stream.text.endswith("data: [DONE]\n\n")
        text = c.get("/metrics").text
    prompt = a["usage"]["prompt_tokens"] + b["usage"]["prompt_tokens"] + a["usage"]["prompt_tokens"]
    assert metric(text, "vllm:generation_tokens_total", model_name="first") == 3 + 5 + 2
    assert metric(text, "vllm:prompt_tokens_total", engine="0", model_name="first") == prompt
    assert metric(text, "vllm:request_success_total", finished_reason="length") == 3
    assert metric(text, "vllm:request_success_total", finished_reason="stop") == 0
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:num_requests_waiting") == 0
    assert "# TYPE vllm:request_success_total counter" in text
    assert 'model_name="second"' not in text  # the label is the first served name, as in vLLM


def test_max_num_seqs_makes_requests_wait(sim_factory: SimFactory) -> None:
    server = sim_factory(itl_ms=100, args=("--max-num-seqs", "1"))
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(httpx.post, server.url("/v1/chat/completions"),
                               json=_chat(max_tokens=5), timeout=TIMEOUT) for _ in range(2)]
        text = poll(lambda: (t := httpx.get(server.url("/metrics")).text) and
                    metric(t, "vllm:num_requests_waiting") == 1 and t, 3.0, "one request waits")
        assert metric(text, "vllm:num_requests_running") == 1
        assert [f.result(10).status_code for f in futures] == [200, 200]
    text = httpx.get(server.url("/metrics")).text
    assert metric(text, "vllm:num_requests_waiting") == 0
    assert metric(text, "vllm:request_success_total", finished_reason="length") == 2


# -- sleep mode ----------------------------------------------------------------------------------
def test_sleep_endpoints_need_sleep_mode_or_dev_mode(sim_factory: SimFactory) -> None:
    plain = sim_factory()
    assert httpx.post(plain.url("/sleep?level=1")).status_code == 404
    assert httpx.get(plain.url("/is_sleeping")).json() == {"detail": "Not Found"}
    dev = sim_factory(env={"VLLM_SERVER_DEV_MODE": "1"})
    assert httpx.get(dev.url("/is_sleeping")).json() == {"is_sleeping": False}


def test_sleep_queues_requests_until_wake_up(sim_factory: SimFactory) -> None:
    server = sim_factory(args=("--enable-sleep-mode",))
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as c:
        r = c.post("/sleep?level=1")
        assert r.json() == {"status": "sleeping", "level": 1}
        assert c.get("/is_sleeping").json() == {"is_sleeping": True}
        assert c.get("/health").status_code == 200  # vLLM stays healthy while asleep
        text = c.get("/metrics").text
        assert metric(text, "vllm:engine_sleep_state", sleep_state="awake") == 0
        assert metric(text, "vllm:engine_sleep_state", sleep_state="weights_offloaded") == 1
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, server.url("/v1/chat/completions"),
                                  json=_chat(max_tokens=2), timeout=TIMEOUT)
            poll(lambda: metric(c.get("/metrics").text, "vllm:num_requests_waiting") == 1, 3.0,
                 "the request waits while the engine sleeps")
            assert not pending.done()
            assert c.post("/wake_up").json() == {"status": "awake", "tags": None}
            answer = pending.result(5)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        assert c.get("/is_sleeping").json() == {"is_sleeping": False}
        assert metric(c.get("/metrics").text, "vllm:engine_sleep_state", sleep_state="awake") == 1


def test_sleep_aborts_requests_in_flight(sim_factory: SimFactory) -> None:
    server = sim_factory(itl_ms=100, args=("--enable-sleep-mode",))
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json=_chat(max_tokens=200, stream=True,
                                 stream_options={"include_usage": True})) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        assert c.post("/sleep?level=2").status_code == 200
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] == "abort"
        assert chunks[-1]["usage"]["completion_tokens"] < 200
        text = c.get("/metrics").text
        assert metric(text, "vllm:request_success_total", finished_reason="abort") == 1
        assert metric(text, "vllm:engine_sleep_state", sleep_state="discard_all") == 1
        assert metric(text, "vllm:num_requests_running") == 0


# -- misc ----------------------------------------------------------------------------------------
def test_api_key_guards_v1_paths(sim_factory: SimFactory) -> None:
    server = sim_factory(args=("--api-key", "s3cret"))
    assert httpx.get(server.url("/v1/models")).status_code == 401
    assert httpx.get(server.url("/v1/models")).json() == {"error": "Unauthorized"}
    ok = httpx.get(server.url("/v1/models"), headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.get(server.url("/health")).status_code == 200


def test_sim_health_override_and_embeddings(sim: SimServer) -> None:
    with httpx.Client(base_url=sim.base_url, timeout=TIMEOUT) as c:
        assert c.post("/sim/health?status=503").status_code == 200
        assert c.get("/health").status_code == 503
        c.post("/sim/health?status=200")
        assert c.get("/health").status_code == 200
        e1 = c.post("/v1/embeddings", json={"model": "tiny", "input": ["a b", "c"]}).json()
        e2 = c.post("/v1/embeddings", json={"model": "tiny", "input": "a b"}).json()
    assert [d["index"] for d in e1["data"]] == [0, 1]
    assert e1["data"][0]["embedding"] == e2["data"][0]["embedding"]  # deterministic
    assert e1["usage"]["prompt_tokens"] == 3


def test_sigterm_stops_quickly_with_a_stream_in_flight(sim_factory: SimFactory) -> None:
    server = sim_factory(itl_ms=1000)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, server.url("/v1/chat/completions"),
                              json=_chat(max_tokens=100, stream=True), timeout=TIMEOUT)
        poll(lambda: [q for q in requests_of(server) if q["state"] == "running"], 3.0,
             "the stream runs")
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 3.0
        assert pending.result(5).text.endswith("data: [DONE]\n\n")


def test_zero_delay_streams_are_fast(sim: SimServer) -> None:
    with httpx.Client(timeout=TIMEOUT) as c:
        c.post(sim.url("/v1/chat/completions"), json=_chat(max_tokens=2))  # warm up
        started = time.monotonic()
        for _ in range(20):
            r = c.post(sim.url("/v1/chat/completions"), json=_chat(max_tokens=32, stream=True))
            assert r.text.count("data: ") == 1 + 32 + 1
        per_stream = (time.monotonic() - started) / 20
    assert per_stream < 0.05, f"{per_stream * 1000:.1f} ms per 32-token stream"
