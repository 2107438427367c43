"""A fleet stand-in whose models are simulator processes on their registry ports.

`SimSwitchFleet(ports, served_names)` behaves like the fleet client the gateway acts through,
for models that cannot all be awake at once (one at a time here): `ensure_awake` stops whatever else
runs (evict) and starts the model's simulator (start), waits for its /health (healthy) and
returns a `fleet.report.Report` with those phase timings; `sleep` stops it; `status` gives one
`ModelStatus` row per model; `logs` returns the simulator's output. Every call blocks, as the
real client's do (the gateway runs them in worker threads). `close()` stops every simulator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from fleet.report import ActionTaken, ModelStatus, Report
from support.sim_fixtures import SimServer, start_sim


class SimSwitchFleet:
    def __init__(self, ports: Mapping[str, int],
                 served_names: Mapping[str, tuple[str, ...]] | None = None, *,
                 load_seconds: float = 1.0, extra_log_lines: tuple[str, ...] = ()) -> None:
        self.ports = dict(ports)
        self.served_names = dict(served_names or {})
        self.load_seconds = load_seconds
        self.extra_log_lines = extra_log_lines
        self.sims: dict[str, SimServer] = {}
        self.started: dict[str, float] = {}
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: object = None) -> Report | None:
        with self.lock:
            self.calls.append(("ensure_awake", model))
            if model in self.sims:
                return None
            t0 = time.perf_counter()
            actions = [ActionTaken(other, "stop", self._stop(other))
                       for other in list(self.sims)]
            t1 = time.perf_counter()
            sim = start_sim(served_names=self.served_names.get(model, (model,)),
                            port=self.ports[model],
                            load_seconds=self.load_seconds, wait=False)
            t2 = time.perf_counter()
            try:
                sim.wait_healthy(timeout=min(timeout or 60.0, 60.0))
            except BaseException:
                sim.stop()
                raise
            t3 = time.perf_counter()
            self.sims[model], self.started[model] = sim, time.monotonic()
            actions.append(ActionTaken(model, "start", t3 - t1))
            return Report("switch", (model,), actions,
                          {"evict": t1 - t0, "start": t2 - t1, "healthy": t3 - t2,
                           "total": t3 - t0}, (model,))

    def sleep(self, model: str) -> Report:
        with self.lock:
            self.calls.append(("sleep", model))
            seconds = self._stop(model) if model in self.sims else 0.0
            return Report("sleep", (model,), [ActionTaken(model, "stop", seconds)])

    def _stop(self, model: str) -> float:
        t0 = time.perf_counter()
        self.sims.pop(model).stop()
        self.started.pop(model, None)
        return time.perf_counter() - t0

    def status(self) -> list[ModelStatus]:
        with self.lock:
            now = time.monotonic()
            return [ModelStatus(name=name, state="healthy" if name in self.sims else "stopped",
                                port=port, gpus=(), fraction=None,
                                uptime=(now - self.started[name]) if name in self.started else None,
                                health="ok" if name in self.sims else "-",
                                container=f"sim-{name}")
                    for name, port in self.ports.items()]

    def logs(self, model: str, *, tail: int = 100, replica: int = 0) -> str:
        sim = self.sims.get(model)
        if sim is None:
            raise RuntimeError(f"model {model!r} has no container (state stopped)")
        lines = [*sim.logs().splitlines(), *self.extra_log_lines]
        return "\n".join(lines[-tail:])

    def close(self) -> None:
        with self.lock:
            for model in list(self.sims):
                self._stop(model)
