"""Processes under test: start the simulator, the gateway, nginx and vLLM's Rust router; read
their CPU and RSS.

CPU time and resident memory come from /proc/PID/stat and /proc/PID/status, summed over a
process and its descendants (nginx: master and workers; uvicorn with several workers: the
supervisor and its children). Every process started here is stopped by `Procs.stop_all`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- /proc --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` (utime, stime: fields 14 and 15 of stat)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    """Sum of VmRSS of `pids`."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def pin(pids: list[int], cpus: set[int]) -> None:
    """Bind every thread of `pids` to `cpus`."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def pids(self) -> list[int]:
        return descendants(self.process.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Procs:
    """Starts processes in a temp dir; `stop_all` ends them (SIGTERM, then SIGKILL)."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fleet-bench-")))
    started: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        child_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=child_env, cwd=cwd or REPO,
                                   start_new_session=True)
        proc = Proc(name, process, port, log)
        self.started.append(proc)
        return proc

    def wait_ok(self, proc: Proc, path: str, timeout_s: float = 60.0) -> None:
        url = f"http://127.0.0.1:{proc.port}{path}"
        end = time.monotonic() + timeout_s
        last: object = None
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < end:
                if proc.process.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n"
                                       f"{proc.tail()}")
                try:
                    r = client.get(url)
                    if r.status_code == 200:
                        return
                    last = r.status_code
                except httpx.HTTPError as exc:
                    last = exc
                time.sleep(0.05)  # poll interval; the deadline bounds the wait
        raise RuntimeError(f"{proc.name}: {url} not 200 within {timeout_s} s ({last!r}):\n"
                           f"{proc.tail()}")

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        for proc in reversed(self.started):
            try:
                proc.process.wait(10)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait(10)
        self.started.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the three servers -----------------------------------------------------------------
    def start_sim(self, served: str = "bench", ttft_ms: float = 0, itl_ms: float = 0,
                  python: str = sys.executable) -> Proc:
        port = free_port()
        env = {"VLLM_SIM_TTFT_MS": str(ttft_ms), "VLLM_SIM_ITL_MS": str(itl_ms),
               "VLLM_SIM_LOAD_SECONDS": "0"}
        proc = self.spawn("sim", [python, "-m", "vllm_sim", "--model", f"/models/{served}",
                                  "--served-model-name", served, "--host", "127.0.0.1",
                                  "--port", str(port), "--uvicorn-log-level", "warning"],
                          port, env)
        self.wait_ok(proc, "/health")
        return proc

    def start_gateway(self, upstream_url: str, model: str = "bench",
                      env: dict[str, str] | None = None, name: str = "gateway",
                      source: Path | None = None, registry_path: Path | None = None,
                      wrapper: Sequence[str] = (), ready_s: float = 60.0) -> Proc:
        """`python -m gateway` from this checkout, or from `source` (another tree), with a
        one-model registry pointing at `upstream_url` (or the registry at `registry_path`);
        run under `wrapper` (e.g. valgrind's command line), healthy within `ready_s`."""
        port = free_port()
        registry = registry_path or self.workdir / f"models.{name}.toml"
        if registry_path is None:
            registry.write_text(f'[models.{model}]\nurl = "{upstream_url}"\n'
                                f'served_model_name = "{model}"\n')
        proc = self.spawn(name, [*wrapper, sys.executable, "-m", "gateway", "--registry",
                                 str(registry), "--port", str(port),
                                 "--log-level", "warning"], port,
                          {**({"PYTHONPATH": str(source)} if source else {}), **(env or {})},
                          cwd=source)
        self.wait_ok(proc, "/health", timeout_s=ready_s)
        return proc

    def start_nginx(self, upstream_port: int, workers: str = "auto") -> Proc:
        nginx = ensure_nginx()
        port = free_port()
        prefix = self.workdir / "nginx"
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        template = (HERE / "nginx.conf").read_text()
        conf = (template.replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port))
                .replace("@UPSTREAM_PORT@", str(upstream_port))
                .replace("@WORKERS@", workers))
        if os.geteuid() == 0:  # workers drop to nobody: let them use the temp dirs
            conf = conf.replace("#@USER@", "user nobody nogroup;")
            shutil.chown(prefix / "tmp", "nobody", "nogroup")
        (prefix / "nginx.conf").write_text(conf)
        proc = self.spawn("nginx", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                    "-e", str(prefix / "logs" / "error.log")], port)
        self.wait_ok(proc, "/nginx-health")
        return proc


    def start_router(self, upstream_url: str, binary: str, wrapper: Sequence[str] = (),
                     ready_s: float = 60.0) -> Proc:
        """vLLM's Rust router (`vllm-router`, PyPI) in front of `upstream_url`: one worker,
        round robin (the cheapest policy; the default cache_aware keeps a prefix tree per
        request), its Prometheus listener on a free loopback port, warnings only; run under
        `wrapper`, healthy within `ready_s`."""
        port = free_port()
        proc = self.spawn("router", [*wrapper, binary, "--host", "127.0.0.1", "--port", str(port),
                                     "--worker-urls", upstream_url, "--policy", "round_robin",
                                     "--prometheus-host", "127.0.0.1",
                                     "--prometheus-port", str(free_port()),
                                     "--log-level", "warning"], port)
        self.wait_ok(proc, "/health", timeout_s=ready_s)
        return proc


ROUTER_INSTALL = ("python3 -m venv /tmp/router-venv && "
                  "/tmp/router-venv/bin/pip install vllm-router==0.1.17")


def find_router(explicit: str | None) -> str | None:
    """The `vllm-router` launcher: `explicit`, else $VLLM_ROUTER_BIN, else on PATH."""
    for candidate in (explicit, os.environ.get("VLLM_ROUTER_BIN"), shutil.which("vllm-router")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_nginx() -> str:
    """The nginx binary; installed with apt (nginx-light) when missing and we are root."""
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if found:
        return str(found)
    if os.geteuid() != 0:
        raise RuntimeError("nginx is not installed: run `apt-get install -y nginx-light` as root")
    print("nginx missing: apt-get install -y nginx-light", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"],
                   check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("nginx") or "/usr/sbin/nginx"
