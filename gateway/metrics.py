"""Prometheus metrics of one gateway app, on its own `CollectorRegistry` (no global registry,
so apps in one process, tests and reloads never collide).

Cost on the request path: O(1) per request, never per chunk. A finished model request costs
one counter and one histogram update (label children are cached); the time to first chunk is
one histogram update, called back by the relay once, when the first body chunk of an event
stream has been sent. These per-request series are gateway/tally.py's (no lock, rendered at
scrape time as prometheus_client renders its own); the rare ones are prometheus_client's.
Figures that already live in the gateway (in flight, queued, replica state) are read when
Prometheus scrapes, by a custom collector.

Series (all prefixed `gateway_`):
- `requests_total{model,status}`: model requests by the status the client got (upstream
  statuses pass through; 429, 502, 503, 504 and 403 are the gateway's own);
- `request_duration_seconds{model}`: arrival to the last byte sent (or the client leaving);
- `time_to_first_chunk_seconds{model}`: arrival to the first chunk of a streamed answer
  (queueing and activation included: the time to first token a client sees);
- `rejected_requests_total{status}`: requests refused before a model was known (401, 403 of
  the admin key, 400 malformed, 404 unknown model or path);
- `upstream_errors_total{model,kind}`: failures talking to a replica, by exception kind
  (`ConnectError`, `ReadTimeout`, ..., `broken_stream` for a stream cut mid-way);
- `activations_total{model,outcome}` and `activation_duration_seconds{model}`: on-demand
  activations through the fleet (`ok`, `already_awake`, `busy`, `failed`);
- `evictions_total{model,action}`: models put to sleep or stopped by an activation's switch;
- `sleeps_total{model}`: models put to sleep by the gateway (idle ttl, admin);
- `reloads_total{outcome}`: registry reloads (`ok`, `invalid`);
- at scrape time: `in_flight_requests{model}`, `queued_requests{model}`,
  `replica_outstanding_requests{model,replica}`, `replica_ejected{model,replica}`,
  `model_asleep{model}`, `registry_models`.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from fleet.errors import ModelsBusy
from gateway import tally
from gateway.balancer import Balancer, Instance

if TYPE_CHECKING:
    from gateway.state import LoadFigures

CONTENT_TYPE = CONTENT_TYPE_LATEST
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0)
ACTIVATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class LiveFigures(Protocol):
    """Per-model figures of one routing state (gateway/state.py's RoutingState)."""

    @property
    def admission(self) -> Mapping[str, LoadFigures]: ...

    @property
    def instances(self) -> Mapping[str, Sequence[Instance]]: ...


class LiveSource(Protocol):
    """What the scrape-time collector reads (gateway/runtime.py's Runtime provides it)."""

    @property
    def state(self) -> LiveFigures: ...

    @property
    def balancer(self) -> Balancer: ...

    def asleep(self) -> set[str]: ...


class GatewayMetrics:
    """The metrics of one app; `exposition()` renders them for GET /metrics."""

    def __init__(self, source: LiveSource | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # per request: lock-free series (gateway/tally.py), the same exposition
        self.requests = tally.Counter("gateway_requests", "Model requests by the status answered",
                                      ["model", "status"], registry=r)
        self.duration = tally.Histogram("gateway_request_duration_seconds",
                                        "Model requests: arrival to the last byte sent",
                                        ["model"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = tally.Histogram("gateway_time_to_first_chunk_seconds",
                                    "Streamed model requests: arrival to the first chunk sent",
                                    ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.rejected = Counter("gateway_rejected_requests",
                                "Requests refused before a model was known, by status",
                                ["status"], registry=r)
        self.upstream_errors = Counter("gateway_upstream_errors",
                                       "Failures talking to a model's replica, by kind",
                                       ["model", "kind"], registry=r)
        self.activations = Counter("gateway_activations",
                                   "On-demand activations through the fleet, by outcome",
                                   ["model", "outcome"], registry=r)
        self.activation_seconds = Histogram("gateway_activation_duration_seconds",
                                            "Duration of activations through the fleet",
                                            ["model"], buckets=ACTIVATION_BUCKETS, registry=r)
        self.evictions = Counter("gateway_evictions",
                                 "Models put to sleep or stopped to make room for another",
                                 ["model", "action"], registry=r)
        self.sleeps = Counter("gateway_sleeps", "Models put to sleep by the gateway",
                              ["model"], registry=r)
        self.reloads = Counter("gateway_reloads", "Registry reloads by outcome", ["outcome"],
                               registry=r)
        self.abandoned = Counter("gateway_abandoned_requests",
                                 "Requests whose client left before the answer started (499)",
                                 ["model"], registry=r)
        self._requests: dict[tuple[str, int], tally.CounterChild] = {}
        self._durations: dict[str, tally.HistogramChild] = {}
        self._ttfts: dict[str, tally.HistogramChild] = {}
        if source is not None:
            r.register(_LiveCollector(source))

    # -- per request (O(1)) -------------------------------------------------------------
    def request_done(self, model: str, status: int, seconds: float) -> None:
        key = (model, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(model, str(status))
        child.inc()
        if status == 499:
            self.abandoned.labels(model).inc()
        hist = self._durations.get(model)
        if hist is None:
            hist = self._durations[model] = self.duration.labels(model)
        hist.observe(seconds)

    def first_chunk(self, model: str, seconds: float) -> None:
        hist = self._ttfts.get(model)
        if hist is None:
            hist = self._ttfts[model] = self.ttft.labels(model)
        hist.observe(seconds)

    def rejected_request(self, status: int) -> None:
        self.rejected.labels(str(status)).inc()

    # -- rare events ----------------------------------------------------------------------
    def upstream_error(self, model: str, kind: str) -> None:
        self.upstream_errors.labels(model, kind).inc()

    def activation(self, model: str, outcome: str, seconds: float) -> None:
        self.activations.labels(model, outcome).inc()
        if outcome == "ok":
            self.activation_seconds.labels(model).observe(seconds)

    def eviction(self, model: str, action: str) -> None:
        self.evictions.labels(model, action).inc()

    def slept(self, model: str) -> None:
        self.sleeps.labels(model).inc()

    def reloaded(self, outcome: str) -> None:
        self.reloads.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Gauges read from the gateway's own bookkeeping when Prometheus scrapes."""

    def __init__(self, source: LiveSource) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # the series are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        src = self.source
        state = src.state
        in_flight = GaugeMetricFamily("gateway_in_flight_requests",
                                      "Model requests admitted and not yet finished",
                                      labels=["model"])
        queued = GaugeMetricFamily("gateway_queued_requests",
                                   "Model requests waiting for a slot (max_concurrency)",
                                   labels=["model"])
        for model, adm in state.admission.items():
            in_flight.add_metric([model], adm.in_flight)
            queued.add_metric([model], adm.waiting)
        outstanding = GaugeMetricFamily("gateway_replica_outstanding_requests",
                                        "Requests a replica is serving",
                                        labels=["model", "replica"])
        ejected = GaugeMetricFamily("gateway_replica_ejected",
                                    "1 while a replica is taken out after failures",
                                    labels=["model", "replica"])
        for model, replicas in state.instances.items():
            for inst in replicas:
                labels = [model, str(inst.index)]
                outstanding.add_metric(labels, inst.outstanding)
                ejected.add_metric(labels, 0 if src.balancer.available(inst) else 1)
        asleep = GaugeMetricFamily("gateway_model_asleep",
                                   "1 for a model the gateway put to sleep (idle ttl, admin)",
                                   labels=["model"])
        sleeping = src.asleep()
        for model in state.admission:
            asleep.add_metric([model], 1 if model in sleeping else 0)
        yield from (in_flight, queued, outstanding, ejected, asleep)
        yield GaugeMetricFamily("gateway_registry_models", "Models in the routing table",
                                value=len(state.admission))


class MeteredFleet:
    """Wraps the fleet client the activator uses: times activations, counts evictions and
    sleeps. Everything else is passed through unchanged."""

    def __init__(self, fleet: Any, metrics: GatewayMetrics) -> None:
        self.fleet = fleet
        self.metrics = metrics

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: Collection[str] | None = None) -> object:
        started = time.perf_counter()
        try:
            if evict is None:
                report = self.fleet.ensure_awake(model, timeout=timeout)
            else:  # the scheduler drained exactly these
                report = self.fleet.ensure_awake(model, timeout=timeout, evict=evict)
        except Exception as exc:
            busy = isinstance(exc, ModelsBusy)
            self.metrics.activation(model, "busy" if busy else "failed",
                                    time.perf_counter() - started)
            raise
        self.metrics.activation(model, "already_awake" if report is None else "ok",
                                time.perf_counter() - started)
        for action in getattr(report, "actions", ()) or ():
            if action.model != model and action.action in ("sleep", "stop"):
                self.metrics.eviction(action.model, action.action)
        return report

    def sleep(self, model: str) -> object:
        report = self.fleet.sleep(model)
        self.metrics.slept(model)
        return report

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fleet, name)
