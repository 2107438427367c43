"""Waiting until replicas are healthy: poll, one container listing per round for every
replica waited for, each running one's /health; fail a replica whose container ended,
crash-loops or disappeared, or that is not healthy within its `health_timeout` (or the
caller's deadline).

A load is never silent: every `watch_every` seconds each replica still loading is said
with the time waited against its health_timeout and its container's latest log line (vLLM
logs its loading steps), e.g. "a: loading, 10s of its 900s health_timeout; last log line:
INFO Loading weights took 3.1 seconds".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fleet.clock import Clock
from fleet.containers import ContainerRecord, Engine
from fleet.errors import EngineError, ModelFailure
from fleet.health import Probe
from fleet.observe import Observer, base_url, ended_reason, replica_label
from fleet.registry import ModelSpec, Registry

Unit = tuple[ModelSpec, int]  # (model, replica index)
Key = tuple[str, int]
DEFAULT_WATCH_EVERY = 5.0
_LOG_LINE_CHARS = 160


class HealthWait:
    """Waits for replicas to answer /health 200 (and not be asleep)."""

    def __init__(self, registry: Registry, observer: Observer, probe: Probe, clock: Clock, *,
                 fail: Callable[[ModelSpec, int, ContainerRecord | None, str], ModelFailure],
                 say: Callable[[str], None], poll_interval: float, engine: Engine | None = None,
                 watch_every: float = DEFAULT_WATCH_EVERY) -> None:
        self.registry = registry
        self.observer = observer
        self.probe = probe
        self.clock = clock
        self.fail = fail  # gathers logs and stops the container of a failed replica
        self.say = say
        self.poll_interval = poll_interval
        self.engine = engine  # reads the latest log line of a loading replica (None: not shown)
        self.watch_every = watch_every  # seconds between load lines (0: none)

    def wait(self, units: Sequence[Unit], *, deadline: float | None = None) -> list[ModelFailure]:
        """Poll until every unit is healthy or has failed; the failures (empty: all
        healthy). `deadline` (a `clock.monotonic()` value) caps every unit's wait on top of
        its model's health_timeout."""
        start = self.clock.monotonic()
        cap = float("inf") if deadline is None else deadline
        deadlines = {(m.name, i): min(start + self.registry.health_timeout(m), cap)
                     for m, i in units}
        pending: dict[Key, Unit] = {(m.name, i): (m, i) for m, i in units}
        failures: list[ModelFailure] = []
        last: dict[Key, str] = {}
        next_watch = start + self.watch_every
        while pending:
            records = self.observer.containers()  # one listing per round
            for key, (m, i) in list(pending.items()):
                rec = records.get(key)
                reason = self._ended(rec)
                if reason is None:
                    assert rec is not None
                    url = base_url(self.registry, m, i)
                    h = self.probe.health(url)
                    if h.ok and not (m.sleep_mode and self.probe.is_sleeping(url)):
                        del pending[key]
                        self.say(f"{replica_label(self.registry, m.name, i)} healthy after "
                                 f"{self.clock.monotonic() - start:.2f}s")
                        continue
                    last[key] = h.detail or ("still sleeping" if h.ok else "")
                    if self.clock.monotonic() >= deadlines[key]:
                        reason = self._timed_out(m, start, last[key])
                if reason is not None:
                    del pending[key]
                    failures.append(self.fail(m, i, rec, reason))
            if pending and self.watch_every > 0 and self.clock.monotonic() >= next_watch:
                for key, (m, i) in pending.items():
                    self.say(self._watch_line(m, i, start, records.get(key)))
                next_watch = self.clock.monotonic() + self.watch_every
            if pending:
                self.clock.sleep(self.poll_interval)
        return failures

    def _watch_line(self, m: ModelSpec, replica: int, start: float,
                    rec: ContainerRecord | None) -> str:
        waited = self.clock.monotonic() - start
        line = f"{replica_label(self.registry, m.name, replica)}: loading, {waited:.0f}s of " \
               f"its {self.registry.health_timeout(m):g}s health_timeout"
        latest = self._latest_log_line(rec)
        return f"{line}; last log line: {latest}" if latest else line

    def _latest_log_line(self, rec: ContainerRecord | None) -> str:
        if rec is None or self.engine is None:
            return ""
        try:
            text = self.engine.logs(rec.id, tail=5)
        except EngineError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        latest = lines[-1] if lines else ""
        return latest if len(latest) <= _LOG_LINE_CHARS else latest[:_LOG_LINE_CHARS - 3] + "..."

    @staticmethod
    def _ended(rec: ContainerRecord | None) -> str | None:
        """Why a replica can no longer become healthy, or None while it still may."""
        if rec is None:
            return "its container disappeared"
        if rec.state in ("exited", "dead", "created"):
            return ended_reason(rec)
        if rec.state == "restarting":
            return "its container is crash-looping (restarting)"
        return None

    def _timed_out(self, m: ModelSpec, start: float, last: str) -> str:
        waited = self.clock.monotonic() - start
        timeout = self.registry.health_timeout(m)
        limit = (f"its health_timeout of {timeout:g}s" if waited >= timeout
                 else "the caller's deadline")
        return (f"not healthy within {limit} (waited {waited:.1f}s; last /health: "
                f"{last or 'no answer'})")
