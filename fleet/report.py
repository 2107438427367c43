"""What a fleet operation tells its caller: the report of what it did (`Report`, one
`ActionTaken` per replica acted on, phase timings, how the target came up) and a status row
(`ModelStatus`). Pure data: no Docker; the gateway reads these. The errors an operation
raises are in `fleet.errors`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.states import Action, BringUp, Phase, ReplicaState


@dataclass(frozen=True)
class ModelStatus:
    """One row of `fleet status`: one replica of a model (`replica` 0 for a single one)."""

    name: str
    state: ReplicaState
    port: int | None
    gpus: tuple[int, ...]
    fraction: float | None
    uptime: float | None
    health: str
    container: str | None = None
    detail: str = ""
    replica: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        d["gpus"] = list(self.gpus)
        d["uptime"] = None if self.uptime is None else round(self.uptime, 1)
        return d


@dataclass(frozen=True)
class ActionTaken:
    """One thing done to one replica, how long it took, and why (`note`)."""

    model: str
    action: Action
    seconds: float
    note: str = ""
    replica: int = 0


@dataclass(frozen=True)
class PhaseTimings:
    """A report's timings by phase, in seconds (None: the operation had no such phase).
    See `fleet.states.Phase` for what each covers."""

    pull: float | None
    evict: float | None
    start: float | None
    healthy: float | None
    total: float | None


@dataclass
class Report:
    """What an operation did (one action per replica acted on), with phase timings.

    `timings`: seconds per `Phase` (keys in the order the phases ran: evict, start,
    healthy, total, with pull first when an image was pulled); `phases` is the same as a
    typed record. `bring_up_kind`: how the target came up (wake, start or create), None
    when nothing had to be brought up. `awake`: the models awake when it finished.
    """

    operation: str
    target: tuple[str, ...]
    actions: list[ActionTaken] = field(default_factory=list)
    timings: dict[Phase, float] = field(default_factory=dict)
    awake: tuple[str, ...] = ()

    @property
    def phases(self) -> PhaseTimings:
        t = self.timings
        return PhaseTimings(pull=t.get(Phase.PULL), evict=t.get(Phase.EVICT),
                            start=t.get(Phase.START), healthy=t.get(Phase.HEALTHY),
                            total=t.get(Phase.TOTAL))

    @property
    def bring_up_kind(self) -> BringUp | None:
        """The costliest way a replica of the target came up (create > start > wake), or
        None when the operation brought none up (all already awake, or sleep/down)."""
        kinds = [k for a in self.actions if a.model in self.target
                 if (k := BringUp.of(a.action)) is not None]
        return max(kinds, key=lambda k: k.cost) if kinds else None

    def as_dict(self) -> dict[str, Any]:
        kind = self.bring_up_kind
        return {
            "operation": self.operation,
            "target": list(self.target),
            "actions": [{**asdict(a), "action": str(a.action)} for a in self.actions],
            "timings": {str(k): round(v, 3) for k, v in self.timings.items()},
            "bring_up": None if kind is None else str(kind),
            "awake": list(self.awake),
        }

    def timing_line(self) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
