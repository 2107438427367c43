"""The last switches, activations and sleeps, for the dashboard.

`SwitchHistory` keeps the newest `size` records. `RecordingFleet` wraps the fleet client the
gateway acts through and records every `ensure_awake`, `wake` and `sleep` with the fleet's
report (phase timings, what was evicted) or the error; everything else passes through.
`RecordingOpener` wraps the gateway's fleet opener so every client it opens is recorded. This
feeds the dashboard until the scheduler keeps its own switch history.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from gateway.ui.snapshot import ActionView, SwitchView


class SwitchHistory:
    """The newest `size` switch records; safe to add from worker threads."""

    def __init__(self, size: int = 50, wall: Callable[[], float] = time.time) -> None:
        self._records: deque[SwitchView] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.wall = wall

    def add(self, record: SwitchView) -> None:
        with self._lock:
            self._records.append(record)

    def record(self, model: str, operation: str, seconds: float, report: object = None,
               error: BaseException | None = None) -> SwitchView:
        """Add what the fleet answered: its report (None: nothing to do) or the error."""
        if error is not None:
            busy = any(getattr(v, "kind", "") == "busy" for v in getattr(error, "violations", ()))
            outcome, reason = ("busy" if busy else "failed"), _reason(error)
        elif report is None:
            outcome, reason = "already_awake", ""
        else:
            outcome, reason = "ok", ""
        timings = getattr(report, "timings", None) or {}
        actions = tuple(ActionView(str(a.model), str(a.action), round(float(a.seconds), 3),
                                   str(getattr(a, "note", "") or ""),
                                   int(getattr(a, "replica", 0) or 0))
                        for a in getattr(report, "actions", ()) or ())
        operation = str(getattr(report, "operation", "") or operation)  # the fleet's word
        view = SwitchView(model=model, operation=operation, at=self.wall(), outcome=outcome,
                          seconds=round(seconds, 3), reason=reason or _evicted(model, actions),
                          timings={str(k): round(float(v), 3) for k, v in timings.items()},
                          actions=actions)
        self.add(view)
        return view

    def newest(self, n: int | None = None) -> list[SwitchView]:
        with self._lock:
            records = list(self._records)
        records.reverse()
        return records if n is None else records[:n]


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def _evicted(model: str, actions: Iterable[ActionView]) -> str:
    out = [f"{a.action} {a.model}" for a in actions if a.model != model and a.action != "none"]
    return ("made room: " + ", ".join(out)) if out else ""


class RecordingFleet:
    """A fleet client whose ensure_awake / wake / sleep land in a `SwitchHistory`."""

    def __init__(self, fleet: Any, history: SwitchHistory,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.fleet = fleet
        self.history = history
        self.clock = clock

    def _call(self, operation: str, model: str, fn: Callable[[], object]) -> object:
        started = self.clock()
        try:
            report = fn()
        except Exception as exc:
            self.history.record(model, operation, self.clock() - started, error=exc)
            raise
        self.history.record(model, operation, self.clock() - started, report)
        return report

    def ensure_awake(self, model: str, *, timeout: float | None = None, **extra: Any) -> object:
        """Passes `extra` (e.g. the scheduler's `evict`) through: a fleet without it raises
        the TypeError its caller expects."""
        return self._call("activation", model,
                          lambda: self.fleet.ensure_awake(model, timeout=timeout, **extra))

    def sleep(self, model: str) -> object:
        return self._call("sleep", model, lambda: self.fleet.sleep(model))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.fleet, name)  # AttributeError when the fleet has no such call
        if name == "wake":
            return lambda model: self._call("wake", model, lambda: attr(model))
        return attr


class RecordingOpener:
    """Wraps the gateway's fleet opener so that every fleet client it opens records into
    `history` (a reload's `for_registry` keeps recording)."""

    def __init__(self, inner: Any, history: SwitchHistory) -> None:
        self.inner = inner
        self.history = history

    def __call__(self, busy: Callable[[str], bool],
                 last_used: Callable[[str], float]) -> RecordingFleet:
        return RecordingFleet(self.inner(busy, last_used), self.history)

    def __getattr__(self, name: str) -> Any:
        if name != "for_registry":
            raise AttributeError(name)
        rebind = self.inner.for_registry  # AttributeError when it cannot rebind
        return lambda registry: RecordingOpener(rebind(registry), self.history)
