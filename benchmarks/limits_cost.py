"""What the gateway's connection limits (gateway/server.py) cost per request.

    python benchmarks/limits_cost.py                 # about 30 s on 2 cores
    python benchmarks/limits_cost.py --requests 40000 --rounds 5

A trivial ASGI app (200, 2 bytes) is served by uvicorn twice in one process per run: with
uvicorn's own httptools protocol and with `GuardedHttpTools`. A raw-socket client in another
process sends keep-alive requests on a few connections, and the server's CPU seconds per
1000 requests are compared (interleaved rounds, median). The difference is what the head
budget, the header deadline and the idle bookkeeping add to one request; it leaves out
everything else the gateway does, so it is measured exactly rather than lost in noise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
           b"authorization: Bearer sk-bench\r\nuser-agent: OpenAI/Python 1.40\r\n"
           b"content-length: 2\r\n\r\n{}")


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def serve(port: int, guarded: bool) -> None:
    import uvicorn

    from gateway.server import ConnectionLimits, protocol_class

    http: Any = protocol_class(ConnectionLimits()) if guarded else "httptools"
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                loop="auto", http=http)


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, requests: int, connections: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    per = requests // connections
    for _ in range(per):
        for s in socks:
            s.sendall(REQUEST)
        for s in socks:
            data = b""
            while not data.endswith(b"{}"):
                data += s.recv(4096)
    for s in socks:
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(port: int) -> None:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on {port} did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    servers = {}
    for name, guarded in (("httptools", False), ("guarded", True)):
        port = free_port()
        proc = multiprocessing.Process(target=serve, args=(port, guarded), daemon=True)
        proc.start()
        wait_up(port)
        servers[name] = (port, proc)
    per_k: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, (port, proc) in servers.items():
                load(port, args.connections * 50, args.connections)  # warm
                before = cpu(proc.pid)  # type: ignore[arg-type]
                load(port, args.requests, args.connections)
                used = cpu(proc.pid) - before  # type: ignore[arg-type]
                per_k[name].append(used / args.requests * 1000)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.join(5)
    plain = statistics.median(per_k["httptools"])
    guarded = statistics.median(per_k["guarded"])
    print(f"server CPU per 1000 requests: httptools {plain * 1000:.0f} ms, guarded "
          f"{guarded * 1000:.0f} ms, difference {(guarded - plain) * 1000:+.1f} ms "
          f"({(guarded - plain) * 1000:+.1f} us per request); rounds {per_k}")
    print(json.dumps({"benchmark": "limits_cost", "requests": args.requests,
                      "cpu_s_per_1000": {"httptools": plain, "guarded": guarded},
                      "added_us_per_request": (guarded - plain) * 1000}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
