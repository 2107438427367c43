"""Per-request series without locks: a counter and a histogram whose children are plain
numbers, rendered when Prometheus scrapes, sample for sample as prometheus_client renders its
own `Counter` and `Histogram`.

prometheus_client guards every value with a lock (its metrics may be updated from any
thread): a histogram observation is a loop over the buckets and two locked increments. The
gateway updates its per-request series from its event loop only, four times per request
(requests by status, duration, time to first chunk, queue wait): with prometheus_client's
classes that was about 5 % of the gateway's instructions per proxied request. Here an
observation is one `bisect` and two additions; the cumulative buckets, `_count`, `_sum` and
`_created` are built at scrape time. Not thread-safe: update from the loop's thread only.
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

# As prometheus_client reads it (PROMETHEUS_DISABLE_CREATED_SERIES=true: no `_created`).
_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true", "1", "t")


class CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # prometheus_client's rule: the first bucket whose bound is >= amount
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


C = TypeVar("C", CounterChild, HistogramChild)


class _Family(Generic[C]):
    """Children by label values; the exposition of each child by `_samples`."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}

    def labels(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            self._labels(values)
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, self.kind)]

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        for values, child in self._children.items():
            labels = self._labels(values)
            self._samples(metric, labels, child)
            if _CREATED:
                metric.add_sample(self.name + "_created", labels, child.created)
        yield metric

    def _new_child(self) -> C:
        raise NotImplementedError

    def _samples(self, metric: Metric, labels: dict[str, str], child: C) -> None:
        raise NotImplementedError

    def _labels(self, values: tuple[str, ...]) -> dict[str, str]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected "
                             f"({', '.join(self.labelnames)}), got {len(values)}")
        return dict(zip(self.labelnames, values, strict=True))


class Counter(_Family[CounterChild]):
    """`prometheus_client.Counter` with labels, on the loop's thread only."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames)
        registry.register(self)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _samples(self, metric: Metric, labels: dict[str, str], child: CounterChild) -> None:
        metric.add_sample(self.name + "_total", labels, child.value)


class Histogram(_Family[HistogramChild]):
    """`prometheus_client.Histogram` with labels, on the loop's thread only."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(bounds) or any(math.isinf(b) for b in bounds):
            raise ValueError(f"{self.name}: bucket bounds must be finite and ascending")
        self.bounds = bounds
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        registry.register(self)  # last: a refused histogram is not left in the registry

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _samples(self, metric: Metric, labels: dict[str, str], child: HistogramChild) -> None:
        total = 0
        for le, count in zip(self._le, child.counts, strict=True):
            total += count
            metric.add_sample(self.name + "_bucket", {**labels, "le": le}, float(total))
        metric.add_sample(self.name + "_count", labels, float(total))
        metric.add_sample(self.name + "_sum", labels, child.sum)
