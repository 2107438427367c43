"""Helpers for the gateway reliability and fuzz tests: process gauges, simulator state,
raw-socket HTTP, and the rule that tells the gateway's own answers from upstream ones.

    fds, rss = open_fds(pid), rss_kib(pid)           # /proc gauges of a process
    cpu = cpu_seconds(pid)                            # user + system CPU time so far
    wait_for(lambda: running(sim) == 0, 5, "no request running")
    verdict = judge(status, headers, body)            # None if acceptable, else why not
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

# The simulator marks every answer of its app with `vary: Origin` (as vLLM's CORS middleware
# does); the gateway never sets `vary` itself, so the header tells a relayed answer from the
# gateway's own. When the simulator's app fails, its server (uvicorn) answers a bare text 500:
# the gateway's app never answers that (its own failures are JSON), so with the gateway's
# x-request-id on it, it was relayed.
UPSTREAM_MARK = ("vary", "Origin")
SERVER_500 = b"Internal Server Error"
# uvicorn's HTTP parser refuses a malformed request before any application code runs.
SERVER_PARSER_REJECTION = b"Invalid HTTP request received."
ERROR_KEYS = ["message", "type", "param", "code"]


# -- process gauges -------------------------------------------------------------------------
def open_fds(pid: int) -> int:
    """How many file descriptors process `pid` has open (sockets included)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(probe: Callable[[], T], deadline_s: float, what: str,
             ok: Callable[[T], bool] = bool, interval: float = 0.02) -> T:
    """Poll `probe()` until `ok(value)`; fail naming `what` and the last value on timeout."""
    end = time.monotonic() + deadline_s
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() >= end:
            last = repr(value)
            last = last if len(last) <= 600 else last[:600] + "..."
            raise AssertionError(f"{what}: not reached within {deadline_s} s (last: {last})")
        time.sleep(interval)  # poll interval: the deadline bounds the wait


# -- simulator state --------------------------------------------------------------------------
def sim_requests(base_url: str) -> dict[str, Any]:
    """The simulator's `/sim/requests`: running/waiting counts and recent request records."""
    resp = httpx.get(base_url + "/sim/requests", timeout=5)
    resp.raise_for_status()
    return resp.json()


def metric(base_url: str, name: str) -> float:
    """One sample of a Prometheus metric from `/metrics` (the first series of that name)."""
    text = httpx.get(base_url + "/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"metric {name} missing from {base_url}/metrics")
    return float(match.group(1))


def registry_for(**servers: Any) -> str:
    """A registry text with one `url` model per simulator, named by keyword, alias `<name>-alias`."""
    lines: list[str] = []
    for name, sim in servers.items():
        lines += [f"[models.{name}]", f'url = "{sim.base_url}"',
                  f'served_model_name = "{sim.served_names[0]}"', f'aliases = ["{name}-alias"]', ""]
    return "\n".join(lines)


# -- judging answers --------------------------------------------------------------------------
def from_upstream(status: int, headers: Mapping[str, str], body: bytes) -> bool:
    if headers.get(UPSTREAM_MARK[0]) == UPSTREAM_MARK[1]:
        return True
    return (status == 500 and body == SERVER_500 and "x-request-id" in headers
            and headers.get("content-type", "").startswith("text/plain"))


def judge(status: int, headers: Mapping[str, str], body: bytes, head: bool = False,
          own_5xx: bool = False) -> str | None:
    """None if the answer is acceptable for any input, else what is wrong with it.

    Relayed upstream answers may have any status (an upstream 5xx passes through). The
    gateway's own answers (to `head`: a HEAD request, bodies may be empty) never have a 5xx status (the upstream is healthy in these tests),
    are JSON, and errors have vLLM's shape with `code` equal to the status. `own_5xx`: a 5xx
    of the gateway's own is expected (e.g. a limit's 503), judged by its shape only.
    """
    if from_upstream(status, headers, body):
        return None
    if status >= 500 and not own_5xx:
        return f"the gateway itself answered {status}: {body[:300]!r}"
    if head and not body:
        return None  # HEAD: headers only
    if status == 200 and headers.get("content-type", "").startswith("text/plain; version="):
        return None  # GET /metrics: Prometheus' text exposition format, not an error
    if not headers.get("content-type", "").startswith("application/json"):
        return f"gateway answer {status} is not JSON: {headers.get('content-type')!r} {body[:200]!r}"
    try:
        payload = json.loads(body)
    except ValueError:
        return f"gateway answer {status} has a body that does not parse: {body[:200]!r}"
    if status >= 400:
        error = payload.get("error") if isinstance(payload, dict) else None
        if (not isinstance(error, dict) or list(payload) != ["error"]
                or list(error) != ERROR_KEYS or error["code"] != status
                or not isinstance(error["message"], str) or not error["message"]):
            return f"gateway error {status} is not vLLM-shaped: {body[:300]!r}"
    return None


# -- raw sockets --------------------------------------------------------------------------------
def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send `request` bytes as they are (no client-side normalisation) to 127.0.0.1:`port` and
    read one answer (`connection: close` is assumed or the body is content-length framed).
    Returns (status, lower-cased headers, body); the server closing early is tolerated."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (e.g. 413) and close before the whole body is sent
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if _complete(data):
                    break
        except ConnectionResetError:
            pass
    return parse_response(data)


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return match is not None and len(body) >= int(match.group(1))


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete HTTP answer (connection dropped?): {data[:300]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return status, headers, body


def _dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def read_until_closed(sock: socket.socket, deadline_s: float) -> tuple[bytes, float]:
    """Everything `sock` receives until the peer closes it, and how long that took; fails
    if it is still open after `deadline_s` seconds."""
    started = time.monotonic()
    data = b""
    sock.settimeout(0.05)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if time.monotonic() - started > deadline_s:
                raise AssertionError(f"the connection is still open after {deadline_s} s "
                                     f"(received {data[:200]!r})") from None
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def health_seconds(base_url: str) -> float:
    """How long GET /health takes on a fresh connection (it must answer 200)."""
    started = time.monotonic()
    resp = httpx.get(base_url + "/health", timeout=10)
    assert resp.status_code == 200, resp.text
    return time.monotonic() - started


def process_output(process: Any) -> str:
    """Stop a gateway started by `gateway_factory` and return everything it printed."""
    process.terminate()
    out, _ = process.communicate(timeout=20)
    return out.decode(errors="replace") if isinstance(out, bytes) else str(out)


class RawUpstream:
    """A loopback server that reads each request's head and answers `reply` bytes as they
    are (e.g. garbage instead of HTTP), then closes: an upstream that misbehaves.

        with RawUpstream(b"ZZZZ not http\\r\\n\\r\\n") as up:
            registry = f'[models.bad]\\nurl = "{up.base_url}"\\n'
    """

    def __init__(self, reply: bytes) -> None:
        import threading

        self.reply = reply
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(self.reply)
                except OSError:
                    pass
