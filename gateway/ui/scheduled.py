"""The scheduler's figures for the dashboard (`gateway.scheduler.explain.snapshot`), and its
switch history joined with the fleet's reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from gateway.scheduler.core import SchedulerCore
from gateway.scheduler.explain import snapshot as explain_scheduler
from gateway.ui.snapshot import SwitchView


class SchedulerView(Protocol):
    """The gateway's scheduler (gateway.scheduler.runtime.Scheduler), read through
    `gateway.scheduler.explain.snapshot`."""

    @property
    def core(self) -> SchedulerCore: ...

    @property
    def clock(self) -> Callable[[], float]: ...


def scheduler_figures(sched: SchedulerView | None
                       ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], float]:
    """The scheduler's per-model figures and switch history, and its clock's now."""
    if sched is None:
        return {}, [], 0.0
    now = sched.clock()
    figures = explain_scheduler(sched.core, now)
    models = figures.get("models")
    history = figures.get("switches")
    return (dict(models) if isinstance(models, dict) else {},
            list(history) if isinstance(history, list) else [], now)


def merge_switches(recorded: Sequence[SwitchView], planned: Sequence[Mapping[str, Any]],
                   mono: float, wall: float) -> list[SwitchView]:
    """The fleet's reports (`recorded`, newest first: phase timings, actions) joined with the
    scheduler's switch history (`planned`, newest last, times on the scheduler's clock
    `mono`: why it switched, what it evicted, whether it is still running), newest first.
    A planned switch takes the report of the same model that ended after it started."""
    out = list(recorded)
    used: set[int] = set()
    for entry in planned:
        target = str(entry.get("target", ""))
        started = wall - (mono - float(entry.get("at", mono)))
        reason = str(entry.get("reason") or "")
        if entry.get("error"):
            reason = f"{reason}; failed: {entry['error']}" if reason else str(entry["error"])
        if entry.get("result") == "running":
            out.append(SwitchView(target, str(entry.get("kind") or "switch"), started,
                                  "running", round(mono - float(entry.get("at", mono)), 3),
                                  reason))
            continue
        match = min((i for i, r in enumerate(out) if i not in used and r.model == target
                     and r.outcome != "running" and r.at >= started - 1.0),
                    key=lambda i: out[i].at, default=None)  # the first to end after it began
        if match is None:
            continue  # its report fell out of the recorded history
        used.add(match)
        out[match] = replace(out[match], reason=reason or out[match].reason)
    out.sort(key=lambda s: s.at, reverse=True)
    return out
