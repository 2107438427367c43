"""The replay benchmark (benchmarks/replay.py) in sim mode: one short trace, the report's
shape, so the benchmark cannot rot."""

from __future__ import annotations

import json

import pytest

from benchmarks import replay as bench
from gateway.scheduler.oracle import lower_bound
from gateway.scheduler.replay import SimModel, SimRequest

pytestmark = pytest.mark.unit


def test_sim_mode_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--mode", "sim", "--trace", "hot-occasional", "--seeds", "2",
                       "--duration", "20"]) == 0
    out = capsys.readouterr().out
    assert "| trace | policy | model |" in out and "vs oracle" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["benchmark"] == "replay"
    runs = report["runs"]
    assert {(r["policy"], r["seed"]) for r in runs} == {
        ("drain-wait", 0), ("drain-wait", 1), ("fair", 0), ("fair", 1)}
    for r in runs:
        assert r["mode"] == "sim" and r["trace"] == "hot-occasional"
        assert set(r["models"]) == {"a", "b"}
        for m in r["models"].values():
            assert set(m) == {"sent", "answered", "429", "503", "other", "wait_p50",
                              "wait_p95", "wait_max"}
            assert m["answered"] + m["429"] + m["503"] + m["other"] == m["sent"]
        assert r["oracle_s"] > 0
        if r["all_answered"]:  # the oracle is a lower bound (it counts every request answered)
            assert r["makespan_s"] >= r["oracle_s"]
        assert 0 <= r["switching_share"] <= 1
        assert r["violations"] == []
        assert isinstance(r["within_bound"], bool)
    fair = [r for r in runs if r["policy"] == "fair"]
    assert all(r["all_answered"] and r["within_bound"] for r in fair)


def test_the_traces_are_deterministic_per_seed() -> None:
    for name in bench.TRACES:
        one, two = bench.make_trace(name, 3, 20.0), bench.make_trace(name, 3, 20.0)
        assert one == two and (one.requests or one.loops)
        assert bench.make_trace(name, 4, 20.0).requests != one.requests or one.loops


def test_lower_bound_counts_service_and_the_fewest_switches() -> None:
    models = [SimModel("a", load=3.0, evict=0.5, max_concurrency=2),
              SimModel("b", load=2.0, evict=0.5, max_concurrency=2)]
    # all at 0: a (awake) 4 x 1 s over 2 slots = 2 s; b needs an eviction and a load, 1 s
    reqs = [SimRequest(0.0, "a", 1.0)] * 4 + [SimRequest(0.0, "b", 1.0)]
    assert lower_bound(reqs, models, 1, awake=["a"]) == pytest.approx(2.0 + 0.5 + 2.0 + 1.0)
    # room for both: no eviction, service in parallel, b's load before its service
    assert lower_bound(reqs, models, 2, awake=["a"]) == pytest.approx(3.0)
    # a late request for b: at least its arrival, a switch (eviction may happen before), 1 s
    late = [SimRequest(0.0, "a", 1.0), SimRequest(10.0, "b", 1.0), SimRequest(10.0, "a", 1.0)]
    assert lower_bound(late, models, 1, awake=["a"]) == pytest.approx(10.0 + 2.0 + 1.0 + 1.0)
