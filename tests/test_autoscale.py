"""fleet.autoscale: replica-count decisions from load samples (pure, plain data)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from fleet.autoscale import Sample, decide, desired_replicas, replica_bounds, trim
from fleet.registry import parse_registry

pytestmark = pytest.mark.unit


def simulate(load: Callable[[float], float], *, start: int = 1, lo: int = 1, hi: int = 8,
             target: float = 2.0, up: float = 30.0, down: float = 600.0, step: float = 5.0,
             duration: float = 3000.0) -> list[tuple[float, int]]:
    """Sample `load(t)` every `step` s (as the gateway would), decide, apply; return the
    changes as (time, new count)."""
    current, last_change = start, None
    samples: list[Sample] = []
    changes: list[tuple[float, int]] = []
    for k in range(int(duration / step) + 1):
        now = k * step
        samples = trim([*samples, (now, load(now))], now, max(up, down))
        new = decide(current, samples, target, lo, hi, now=now, last_change=last_change,
                     upscale_delay=up, downscale_delay=down)
        if new != current:
            changes.append((now, new))
            current, last_change = new, now
    return changes


def test_desired_is_ceil_of_load_over_target_clamped() -> None:
    assert desired_replicas(0, 2, 1, 8) == 1
    assert desired_replicas(4, 2, 1, 8) == 2
    assert desired_replicas(4.5, 2, 1, 8) == 3
    assert desired_replicas(100, 2, 1, 8) == 8
    assert desired_replicas(0, 2, 0, 8) == 0
    with pytest.raises(ValueError):
        desired_replicas(1, 0, 1, 2)


def test_growth_under_sustained_load_after_the_upscale_delay() -> None:
    changes = simulate(lambda t: 0.5 if t < 100 else 10.0)
    # load rises at t=100; every sample of the next 30 s is above 1 x 2: up to ceil(10/2)
    assert changes == [(130.0, 5)]


def test_growth_is_capped_at_max_replicas() -> None:
    assert simulate(lambda t: 50.0, hi=3) == [(30.0, 3)]


def test_a_short_spike_does_not_scale_up() -> None:
    # 20 s above target, shorter than the 30 s upscale delay
    assert simulate(lambda t: 10.0 if 100 <= t < 120 else 1.0) == []


def test_no_flapping_under_oscillating_load() -> None:
    # Load swings between idle and 3x the target every 20 s: never above target for a whole
    # upscale delay, never low for a whole downscale delay: the count never moves.
    swing = simulate(lambda t: 6.0 if (t // 20) % 2 else 0.0, start=2)
    assert swing == []
    # Load oscillating inside the hysteresis band of 2 replicas (2 < load <= 4): stays at 2.
    assert simulate(lambda t: 2.5 + 1.5 * math.sin(t / 7), start=2) == []


def test_oscillation_around_a_threshold_changes_the_count_at_most_once() -> None:
    # Load 3.5 and 4.5 in turn, 35 s each, target 2: above 2 x 2 for 30 s once (35..65): up
    # to 3; then never above 3 x 2, never at most 2 x 2 for 600 s: it stays at 3.
    changes = simulate(lambda t: 4.0 + (0.5 if (t // 35) % 2 else -0.5), start=2)
    assert changes == [(65.0, 3)]


def test_retirement_after_the_cooldown() -> None:
    changes = simulate(lambda t: 10.0 if t < 500 else 1.0, duration=2000)
    assert changes[0] == (30.0, 5)
    # load drops at 500; every sample of the following 600 s fits in 1 replica: down at 1100
    assert changes[1:] == [(1100.0, 1)]


def test_downscale_goes_to_what_the_windows_peak_needs() -> None:
    # from 6 replicas, a window whose peak is 5 keeps ceil(5 / 2) = 3
    samples = [(t, 5.0 if t == 300 else 1.0) for t in range(0, 700, 10)]
    assert decide(6, samples, 2, 1, 8, now=690, last_change=0) == 3


def test_cooldown_after_a_change() -> None:
    samples = [(t, 20.0) for t in range(0, 101, 5)]
    # sustained above target, but the count changed 10 s ago: wait for the upscale delay
    assert decide(2, samples, 2, 1, 8, now=100, last_change=90) == 2
    assert decide(2, samples, 2, 1, 8, now=100, last_change=70) == 8


def test_no_decision_on_a_history_shorter_than_the_delay() -> None:
    samples = [(t, 20.0) for t in range(80, 101, 5)]   # 20 s of history
    assert decide(1, samples, 2, 1, 8, now=100, last_change=None) == 1
    assert decide(1, [], 2, 1, 8, now=100, last_change=None) == 1
    assert decide(1, [(t, 20.0) for t in range(70, 101, 5)], 2, 1, 8, now=100,
                  last_change=None) == 8


def test_a_sample_holds_until_the_next_one() -> None:
    # sparse samples: the one at t=60 is in effect from 60 to 95; 95..100 the new value
    samples = [(0.0, 1.0), (60.0, 9.0), (95.0, 9.0)]
    assert decide(1, samples, 2, 1, 8, now=100, last_change=None) == 5
    samples = [(0.0, 1.0), (80.0, 9.0)]   # 1.0 was in effect at 70: not above for 30 s
    assert decide(1, samples, 2, 1, 8, now=100, last_change=None) == 1


def test_samples_from_the_future_are_ignored_and_order_does_not_matter() -> None:
    samples = [(100.0, 9.0), (60.0, 9.0), (200.0, 0.0), (80.0, 9.0)]
    assert decide(1, samples, 2, 1, 8, now=100, last_change=None) == 5


def test_out_of_range_counts_are_brought_inside_at_once() -> None:
    assert decide(0, [], 2, 1, 4, now=0, last_change=0) == 1
    assert decide(9, [], 2, 1, 4, now=0, last_change=0) == 4
    with pytest.raises(ValueError):
        decide(1, [], 2, 3, 2, now=0, last_change=None)


def test_scale_to_zero_and_back() -> None:
    changes = simulate(lambda t: 0.0 if 1000 <= t < 2000 else 3.0, lo=0, start=2)
    assert changes == [(1600.0, 0), (2030.0, 2)]


def test_trim_keeps_the_sample_in_effect_at_the_window_start() -> None:
    kept = trim([(0, 1), (50, 2), (95, 3), (100, 4)], now=100, keep_seconds=30)
    assert kept == [Sample(50.0, 2.0), Sample(95.0, 3.0), Sample(100.0, 4.0)]
    assert trim([], now=5) == []


def test_replica_bounds_from_the_registry() -> None:
    r = parse_registry("""
[models.fixed]
source = "o/f"
port = 8001
replicas = 3
[models.auto]
source = "o/a"
port = 8010
min_replicas = 0
max_replicas = 4
target_ongoing_requests = 2
[models.one]
source = "o/o"
port = 8020
max_replicas = 2
target_ongoing_requests = 2
""")
    assert replica_bounds(r.models["fixed"]) == (1, 3)
    assert replica_bounds(r.models["auto"]) == (0, 4)
    assert replica_bounds(r.models["one"]) == (1, 2)
