"""Gateway reliability over real loopback sockets: `python -m gateway` in front of simulators.

- an upstream killed mid-stream: the client's stream ends at once with an error the official
  `openai` client raises, and the other models keep being served;
- 200 streaming clients disconnecting mid-stream, three rounds: every upstream request is
  aborted, and the gateway's file descriptors and RSS come back to their baseline;
- a client that stops reading a long stream: fast clients are served at normal speed, flow
  control reaches the upstream (its generation stalls) so the gateway does not buffer, and
  the stalled stream's upstream is aborted when that client goes away;
- limits on the way in: an oversized request head (one 32 MB header, or a huge request
  line) is 431 at once and costs next to no CPU, is never forwarded, and /health stays fast;
  too many header fields is 431; connections that send nothing or half a head are closed
  after the header timeout; beyond the connection cap the oldest idle connection makes room,
  and when none is idle a new one gets 503 with Retry-After;
- errors that say what the caller needs: an upstream that answers garbage or refuses gives
  an error naming the model and the request id, without the upstream's address or bytes
  (those are in the gateway's log under that id); a model's own read_timeout is the one the
  504 states; a client that leaves mid-upload is neither an ERROR nor a 500.

Every wait is a poll with a deadline; the gauges measured are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import statistics
import time
from collections import Counter
from typing import Any

import httpx
import openai
import pytest

from support.ports import free_port
from support.reliability import (
    RawUpstream, cpu_seconds, health_seconds, judge, metric, open_fds, parse_response,
    process_output, raw_exchange, read_until_closed, registry_for, rss_kib, sim_requests,
    wait_for,
)

pytestmark = pytest.mark.gateway

MSG = [{"role": "user", "content": "Hello there"}]


# -- upstream killed mid-stream -------------------------------------------------------------------
def test_upstream_killed_mid_stream_ends_the_stream_with_an_openai_error(
        sim_factory, gateway_factory) -> None:
    doomed = sim_factory(served_names=("doomed",), itl_ms=50)
    other = sim_factory(served_names=("other",))
    gw = gateway_factory(registry_for(d=doomed, o=other))
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="x", max_retries=0, timeout=10)

    stream = client.chat.completions.create(model="d", messages=MSG, max_tokens=1000, stream=True)
    received = 0
    killed_at = 0.0
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            received += 1
            if received == 3:  # mid-stream: the role chunk and two tokens arrived
                doomed.process.kill()
                doomed.process.wait(timeout=5)
                killed_at = time.monotonic()
    ended_after = time.monotonic() - killed_at
    print(f"\nstream ended {ended_after * 1000:.0f} ms after SIGKILL, {received} chunks received")
    assert killed_at, "the stream ended before the upstream was killed"
    assert ended_after < 1.0
    # The gateway's error event, not a dropped connection (that would be an httpx error).
    assert type(info.value) is openai.APIError, repr(info.value)
    assert info.value.body["code"] == 502 and "`d`" in info.value.message, info.value.body
    assert received < 1000

    # The gateway keeps serving the other model, streamed and not, and says the dead one is.
    assert client.chat.completions.create(model="o", messages=MSG, max_tokens=3).choices
    chunks = list(client.chat.completions.create(model="o", messages=MSG, max_tokens=3,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with pytest.raises(openai.APIStatusError) as dead:
        client.chat.completions.create(model="d", messages=MSG, max_tokens=3)
    assert dead.value.status_code == 502


# -- many clients disconnecting mid-stream ----------------------------------------------------------
CLIENTS = 200
ROUNDS = 3
FD_TOLERANCE = 2          # idle keep-alive connections to the upstream may come and go
RSS_TOLERANCE_KIB = 8 * 1024  # after a warm-up round at full size (allocator high-water)


def _stream_request(model: str, max_tokens: int) -> bytes:
    body = (b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":%d,'
            b'"stream":true}' % (model.encode(), max_tokens))
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


async def _open_streams(port: int, count: int, request: bytes) -> list[asyncio.StreamWriter]:
    """`count` concurrent streams, each returned once its first event arrived."""

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        seen = b""
        while b"\ndata: {" not in seen:
            chunk = await reader.read(65536)
            if not chunk:
                raise AssertionError(f"stream closed before its first event: {seen[:300]!r}")
            seen += chunk
        assert seen.startswith(b"HTTP/1.1 200 "), seen[:300]
        return writer

    return list(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 20))


async def _disconnect(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


def _round(port: int, sim: Any, count: int, max_tokens: int) -> float:
    """Open `count` streams, drop them all mid-stream, wait for every upstream abort."""
    started = time.time()
    with asyncio.Runner() as runner:  # one loop owns the sockets from open to close
        writers = runner.run(_open_streams(port, count, _stream_request("s", max_tokens)))
        assert sim_requests(sim.base_url)["running"] == count  # all of them mid-stream
        runner.run(_disconnect(writers))
    closed = time.monotonic()

    def this_round() -> list[dict[str, Any]]:
        return [r for r in sim_requests(sim.base_url)["requests"] if r["arrival"] >= started]

    def outcomes() -> dict[str | None, int]:
        return dict(Counter(r["outcome"] for r in this_round()))

    wait_for(outcomes, 5, f"all {count} upstream requests finished (outcome: count)",
             ok=lambda c: sum(c.values()) == count and None not in c)
    records = this_round()
    abort_s = time.monotonic() - closed
    not_aborted = [r for r in records if r["outcome"] != "aborted"
                   or r["abort_reason"] != "client_disconnect"]
    assert not not_aborted, not_aborted[:3]
    assert max(r["completion_tokens"] for r in records) < max_tokens
    assert sim_requests(sim.base_url)["running"] == 0
    assert metric(sim.base_url, "vllm:num_requests_running") == 0
    return abort_s


def test_200_clients_disconnecting_mid_stream_abort_all_upstreams_and_leak_nothing(
        sim_factory, gateway_factory) -> None:
    max_tokens = 1000  # 300 s of generation each at 300 ms per token: only an abort ends them
    sim = sim_factory(served_names=("s",), itl_ms=300, max_model_len=4096)
    gw = gateway_factory(registry_for(s=sim))
    pid = gw.process.pid

    _round(gw.port, sim, CLIENTS, max_tokens)  # warm-up: imports, pools, allocator arenas
    base_fds, base_rss = open_fds(pid), rss_kib(pid)
    print(f"\nbaseline: {base_fds} fds, RSS {base_rss / 1024:.1f} MiB")
    for n in range(1, ROUNDS + 1):
        t0 = time.monotonic()
        abort_s = _round(gw.port, sim, CLIENTS, max_tokens)
        fds = wait_for(lambda: open_fds(pid), 5, "gateway fds back to baseline",
                       ok=lambda v: abs(v - base_fds) <= FD_TOLERANCE)
        rss = rss_kib(pid)
        took = time.monotonic() - t0
        print(f"round {n}: {CLIENTS} streams opened and dropped, all upstreams aborted "
              f"{abort_s * 1000:.0f} ms after the drop; {fds} fds ({fds - base_fds:+d}), "
              f"RSS {rss / 1024:.1f} MiB ({(rss - base_rss) / 1024:+.1f}); round {took:.1f} s")
        assert rss - base_rss <= RSS_TOLERANCE_KIB, (rss, base_rss)
        assert took < 10, f"round {n} took {took:.1f} s"
    assert gw.process.poll() is None


# -- a client that stops reading ----------------------------------------------------------------
TOKEN_BYTES = 64 * 1024  # each token chunk is about 64 KiB: buffers fill within a second
RSS_GROWTH_LIMIT_KIB = 6 * 1024


def _fast_request_seconds(base_url: str, count: int) -> list[float]:
    took = []
    body = {"model": "s", "messages": MSG, "max_tokens": 8, "stream": True}
    with httpx.Client(timeout=10) as client:
        for _ in range(count):
            t0 = time.monotonic()
            with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                data = b"".join(resp.iter_raw())
            assert data.endswith(b"data: [DONE]\n\n")
            took.append(time.monotonic() - t0)
    return took


def test_slow_reader_does_not_block_others_nor_grow_gateway_memory(
        sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("s",), itl_ms=1, max_model_len=1_000_000,
                      env={"VLLM_SIM_OUTPUT_TOKEN": "x" * TOKEN_BYTES})
    gw = gateway_factory(registry_for(s=sim))
    pid = gw.process.pid
    before = _fast_request_seconds(gw.base_url, 10)
    base_rss = rss_kib(pid)

    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    try:
        slow.connect(("127.0.0.1", gw.port))
        slow.sendall(_stream_request("s", 900_000))  # about 57 GiB if nothing held it back
        record = wait_for(lambda: [r for r in sim_requests(sim.base_url)["requests"]
                                   if r["max_tokens"] == 900_000], 5, "slow stream admitted")[0]
        rid = record["id"]

        def tokens() -> tuple[str, int]:
            rec = next(r for r in sim_requests(sim.base_url)["requests"] if r["id"] == rid)
            return rec["state"], rec["completion_tokens"]

        # Flow control reaches the upstream: its generation stops while the request runs.
        samples: list[tuple[str, int]] = [tokens()]

        def stalled() -> bool:
            time.sleep(0.3)  # sampling period of the generation rate
            samples.append(tokens())
            return samples[-1][0] == "running" and samples[-1][1] == samples[-2][1] > 0

        wait_for(stalled, 15, "upstream generation stalled", interval=0)
        growth = [rss_kib(pid) - base_rss]
        during = _fast_request_seconds(gw.base_url, 10)
        growth.append(rss_kib(pid) - base_rss)
        state, stalled_at = tokens()
        growth.append(rss_kib(pid) - base_rss)
        print(f"\nslow stream stalled at {stalled_at} tokens (~{stalled_at * TOKEN_BYTES >> 20} MiB"
              f" in kernel buffers) and stays there ({state}); gateway RSS growth "
              f"{max(growth) / 1024:+.1f} MiB; fast streams median "
              f"{statistics.median(before) * 1000:.0f} ms before, "
              f"{statistics.median(during) * 1000:.0f} ms while it stalls")
        assert state == "running" and stalled_at == samples[-1][1], (state, stalled_at, samples)
        assert stalled_at < 900_000
        assert max(growth) <= RSS_GROWTH_LIMIT_KIB, growth
        assert max(during) < 2.0, during
        assert statistics.median(during) <= 3 * statistics.median(before) + 0.05, (before, during)
    finally:
        slow.close()
    closed = time.monotonic()
    wait_for(tokens, 2, "slow stream's upstream aborted",
             ok=lambda s: s[0] == "finished")
    rec = next(r for r in sim_requests(sim.base_url)["requests"] if r["id"] == rid)
    print(f"upstream aborted {(time.monotonic() - closed) * 1000:.0f} ms after the slow client left")
    assert rec["outcome"] == "aborted" and rec["abort_reason"] == "client_disconnect", rec
    assert sim_requests(sim.base_url)["running"] == 0


# -- limits on the way in ---------------------------------------------------------------------------
HEAD_FLOOD = 32 * 1024 * 1024  # before the limit: seconds of CPU, and forwarded upstream


def _chat(model: str, extra_head: bytes = b"") -> bytes:
    body = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":2}' % (
        model.encode())
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n" % len(body)) + extra_head + b"\r\n" + body


def _send_head_flood(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` (a head of many MB) and read the answer the gateway makes meanwhile."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # refused part-way: the answer is already in the socket
        data, _ = read_until_closed(sock, 20)
    return parse_response(data)


def test_oversized_heads_are_431_cheaply_never_forwarded_and_health_stays_fast(
        sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("s",))
    gw = gateway_factory(registry_for(s=sim))
    pid = gw.process.pid
    before = len(sim_requests(sim.base_url)["requests"])
    cases = {
        "one 32 MB header on a chat request": _chat("s", b"x-big: " + b"h" * HEAD_FLOOD
                                                    + b"\r\n"),
        "a 32 MB header without a key": b"GET /v1/models HTTP/1.1\r\nhost: gw\r\nx-big: "
                                        + b"h" * HEAD_FLOOD + b"\r\n\r\n",
        "a 1 MB request line": b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nhost: gw\r\n\r\n",
        "70 KB in 1000 headers": _chat("s", b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 64)
                                                    for i in range(1000))),
    }
    for what, request in cases.items():
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        status, headers, body = _send_head_flood(gw.port, request)
        took, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        health = health_seconds(gw.base_url)
        print(f"\n{what}: {status} in {took * 1000:.0f} ms, gateway CPU {cpu * 1000:.0f} ms, "
              f"/health then {health * 1000:.0f} ms")
        assert status == 431, (what, status, body[:300])
        assert judge(status, headers, body) is None, body
        assert b"GATEWAY_MAX_HEADER_BYTES" in body
        assert cpu < 0.5, f"{what}: {cpu:.2f} CPU s"
        assert health < 1.0
    assert len(sim_requests(sim.base_url)["requests"]) == before, "a flooded head was forwarded"
    # A head at the limit's edge is still served.
    ok = raw_exchange(gw.port, _chat("s", b"connection: close\r\nx-pad: " + b"p" * 60_000
                                     + b"\r\n"))
    assert ok[0] == 200, ok


def test_too_many_header_fields_is_431(sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("s",))
    gw = gateway_factory(registry_for(s=sim), extra_env={"GATEWAY_MAX_HEADER_COUNT": "20"})
    fields = b"".join(b"x-h%d: v\r\n" % i for i in range(30))
    status, headers, body = raw_exchange(gw.port, _chat("s", fields))
    assert status == 431 and judge(status, headers, body) is None, body
    assert b"33 header fields" in body and b"GATEWAY_MAX_HEADER_COUNT" in body  # 30 + 3
    fields = b"".join(b"x-h%d: v\r\n" % i for i in range(10))
    assert raw_exchange(gw.port, _chat("s", b"connection: close\r\n" + fields))[0] == 200


def test_silent_and_half_head_connections_are_closed_after_the_header_timeout(
        gateway_factory) -> None:
    gw = gateway_factory('[models.a]\nurl = "http://127.0.0.1:9"\n',
                         extra_env={"GATEWAY_HEADER_TIMEOUT": "1"})
    pid = gw.process.pid
    base_fds = open_fds(pid)
    silent = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(20)]
    half = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(20)]
    for sock in half:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-slow: ")
    try:
        for sock in half:
            data, _ = read_until_closed(sock, 5)  # 1 s, generous for a loaded machine
            status, headers, body = parse_response(data)
            assert status == 408 and judge(status, headers, body) is None, data[:300]
            assert b"GATEWAY_HEADER_TIMEOUT" in body
        for sock in silent:
            data, _ = read_until_closed(sock, 5)
            assert data == b"", data[:300]  # nothing was asked: closed without a word
        wait_for(lambda: open_fds(pid), 5, "gateway fds back to baseline",
                 ok=lambda n: n <= base_fds + FD_TOLERANCE)
        assert health_seconds(gw.base_url) < 1.0
    finally:
        for sock in silent + half:
            sock.close()


def test_a_body_that_does_not_arrive_is_408_after_the_body_timeout(
        sim_factory, gateway_factory) -> None:
    """A client that declares a body and sends part of it (or none) held its connection and
    its request forever, out of reach of the connection cap (it is not idle). Now it gets
    408 once GATEWAY_BODY_TIMEOUT has passed since its headers; a slow body that completes
    in time is still served."""
    sim = sim_factory(served_names=("s",))
    gw = gateway_factory(registry_for(s=sim), extra_env={"GATEWAY_BODY_TIMEOUT": "1"})
    pid = gw.process.pid
    base_fds = open_fds(pid)
    slow = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(10)]
    for i, sock in enumerate(slow):
        part = b"" if i % 2 else b'{"model": "s", '
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: "
                     b"application/json\r\ncontent-length: 200\r\n\r\n" + part)
    try:
        started = time.monotonic()
        for sock in slow:
            data, _ = read_until_closed(sock, 10)  # 1 s, generous for a loaded machine
            status, headers, body = parse_response(data)
            assert status == 408 and judge(status, headers, body) is None, data[:300]
            assert b"GATEWAY_BODY_TIMEOUT" in body
        assert time.monotonic() - started < 8.0
        wait_for(lambda: open_fds(pid), 5, "gateway fds back to baseline",
                 ok=lambda n: n <= base_fds + FD_TOLERANCE)
        assert health_seconds(gw.base_url) < 1.0
    finally:
        for sock in slow:
            sock.close()
    # a body in two parts, the second 0.3 s later: within the limit, served
    request = _chat("s", b"connection: close\r\n")
    head_end = request.index(b"\r\n\r\n") + 4 + 10
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(request[:head_end])
        time.sleep(0.3)  # the client's pace, not synchronisation
        sock.sendall(request[head_end:])
        data, _ = read_until_closed(sock, 10)
    assert parse_response(data)[0] == 200, data[:300]


def test_connection_cap_closes_idle_connections_first_then_answers_503(
        gateway_factory) -> None:
    cap = 40
    gw = gateway_factory('[models.a]\nurl = "http://127.0.0.1:9"\n',
                         extra_env={"GATEWAY_MAX_CLIENT_CONNECTIONS": str(cap)})
    pid = gw.process.pid
    base_fds = open_fds(pid)
    idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(3 * cap)]
    try:
        # Each new connection beyond the cap closes the oldest idle one: /health is served.
        assert health_seconds(gw.base_url) < 1.0
        assert open_fds(pid) <= base_fds + cap + FD_TOLERANCE
        closed = sum(1 for sock in idle[:2 * cap] if _closed(sock))
        assert closed >= 2 * cap - FD_TOLERANCE, closed
    finally:
        for sock in idle:
            sock.close()
    # Requests in progress (here: bodies still to come) are never closed to make room.
    busy = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(cap)]
    try:
        for sock in busy:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
                         b"content-length: 100\r\n\r\n{")
        wait_for(lambda: open_fds(pid), 5, "the gateway holds the busy connections",
                 ok=lambda n: n >= base_fds + cap - FD_TOLERANCE)
        status, headers, body = raw_exchange(
            gw.port, b"GET /health HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
        assert status == 503 and headers.get("retry-after") == "5", (status, body)
        assert judge(status, headers, body, own_5xx=True) is None, body
        assert b"GATEWAY_MAX_CLIENT_CONNECTIONS" in body
        assert not any(_closed(sock) for sock in busy)
    finally:
        for sock in busy:
            sock.close()
    wait_for(lambda: _health_status(gw.base_url), 5, "served again once they left",
             ok=lambda s: s == 200)


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _health_status(base_url: str) -> int:
    try:
        return httpx.get(base_url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


# -- errors that say what the caller needs and no more ---------------------------------------------
def test_upstream_failures_name_the_model_and_request_id_but_no_address_or_upstream_bytes(
        gateway_factory) -> None:
    garbage = b"ZZZZ this is no HTTP \x00\xff secret-internal-detail\r\n\r\n"
    with RawUpstream(garbage) as bad:
        closed_port = free_port()
        gw = gateway_factory(f'[models.bad]\nurl = "{bad.base_url}"\n'
                             f'[models.gone]\nurl = "http://127.0.0.1:{closed_port}"\n')
        client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="x", max_retries=0,
                               timeout=10)
        seen = {}
        for model in ("bad", "gone"):
            rid = f"rid-{model}-1"
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model=model, messages=MSG, max_tokens=2,
                                               extra_headers={"x-request-id": rid})
            message = info.value.body["message"]
            seen[model] = message
            assert info.value.status_code == 502, message
            assert f"`{model}`" in message and rid in message, message
            for leak in ("127.0.0.1", str(bad.port), str(closed_port), "ZZZZ", "secret",
                         "aiohttp", "Error:", "Errno"):
                assert leak not in message, (leak, message)
        out = process_output(gw.process)
    # The details are in the gateway's log, under the request id.
    assert re.search(rf"request rid-bad-1: model bad at {bad.base_url}: .*", out), out
    assert re.search(rf"request rid-gone-1: model gone at http://127.0.0.1:{closed_port}", out)
    print(f"\ncaller sees: {seen['bad']!r}")


def test_a_models_own_read_timeout_is_the_one_the_504_states(sim_factory,
                                                              gateway_factory) -> None:
    sim = sim_factory(served_names=("s",), ttft_ms=8000)
    gw = gateway_factory(registry_for(s=sim) + "read_timeout = 1\n")
    t0 = time.monotonic()
    resp = httpx.post(f"{gw.base_url}/v1/chat/completions", timeout=20,
                      json={"model": "s", "messages": MSG, "max_tokens": 2})
    took = time.monotonic() - t0
    message = resp.json()["error"]["message"]
    assert resp.status_code == 504 and "within 1 s" in message, message
    assert "600" not in message and "`read_timeout` of `s`" in message, message
    assert took < 6, took  # the model would have answered after 8 s


def test_a_client_leaving_mid_upload_is_not_an_error_nor_a_500(sim_factory,
                                                               gateway_factory) -> None:
    sim = sim_factory(served_names=("s",))
    gw = gateway_factory(registry_for(s=sim))
    for _ in range(20):  # enough tracebacks to show, few enough not to fill the pipe
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
                         b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
                         b'{"model":"s","messages":[')
            # Closed here: the gateway reads what was sent, then sees the client gone.
    wait_for(lambda: _rejected(gw.base_url).get("499", 0), 5, "20 aborts counted as 499",
             ok=lambda n: n == 20)
    counts = _rejected(gw.base_url)
    assert "500" not in counts, counts
    assert httpx.get(f"{gw.base_url}/health", timeout=5).status_code == 200
    out = process_output(gw.process)
    assert "Traceback" not in out and "ERROR" not in out, out[-3000:]


def _rejected(base_url: str) -> dict[str, int]:
    text = httpx.get(base_url + "/metrics", timeout=5).text
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(
        r'^gateway_rejected_requests_total\{status="(\d+)"\} (\S+)$', text, re.MULTILINE)}


def test_request_bytes_buffered_at_once_are_capped_with_503_and_retry_after(
        sim_factory, gateway_factory) -> None:
    sim = sim_factory(served_names=("s",))
    gw = gateway_factory(registry_for(s=sim), extra_env={
        "GATEWAY_MAX_BUFFERED_BYTES": str(3 << 20), "GATEWAY_MAX_BODY_BYTES": str(2 << 20)})
    pid = gw.process.pid
    size = 1500 * 1024
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json"
            b"\r\ncontent-length: %d\r\n\r\n" % size)
    prefix = b'{"model":"s","max_tokens":1,"messages":[{"role":"user","content":"'
    body = prefix + b"x" * (size - len(prefix) - 4) + b'"}]}'
    holders = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(2)]
    try:
        for sock in holders:  # two uploads of 1.5 MB, each missing its last byte
            sock.sendall(head + body[:-1])
        base_rss = rss_kib(pid)
        wait_for(lambda: raw_exchange(gw.port, head.replace(b"host: gw", b"host: gw\r\n"
                                                            b"connection: close") + body)[0],
                 10, "a third upload refused while two are held", ok=lambda s: s == 503)
        status, headers, answer = raw_exchange(
            gw.port, head.replace(b"host: gw", b"host: gw\r\nconnection: close") + body)
        assert status == 503 and headers.get("retry-after") == "5", answer
        assert judge(status, headers, answer, own_5xx=True) is None
        assert b"GATEWAY_MAX_BUFFERED_BYTES" in answer
        assert rss_kib(pid) - base_rss < 16 * 1024
        for sock in holders:  # the held uploads complete and are served
            sock.sendall(body[-1:])
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 "), data[:300]
    finally:
        for sock in holders:
            sock.close()
    status, _, answer = raw_exchange(
        gw.port, head.replace(b"host: gw", b"host: gw\r\nconnection: close") + body)
    assert status == 200, answer[:300]
