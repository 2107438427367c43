"""Short request series per model, sampled from the gateway's own Prometheus metrics.

`Sampler.sample(now)` reads the cumulative counters (requests by status, the time-to-first-
chunk histogram's sum and count) at most once per `interval` and keeps the last `points`
readings; `view()` turns consecutive readings into per-interval figures: requests per
second, mean time to first chunk, errors (429 and 5xx answers) per second. Sampling is lazy:
the dashboard's snapshot calls drive it, so an unwatched gateway does no work for it (and
the charts start when someone first looks).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.ui.snapshot import ModelSeries, Series


@dataclass(frozen=True, slots=True)
class Reading:
    """Cumulative figures of one model at one moment."""

    requests: float = 0.0
    errors: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    models: dict[str, Reading] = field(default_factory=dict)


def is_error(status: str) -> bool:
    """429 (over a limit) and every 5xx count as errors in the charts."""
    return status == "429" or status.startswith("5")


def readings(requests: Iterable[tuple[str, str, float]],
             ttft: Iterable[tuple[str, float, float]]) -> dict[str, Reading]:
    """Per model readings from (model, status, count) and (model, sum, count) rows."""
    acc: dict[str, list[float]] = {}
    for model, status, count in requests:
        row = acc.setdefault(model, [0.0, 0.0, 0.0, 0.0])
        row[0] += count
        if is_error(status):
            row[1] += count
    for model, total, count in ttft:
        row = acc.setdefault(model, [0.0, 0.0, 0.0, 0.0])
        row[2] += total
        row[3] += count
    return {m: Reading(*r) for m, r in acc.items()}


class Sampler:
    """Keeps the last `points` samples, taken at least `interval` seconds apart."""

    def __init__(self, read: Callable[[], dict[str, Reading]], *, interval: float = 2.0,
                 points: int = 90) -> None:
        self.read = read
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=points + 1)

    def sample(self, now: float) -> None:
        """Take a reading unless the last one is younger than the interval."""
        if self.samples and now - self.samples[-1].at < self.interval * 0.95:
            return
        self.samples.append(Sample(now, self.read()))

    def view(self, models: Iterable[str] | None = None) -> Series:
        """Per-interval figures of `models` (default: every model seen)."""
        samples = list(self.samples)
        pairs = list(itertools.pairwise(samples))
        names = list(models) if models is not None else sorted(
            {m for s in samples for m in s.models})
        out: dict[str, ModelSeries] = {}
        for name in names:
            rate: list[float] = []
            ttft: list[float | None] = []
            errors: list[float] = []
            for before, after in pairs:
                dt = max(after.at - before.at, 1e-9)
                a, b = before.models.get(name, Reading()), after.models.get(name, Reading())
                # A counter that went down was reset (a reload made the model anew): start over.
                rate.append(max(b.requests - a.requests, 0.0) / dt)
                errors.append(max(b.errors - a.errors, 0.0) / dt)
                streams = b.ttft_count - a.ttft_count
                ttft.append((b.ttft_sum - a.ttft_sum) / streams if streams > 0 else None)
            out[name] = ModelSeries(tuple(rate), tuple(ttft), tuple(errors))
        return Series(interval=self.interval, t=tuple(s.at for _, s in pairs), models=out)
