"""Gateway mode of the replay benchmark: the real gateway app, served by uvicorn in this process
on a loopback port, with a fleet stand-in that starts one simulator process per model it
brings up (VLLM_SIM_LOAD_SECONDS, TTFT and ITL like a real engine) and stops the ones it
evicts, on a one-core budget: two models are never awake together (as
tests/test_scheduler_gateway.py's TimeShareFleet). Requests are streamed chat completions
sent at their trace times (closed-loop clients send again when answered); the wait is the
time to the first body byte. Every process started here is stopped at the end of each run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path

import httpx
import uvicorn

from benchmarks.replay import (
    CONCURRENCY,
    EVICT_S,
    ITL_S,
    LOAD_S,
    QUANTUM_FLOOR,
    SWITCH_SHARE,
    TIMEOUT_S,
    TTFT_S,
    Run,
    Trace,
    make_trace,
    oracle,
    wait_bound,
)
from fleet.errors import ModelsBusy
from fleet.registry import parse_registry
from gateway.app import create_app
from gateway.scheduler.replay import SimModel
from gateway.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[1]
MSG = [{"role": "user", "content": "Hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Sim:
    """One simulator process serving `model` on `port`."""

    def __init__(self, model: str, port: int, load_s: float, ttft_s: float = TTFT_S,
                 itl_s: float = ITL_S) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SIM_")}
        env.update(PYTHONPATH=str(REPO), VLLM_SIM_LOAD_SECONDS=str(load_s),
                   VLLM_SIM_TTFT_MS=str(ttft_s * 1000), VLLM_SIM_ITL_MS=str(itl_s * 1000))
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm_sim", "--model", f"/models/{model}",
             "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port),
             "--uvicorn-log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.log.seek(0)
                    raise RuntimeError(f"simulator exited: {self.log.read().decode()[-2000:]}")
                try:
                    if client.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"simulator on port {self.port} not healthy after {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


def _Busy(models: list[str]) -> ModelsBusy:
    """The fleet's refusal to evict a model with requests (drain-wait retries on it)."""
    return ModelsBusy(f"{', '.join(models)} busy", ())


class _Report:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings


class _Row:
    def __init__(self, model: str, state: str) -> None:
        self.model, self.state = model, state


class TimeShareFleet:
    """One model awake at a time. `ensure_awake` stops the others (refusing, like the old
    fleet, when one is busy and no `evict` list is given) and starts the target's simulator
    (`load_s` to load, then `ttft_s` and `itl_s` per answer); the switches are recorded with
    their times (seconds on `clock`), and any model evicted with requests in flight. Also the
    fleet stand-in of tests/test_scheduler_gateway.py."""

    def __init__(self, ports: dict[str, int], load_s: float, busy: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic, *, ttft_s: float = TTFT_S,
                 itl_s: float = ITL_S) -> None:
        self.ports, self.load_s, self.busy, self.clock = ports, load_s, busy, clock
        self.ttft_s, self.itl_s = ttft_s, itl_s
        self.lock = threading.Lock()
        self.sims: dict[str, _Sim] = {}
        self.switches: list[tuple[float, float, str]] = []
        self.switching: str | None = None
        self.evicted_busy: list[str] = []

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: Collection[str] | None = None) -> object:
        with self.lock:
            if model in self.sims:
                return None
            others = [m for m in self.sims if m != model]
            blocking = [m for m in others if self.busy(m)]
            if evict is None and blocking:
                raise _Busy(blocking)
            started = self.clock()
            self.switching = model
            try:
                t0 = time.monotonic()
                for m in others:
                    if self.busy(m):
                        self.evicted_busy.append(m)
                    self.sims.pop(m).stop()
                evicted = time.monotonic() - t0
                sim = _Sim(model, self.ports[model], self.load_s, self.ttft_s, self.itl_s)
                try:
                    sim.wait_healthy(60.0)
                except BaseException:
                    sim.stop()
                    raise
                self.sims[model] = sim
            finally:
                self.switching = None
            self.switches.append((started, self.clock(), model))
            return _Report({"evict": evicted, "total": time.monotonic() - t0})

    def sleep(self, model: str) -> None:
        with self.lock:
            sim = self.sims.pop(model, None)
            if sim is not None:
                sim.stop()

    def status(self) -> list[object]:
        with self.lock:
            return [_Row(m, "healthy" if m in self.sims else "stopped") for m in self.ports]

    def holders(self) -> list[str]:
        held = list(self.sims)
        return [*held, self.switching] if self.switching else held

    def stop_all(self) -> None:
        for m in list(self.sims):
            self.sleep(m)


def registry_text(ports: dict[str, int]) -> str:
    """Models of one core each on a host with one core for models (one awake at a time)."""
    out = "[host]\ncpus = 2\ngateway_cpus = 1\n"
    for name, port in ports.items():
        out += (f"[models.{name}]\nsource = \"org/{name}\"\nport = {port}\ncpus = 1\n"
                f"max_concurrency = {CONCURRENCY}\nmax_queue = 1000\n"
                f"queue_timeout = {TIMEOUT_S}\n")
    return out


def max_tokens(service: float) -> int:
    return max(1, round((service - TTFT_S) / ITL_S))


async def run_gateway(trace: Trace, policy: str) -> Run:
    """`trace` through the gateway with `policy` (GATEWAY_SCHEDULER): every request's
    outcome, the fleet's switches, and every 0.1 s who held the core and how many requests
    of each model waited for their first byte."""
    names = [m.name for m in trace.models]
    ports = {n: free_port() for n in names}
    holder: list[TimeShareFleet] = []
    clock = time.monotonic
    base = [clock()]

    def rel() -> float:
        return clock() - base[0]

    def opener(busy: Callable[[str], bool], last_used: object) -> TimeShareFleet:
        holder.append(TimeShareFleet(ports, LOAD_S, busy, rel))
        return holder[-1]

    settings = GatewaySettings(scheduler=policy, activation_timeout=TIMEOUT_S,  # type: ignore[arg-type]
                               quantum_floor=QUANTUM_FLOOR, switch_share=SWITCH_SHARE,
                               observe_interval=0.5)
    app = create_app(parse_registry(registry_text(ports)), settings, fleet_opener=opener)
    gw_port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=gw_port,
                                           log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    requests: list[dict[str, object]] = []
    samples: list[tuple[float, list[str], dict[str, int]]] = []
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.02)
        fleet = holder[0]
        runtime = app.state.gateway
        await asyncio.to_thread(fleet.ensure_awake, trace.awake[0], evict=())
        scheduler = runtime.scheduler
        deadline = clock() + 10
        while scheduler is not None and clock() < deadline and \
                str(scheduler.core.models[trace.awake[0]].state) != "awake":
            await asyncio.sleep(0.05)  # the gateway sees A awake (observe_interval)
        fleet.switches.clear()
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw_port}", limits=limits,
                                     timeout=httpx.Timeout(TIMEOUT_S + 120)) as client:
            base[0] = clock()

            async def one(model: str, service: float) -> None:
                sent = rel()
                entry: dict[str, object] = {"model": model, "sent": sent, "status": 0,
                                            "ttfb": None, "end": None}
                requests.append(entry)
                body = {"model": model, "messages": MSG, "max_tokens": max_tokens(service),
                        "stream": True}
                try:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        head = b""
                        async for chunk in r.aiter_raw():
                            if entry["ttfb"] is None:
                                entry["ttfb"] = rel() - sent
                            if len(head) < 300:
                                head += chunk
                        entry["status"] = r.status_code
                        if r.status_code != 200:
                            entry["error"] = head[:300].decode(errors="replace")
                except httpx.HTTPError as exc:
                    entry["status"], entry["error"] = 599, repr(exc)
                entry["end"] = rel()
                if entry["status"] != 200:
                    entry["ttfb"] = None

            async def at(when: float, model: str, service: float) -> None:
                await asyncio.sleep(max(0.0, when - rel()))
                await one(model, service)

            async def closed(model: str, service: float, stop: float) -> None:
                while rel() < stop:
                    await one(model, service)

            async def sample() -> None:
                # waiting = sent and no first byte yet, seen from the clients: the same
                # figure under both policies (drain-wait's requests wait for an activation
                # outside its queue)
                while True:
                    queues = dict.fromkeys(names, 0)
                    for r in requests:
                        if r["status"] == 0 and r["ttfb"] is None:
                            queues[str(r["model"])] += 1
                    samples.append((rel(), sorted(fleet.holders()), queues))
                    await asyncio.sleep(0.1)

            sampler = asyncio.create_task(sample())
            jobs = [at(r.at, r.model, r.service) for r in trace.requests]
            for loop in trace.loops:
                jobs += [closed(loop.model, loop.service, loop.stop)
                         for _ in range(loop.clients)]
            await asyncio.gather(*jobs)
            sampler.cancel()
        switches = list(fleet.switches)
        measured = [e - s for s, e, _ in switches]
        extra: dict[str, object] = {"evicted_busy": list(fleet.evicted_busy),
                                    "switch_s_min": round(min(measured), 3) if measured
                                    else None}
    finally:
        server.should_exit = True
        await serving
        for f in holder:
            await asyncio.to_thread(f.stop_all)
    # The oracle and the bound with this machine's switch cost (the fastest switch seen:
    # process start and load), a lower bound of every switch.
    cost = min(measured) if measured else LOAD_S + EVICT_S
    # The service time as served here (first byte to end, plus the nominal TTFT), the
    # shortest seen: the oracle's requests take that long.
    served = [float(r["end"]) - float(r["sent"]) - float(r["ttfb"]) + TTFT_S  # type: ignore[arg-type]
              for r in requests if r["status"] == 200 and r["ttfb"] is not None]
    fastest = min(served) if served else None
    real = tuple(SimModel(m.name, m.size, load=cost, evict=0.0,
                          max_concurrency=m.max_concurrency) for m in trace.models)
    costed = Trace(trace.name, trace.about, real,
                   tuple(replace(r, service=fastest or r.service) for r in trace.requests),
                   trace.awake, trace.duration,
                   tuple(replace(lp, service=fastest or lp.service) for lp in trace.loops))
    service = max([r.service for r in trace.requests] + [lp.service for lp in trace.loops])
    extra["service_s_min"] = None if fastest is None else round(fastest, 3)
    return Run(trace.name, policy, "gateway", 0, requests, switches, samples,
               oracle=oracle(costed, requests),
               bound=wait_bound(trace.models, service + TTFT_S, switch=cost), extra=extra)


def run_gateway_all(traces: Sequence[str], policies: Sequence[str], duration: float) -> list[Run]:
    """Every trace (seed 0) under every policy, one after the other."""
    # SIGTERM as Ctrl-C: the runs' `finally` stops the simulator processes they started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    runs = []
    for name in traces:
        trace = make_trace(name, 0, duration)
        for policy in policies:
            started = time.monotonic()
            print(f"gateway: {name} / {policy} ...", file=sys.stderr, flush=True)
            runs.append(asyncio.run(run_gateway(trace, policy)))
            print(f"gateway: {name} / {policy} done in {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)
    return runs
