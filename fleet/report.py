"""What a fleet operation tells its caller: the report of what it did (`Report`, one
`ActionTaken` per replica acted on), a status row (`ModelStatus`), and the errors it raises
(`FleetError` and its kinds), each with the CLI exit code and a message that says what was
done, the state now and how to recover."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.engine import EngineError
from fleet.planner import Violation


class FleetError(RuntimeError):
    """An operation failed; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UnknownModel(FleetError):
    exit_code = 2


class ScaleOutOfRange(FleetError):
    """`scale` to a count outside the model's replica range (a usage error)."""

    exit_code = 2


class PlacementRefused(FleetError):
    """The requested models cannot be awake together with what is awake (or at all)."""

    def __init__(self, message: str, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        lines = "\n".join(f"  - [{v.kind}] {v.message}" for v in self.violations)
        super().__init__(f"{message}\n{lines}" if lines else message)


@dataclass(frozen=True)
class ModelFailure:
    model: str
    reason: str
    container: str | None
    log_tail: str
    replica: int | None = None  # set for a model with several replica slots

    @property
    def label(self) -> str:
        return f"model {self.model!r}" + ("" if self.replica is None
                                          else f" replica {self.replica}")


class StartFailed(FleetError):
    """One or more models did not become healthy; the message has their logs and the state."""

    def __init__(self, failures: Sequence[ModelFailure], state: str, recover: str) -> None:
        self.failures = tuple(failures)
        self.state = state
        self.recover = recover
        parts: list[str] = []
        for f in self.failures:
            parts.append(f"{f.label} failed to start: {f.reason}")
            if f.log_tail.strip():
                parts.append(f"--- last log lines of {f.container} ---")
                parts.append(f.log_tail.rstrip("\n"))
                parts.append("---")
        parts.append(f"fleet state now: {state}")
        parts.append(f"to recover: {recover}")
        super().__init__("\n".join(parts))


class Interrupted(FleetError):
    """The container engine failed part-way through an operation, after the fleet began to
    act (e.g. the Docker daemon went away while the target loaded): the message says what
    had been done, the state now (unknown while the daemon does not answer) and how to
    recover."""

    def __init__(self, operation: str, cause: EngineError, done: Sequence[str], state: str,
                 recover: str) -> None:
        self.cause = cause
        self.done = tuple(done)
        self.state = state
        self.recover = recover
        super().__init__("\n".join([
            f"{operation} interrupted: {cause}",
            f"done before that: {'; '.join(self.done) or 'nothing'}",
            f"fleet state now: {state}",
            f"to recover: {recover}",
        ]))


@dataclass(frozen=True)
class ModelStatus:
    """One row of `fleet status`: one replica of a model (`replica` 0 for a single one)."""

    name: str
    state: str
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
        d["gpus"] = list(self.gpus)
        d["uptime"] = None if self.uptime is None else round(self.uptime, 1)
        return d


@dataclass(frozen=True)
class ActionTaken:
    model: str
    action: str  # sleep, stop, wake, start, restart, create, recreate, remove, none
    seconds: float
    note: str = ""
    replica: int = 0


@dataclass
class Report:
    """What an operation did (one action per replica acted on), with phase timings in
    seconds (evict, start, healthy, total)."""

    operation: str
    target: tuple[str, ...]
    actions: list[ActionTaken] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    awake: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "target": list(self.target),
            "actions": [asdict(a) for a in self.actions],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "awake": list(self.awake),
        }

    def timing_line(self) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())


SwitchReport = Report
