"""The server's collector settings (gateway/server.py, `tune_gc`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.server import tune_gc

pytestmark = pytest.mark.unit


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_what_exists_at_start_up_is_left_out_of_collections(restored: None) -> None:
    assert gc.get_freeze_count() == 0
    _, older, oldest = gc.get_threshold()
    tune_gc()
    assert gc.get_freeze_count() > 1000  # modules, classes, the app
    assert gc.get_threshold() == (20_000, older, oldest)


def test_the_young_generation_is_collected_far_less_often(restored: None) -> None:
    """At the default 700 the collector ran several times per proxied request."""
    tune_gc()
    before = gc.get_stats()[0]["collections"]
    keep = [[] for _ in range(10_000)]  # 10 000 container allocations
    assert gc.get_stats()[0]["collections"] == before
    del keep
