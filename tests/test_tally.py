"""gateway/tally.py renders what prometheus_client renders for the same updates."""

from __future__ import annotations

import re

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from gateway import tally
from gateway.metrics import DURATION_BUCKETS

pytestmark = pytest.mark.unit

CREATED = re.compile(rb"^(\w+_created\{[^}]*\}) \S+$", re.M)
AMOUNTS = st.one_of(st.sampled_from([0.0, *DURATION_BUCKETS, 1e-9, 599.999, 601.0, 1e6]),
                    st.floats(min_value=0, max_value=1e4, allow_nan=False))
UPDATES = st.lists(st.tuples(st.sampled_from(["a", "b", "model-c"]), AMOUNTS), max_size=40)


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition, the `_created` timestamps (taken at different times) blanked."""
    return CREATED.sub(rb"\1 T", generate_latest(registry))


@settings(max_examples=60, deadline=None)
@given(UPDATES)
def test_a_histogram_renders_as_prometheus_clients(updates: list[tuple[str, float]]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = prometheus_client.Histogram("x_seconds", "Doc", ["model"],
                                            buckets=DURATION_BUCKETS, registry=theirs)
    mine = tally.Histogram("x_seconds", "Doc", ["model"], buckets=DURATION_BUCKETS,
                           registry=ours)
    for model, amount in updates:
        reference.labels(model).observe(amount)
        mine.labels(model).observe(amount)
    assert exposition(ours) == exposition(theirs)


@settings(max_examples=30, deadline=None)
@given(UPDATES)
def test_a_counter_renders_as_prometheus_clients(updates: list[tuple[str, float]]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = prometheus_client.Counter("x_requests", "Doc", ["model", "status"],
                                          registry=theirs)
    mine = tally.Counter("x_requests", "Doc", ["model", "status"], registry=ours)
    for model, amount in updates:
        reference.labels(model, "200").inc(amount)
        mine.labels(model, "200").inc(amount)
    assert exposition(ours) == exposition(theirs)


def test_wrong_label_counts_and_bounds_are_refused_by_name() -> None:
    registry = CollectorRegistry()
    hist = tally.Histogram("y_seconds", "Doc", ["model"], buckets=(1, 2), registry=registry)
    with pytest.raises(ValueError, match="y_seconds: 1 label values expected"):
        hist.labels("a", "b")
    with pytest.raises(ValueError, match="ascending"):
        tally.Histogram("z_seconds", "Doc", ["model"], buckets=(2, 1), registry=registry)
    # the refused one was not registered: the name is free, and the registry renders
    tally.Histogram("z_seconds", "Doc", ["model"], buckets=(1, 2), registry=registry)
    assert b"# TYPE z_seconds histogram" in generate_latest(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        tally.Counter("y_seconds", "Doc", ["model"], registry=registry)
