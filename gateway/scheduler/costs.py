"""Switch costs, measured per model and per kind of bring-up (wake, start, create).

The fleet reports how long each switch took; the scheduler keeps a smoothed figure per model
and kind and uses it for the quantum (how long a model may keep the resource while rivals
wait), the waiting estimates and Retry-After. Before the first measurement of a kind, a prior
is used: the model's own measurement of a costlier kind if any, else the configured default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.scheduler.events import BringUp

_ORDER = (BringUp.WAKE, BringUp.START, BringUp.CREATE)


@dataclass
class SwitchCosts:
    """Seconds to bring a model up, by kind, and to put it away (sleep or stop)."""

    defaults: dict[BringUp, float] = field(default_factory=lambda: {
        BringUp.WAKE: 2.0, BringUp.START: 30.0, BringUp.CREATE: 60.0})
    evict_default: float = 1.0
    weight: float = 0.5  # share of a new measurement in the smoothed figure
    _up: dict[tuple[str, BringUp], float] = field(default_factory=dict)
    _evict: dict[str, float] = field(default_factory=dict)

    def bring_up(self, model: str, kind: BringUp) -> float:
        known = self._up.get((model, kind))
        if known is not None:
            return known
        # A cheaper kind never costs more than a costlier one that was measured.
        for other in _ORDER[_ORDER.index(kind) + 1:]:
            measured = self._up.get((model, other))
            if measured is not None:
                return min(measured, self.defaults[kind])
        return self.defaults[kind]

    def measured_bring_up(self, model: str, kind: BringUp) -> float:
        """What was measured (a cheaper kind bounded by a costlier one), else 0: the quantum
        grows with what the fleet has shown, not with guesses."""
        if (model, kind) in self._up:
            return self._up[(model, kind)]
        later = [self._up[(model, k)] for k in _ORDER[_ORDER.index(kind) + 1:]
                 if (model, k) in self._up]
        return min(later) if later and kind is not BringUp.WAKE else 0.0

    def measured_evict(self, model: str) -> float:
        return self._evict.get(model, 0.0)

    def evict(self, model: str) -> float:
        return self._evict.get(model, self.evict_default)

    def record_bring_up(self, model: str, kind: BringUp, seconds: float) -> None:
        self._up[(model, kind)] = self._smooth(self._up.get((model, kind)), seconds)

    def record_evict(self, model: str, seconds: float) -> None:
        self._evict[model] = self._smooth(self._evict.get(model), seconds)

    def measured(self) -> dict[str, dict[str, float]]:
        """{model: {kind: seconds}} of what was measured (for status and metrics)."""
        out: dict[str, dict[str, float]] = {}
        for (model, kind), seconds in self._up.items():
            out.setdefault(model, {})[str(kind)] = round(seconds, 3)
        for model, seconds in self._evict.items():
            out.setdefault(model, {})["evict"] = round(seconds, 3)
        return out

    def _smooth(self, old: float | None, new: float) -> float:
        new = max(0.0, new)
        return new if old is None else old + self.weight * (new - old)
