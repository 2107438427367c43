"""Autoscaling decisions: how many replicas a model should have, from its recent load.

Pure: plain numbers in, a replica count out; the caller (the gateway, which sees every
request) samples each model's in-flight requests, calls `decide` and, when the answer differs
from the current count, asks the fleet to scale (`FleetClient.scale`).

In the spirit of Ray Serve's autoscaling policy:

- desired = ceil(ongoing / target_ongoing_requests), clamped to [min_replicas, max_replicas]
  (`ongoing` is the model's total in-flight requests, over all its replicas).
- Upscale only when every sample in effect over the last `upscale_delay` seconds (a sample
  holds until the next one) was above what the current replicas should carry (ongoing >
  current x target); then to ceil(mean / target) of those samples.
- Downscale only when every sample in effect over the last `downscale_delay` seconds fitted
  in fewer replicas (ongoing <= (current - 1) x target); then to ceil(max / target) of
  those samples: the window's peak still fits.
- Either way, only `upscale_delay` / `downscale_delay` seconds after the last change (a
  cooldown), and only when the samples reach back that far (no decision on a short history).

Load between the two thresholds changes nothing: the band of one replica's worth of
requests between "above current x target" and "at most (current - 1) x target" is the
hysteresis that keeps oscillating load from flapping the replica count. A current count
outside [min, max] (the registry changed) is brought inside at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from fleet.errors import ScaleOutOfRange
from fleet.registry import ModelSpec

DEFAULT_UPSCALE_DELAY = 30.0     # Ray Serve's default upscale_delay_s
DEFAULT_DOWNSCALE_DELAY = 600.0  # Ray Serve's default downscale_delay_s


class Sample(NamedTuple):
    """A model's in-flight requests (`ongoing`, all replicas together) at time `t` (seconds
    on the caller's monotonic clock, the same clock as `now` and `last_change`)."""

    t: float
    ongoing: float


def replica_bounds(model: ModelSpec) -> tuple[int, int]:
    """The replica counts `fleet scale` accepts for `model`: [min_replicas (default 1),
    max_replicas] when autoscaled, [1, replicas] otherwise."""
    if model.max_replicas is not None:
        low = model.min_replicas if model.min_replicas is not None else 1
        return low, model.max_replicas
    return 1, model.replicas


def check_scale(model: ModelSpec, replicas: int) -> None:
    """ScaleOutOfRange (a usage error) unless `replicas` lies in `replica_bounds(model)`."""
    low, high = replica_bounds(model)
    if not low <= replicas <= high:
        kind = "autoscaled between min_replicas and max_replicas" if model.autoscaled else \
            "a fixed count (`replicas` in the registry)"
        raise ScaleOutOfRange(f"cannot scale {model.name} to {replicas} replica(s): it takes "
                              f"{low} to {high} ({kind})")


def desired_replicas(ongoing: float, target_ongoing_requests: float, min_replicas: int,
                     max_replicas: int) -> int:
    """ceil(ongoing / target), clamped to [min_replicas, max_replicas]."""
    if target_ongoing_requests <= 0:
        raise ValueError("target_ongoing_requests must be > 0")
    want = math.ceil(max(0.0, ongoing) / target_ongoing_requests - 1e-9)
    return max(min_replicas, min(max_replicas, want))


def decide(
    current: int,
    ongoing_samples: Sequence[tuple[float, float]],
    target_ongoing_requests: float,
    min_replicas: int,
    max_replicas: int,
    *,
    now: float,
    last_change: float | None,
    upscale_delay: float = DEFAULT_UPSCALE_DELAY,
    downscale_delay: float = DEFAULT_DOWNSCALE_DELAY,
) -> int:
    """The replica count `current` should become (== current: no change).

    `ongoing_samples`: recent `(t, ongoing)` pairs (`Sample`s), any order, of the model's
    total in-flight requests (the gateway's in-flight count, optionally plus its queue);
    samples newer than `now` are ignored. `last_change`: when the
    count last changed (None: never, no cooldown). The samples must reach back `upscale_delay`
    (`downscale_delay`) seconds before `now` for an upscale (downscale): keep at least
    `downscale_delay` seconds of them.
    """
    if min_replicas > max_replicas:
        raise ValueError(f"min_replicas {min_replicas} > max_replicas {max_replicas}")
    if current < min_replicas or current > max_replicas:
        return max(min_replicas, min(max_replicas, current))
    samples = sorted((Sample(float(t), float(v)) for t, v in ongoing_samples if t <= now),
                     key=lambda s: s.t)
    if not samples:
        return current
    since_change = math.inf if last_change is None else now - last_change

    def steady(delay: float) -> list[Sample] | None:
        """The samples in effect over the last `delay` seconds (a sample holds until the
        next one: the last one at or before the window's start is its first value), or
        None when the history does not reach back that far or the cooldown runs."""
        start = now - delay
        before = [s for s in samples if s.t <= start]
        if since_change < delay or not before:
            return None
        return [before[-1], *(s for s in samples if s.t > start)]

    if current < max_replicas:
        window = steady(upscale_delay)
        if window and all(s.ongoing > current * target_ongoing_requests for s in window):
            mean = sum(s.ongoing for s in window) / len(window)
            return max(current + 1, desired_replicas(mean, target_ongoing_requests,
                                                     min_replicas, max_replicas))
    if current > min_replicas:
        window = steady(downscale_delay)
        if window and all(s.ongoing <= (current - 1) * target_ongoing_requests for s in window):
            peak = max(s.ongoing for s in window)
            return min(current - 1, desired_replicas(peak, target_ongoing_requests,
                                                     min_replicas, max_replicas))
    return current


def trim(samples: Iterable[tuple[float, float]], now: float,
         keep_seconds: float = DEFAULT_DOWNSCALE_DELAY) -> list[Sample]:
    """The samples `decide` can still use: those at most `keep_seconds` old, plus the newest
    one older than that (the value in effect at the start of the window)."""
    ordered = sorted((Sample(float(t), float(v)) for t, v in samples), key=lambda s: s.t)
    cut = now - keep_seconds
    recent = [s for s in ordered if s.t >= cut]
    older = [s for s in ordered if s.t < cut]
    return ([older[-1]] if older else []) + recent
