"""Requests whose client leaves before the answer starts (over real loopback sockets).

The gateway watches the client for the whole life of a request, not only while a stream is
relayed: a client gone while its request waits for upstream headers (every non-streaming
request, a slow upstream) has its upstream request closed, so the engine aborts the
generation; a client gone while its request is queued leaves the queue at once and is never
dispatched. Both are counted as abandoned (499), never as 500. Before this, a client gone
after 1 s still had its 301-token generation run to the end, and queued requests whose
clients had left were dispatched later and run in full.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from support.reliability import metric, registry_for, sim_requests, wait_for

pytestmark = pytest.mark.gateway


def _send_and_leave(port: int, model: str, max_tokens: int, stream: bool = False) -> socket.socket:
    body = json.dumps({"model": model, "max_tokens": max_tokens, "stream": stream,
                       "messages": [{"role": "user", "content": "Hello"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def _series(base_url: str, name: str, model: str) -> float:
    import httpx
    text = httpx.get(base_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_gone_before_the_headers_aborts_the_generation(sim_factory,
                                                                  gateway_factory) -> None:
    sim = sim_factory(served_names=("slow",), itl_ms=50)  # 301 tokens: about 15 s
    gw = gateway_factory(registry_for(m=sim))
    sock = _send_and_leave(gw.port, "m", 301)
    wait_for(lambda: sim_requests(sim.base_url)["running"], 10, "the generation started",
             ok=lambda n: n == 1)
    time.sleep(1.0)  # the client's patience: it leaves a second into the generation
    left = time.monotonic()
    sock.close()
    records = wait_for(lambda: sim_requests(sim.base_url), 5, "the generation aborted",
                       ok=lambda r: r["running"] == 0 and any(
                           q.get("outcome") == "aborted" for q in r["requests"]))
    took = time.monotonic() - left
    aborted = [q for q in records["requests"] if q.get("outcome") == "aborted"]
    print(f"\nupstream aborted {took * 1000:.0f} ms after the client left; "
          f"{aborted[0].get('completion_tokens')} of 301 tokens generated")
    assert aborted[0].get("abort_reason") == "client_disconnect"
    assert aborted[0].get("completion_tokens", 301) < 301
    wait_for(lambda: _series(gw.base_url, "gateway_abandoned_requests_total", "m"), 5,
             "the request counted as abandoned", ok=lambda v: v == 1)
    assert _series(gw.base_url, "gateway_requests_total", "m") == 1  # as 499, not 500
    assert metric(gw.base_url, "gateway_in_flight_requests") == 0


def test_queued_requests_whose_clients_left_are_never_dispatched(sim_factory,
                                                                   gateway_factory) -> None:
    sim = sim_factory(served_names=("slow",), itl_ms=50)
    registry = registry_for(m=sim) + "max_concurrency = 1\nmax_queue = 4\n"
    gw = gateway_factory(registry)
    holder = _send_and_leave(gw.port, "m", 60)  # holds the only slot for about 3 s
    wait_for(lambda: sim_requests(sim.base_url)["running"], 10, "the first request runs",
             ok=lambda n: n == 1)
    queued = [_send_and_leave(gw.port, "m", 301) for _ in range(4)]
    wait_for(lambda: metric(gw.base_url, "gateway_queued_requests"), 5, "four queued",
             ok=lambda n: n == 4)
    for sock in queued:
        sock.close()
    wait_for(lambda: metric(gw.base_url, "gateway_queued_requests"), 5,
             "the queue emptied as the clients left", ok=lambda n: n == 0)
    # The holder's answer comes in full; nothing of the abandoned four ever reached the model.
    holder.settimeout(30)
    data = b""
    while b'"finish_reason"' not in data:
        chunk = holder.recv(65536)
        assert chunk, "the holder's connection closed before its answer"
        data += chunk
    holder.close()
    records = wait_for(lambda: sim_requests(sim.base_url), 5, "the model idle",
                       ok=lambda r: r["running"] == 0 and r["waiting"] == 0)
    assert len(records["requests"]) == 1, records["requests"]
    wait_for(lambda: _series(gw.base_url, "gateway_abandoned_requests_total", "m"), 5,
             "four abandoned", ok=lambda v: v == 4)
