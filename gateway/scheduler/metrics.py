"""The scheduler's Prometheus metrics, on the gateway's per-app registry.

Per action (O(1)): the queue wait of each admitted request (histogram per model), switches by
reason, drains. At scrape time (a collector reading the core): time resident per model, time
spent switching, queued requests per model and their state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway import tally
from gateway.scheduler.core import SchedulerCore
from gateway.scheduler.events import Action, Admit, Drain, PutToSleep, StartSwitch

WAIT_BUCKETS = (0.005, 0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class SchedulerMetrics:
    """Registers on `registry`; `on_action` is the scheduler runtime's action hook."""

    def __init__(self, registry: CollectorRegistry, core: Callable[[], SchedulerCore],
                 clock: Callable[[], float]) -> None:
        self.wait = tally.Histogram("gateway_queue_wait_seconds",  # per request: lock-free
                                    "Seconds a request waited before it was admitted",
                                    ["model"], buckets=WAIT_BUCKETS, registry=registry)
        self.switches = Counter("gateway_scheduler_switches",
                                "Switches the scheduler started, by kind (free: nothing "
                                "evicted; evict: drained models evicted; ttl: idle sleep)",
                                ["model", "reason"], registry=registry)
        self.drains = Counter("gateway_scheduler_drains",
                              "Models put to draining because a rival waited past its quantum",
                              ["model"], registry=registry)
        self._waits: dict[str, tally.HistogramChild] = {}
        registry.register(_Collector(core, clock))

    def on_action(self, action: Action) -> None:
        if isinstance(action, Admit):
            hist = self._waits.get(action.model)
            if hist is None:
                hist = self._waits[action.model] = self.wait.labels(action.model)
            hist.observe(action.waited)
        elif isinstance(action, StartSwitch):
            self.switches.labels(action.target, "evict" if action.evict else "free").inc()
        elif isinstance(action, PutToSleep):
            self.switches.labels(action.model, "ttl").inc()
        elif isinstance(action, Drain):
            self.drains.labels(action.model).inc()


class _Collector:
    def __init__(self, core: Callable[[], SchedulerCore], clock: Callable[[], float]) -> None:
        self.core, self.clock = core, clock

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        core, now = self.core(), self.clock()
        resident = CounterMetricFamily("gateway_model_resident_seconds",
                                       "Seconds a model held the resource", labels=["model"])
        state = GaugeMetricFamily("gateway_model_state", "1 for the state a model is in",
                                  labels=["model", "state"])
        for name, m in core.models.items():
            held = core.resident_seconds.get(name, 0.0)
            if m.state.holds:
                held += now - m.resident_since
            resident.add_metric([name], held)
            state.add_metric([name, str(m.state)], 1)
        yield resident
        yield state
        yield CounterMetricFamily("gateway_switching_seconds",
                                  "Seconds spent switching models (evict + bring up)",
                                  value=core.switching_seconds)
