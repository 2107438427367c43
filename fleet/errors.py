"""Every error the fleet raises, by kind, so callers (the CLI, the gateway) catch by type.

Pure: no Docker import (the engine maps Docker's own errors onto these). Each message says
what was done, the state now and how to recover.

- `RegistryError`: the registry file is missing or invalid (every problem listed).
- `EngineError` and its kinds: a container-engine call failed (`DockerUnreachable`,
  `ImageMissing`, `PullFailed`, `PortInUse`, `NoGpuRuntime`, `NameConflict`,
  `ContainerMissing`).
- `ProbeError`: a call to a model's own server (sleep, wake) failed.
- `LockTimeout`: another fleet operation holds the switch lock.
- `FleetError` and its kinds: an operation refused or failed (`UnknownModel`,
  `ScaleOutOfRange`, `PlacementRefused` and `ModelsBusy`, `StartFailed`, `Interrupted`);
  `exit_code` is what the CLI exits with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.states import ViolationKind

# -- the registry ---------------------------------------------------------------------------


class RegistryError(ValueError):
    """The registry file is missing, unreadable or invalid; `problems` lists every finding."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid registry ({len(problems)} problem(s)):\n{lines}")


# -- the container engine ------------------------------------------------------------------


class EngineError(RuntimeError):
    """A container-engine operation failed; the message says what to do about it."""


class DockerUnreachable(EngineError):
    """The daemon does not answer (not running, wrong address, gone part-way)."""


class ImageMissing(EngineError):
    """The image is not on the host (and the pull policy does not fetch it)."""


class PullFailed(ImageMissing):
    """Pulling an image failed: `image`, and the registry's answer in `answer`."""

    def __init__(self, message: str, *, image: str, answer: str) -> None:
        self.image = image
        self.answer = answer
        super().__init__(message)


class PortInUse(EngineError):
    pass


class NoGpuRuntime(EngineError):
    pass


class NameConflict(EngineError):
    pass


class ContainerMissing(EngineError):
    pass


# -- a model's server ----------------------------------------------------------------------


class ProbeError(RuntimeError):
    """A call to a model's server failed (connection, timeout or an unexpected status)."""


# -- the switch lock -----------------------------------------------------------------------


class LockTimeout(RuntimeError):
    """The switch lock was not acquired in time; the message names the holder."""

    def __init__(self, path: Path, timeout: float, holder: str) -> None:
        self.path = path
        self.timeout = timeout
        self.holder = holder
        super().__init__(
            f"another fleet operation holds the switch lock {path} ({holder or 'holder unknown'}); "
            f"waited {timeout:g}s. Wait for it to finish and retry, or, if that process is stuck, "
            f"end it (kill PID); the lock is released when its holder exits."
        )


# -- fleet operations ----------------------------------------------------------------------


class FleetError(RuntimeError):
    """An operation failed; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UnknownModel(FleetError):
    exit_code = 2


class ScaleOutOfRange(FleetError):
    """`scale` to a count outside the model's replica range (a usage error)."""

    exit_code = 2


@dataclass(frozen=True)
class Violation:
    """One broken placement rule (`kind`, see `fleet.states.ViolationKind`), in words, with
    the models it is about when they matter to the caller (the busy or unevictable models
    in the way of a switch)."""

    kind: ViolationKind
    message: str
    models: tuple[str, ...] = ()


class PlacementRefused(FleetError):
    """The requested models cannot be awake together with what is awake (or at all).

    `violations`: every broken rule (`Violation`). `blocking_models`: the
    awake models in the way that the operation was not allowed to evict (busy without
    force, pinned, or outside the caller's `evict`); `busy_models`: those of them serving
    requests (then the error is a `ModelsBusy`).
    """

    def __init__(self, message: str, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        lines = "\n".join(f"  - [{v.kind}] {v.message}" for v in self.violations)
        super().__init__(f"{message}\n{lines}" if lines else message)

    @property
    def busy_models(self) -> tuple[str, ...]:
        return _models_of(self.violations, {ViolationKind.BUSY})

    @property
    def blocking_models(self) -> tuple[str, ...]:
        return _models_of(self.violations, {ViolationKind.BUSY, ViolationKind.NOT_EVICTABLE})


class ModelsBusy(PlacementRefused):
    """A placement refused because a model in the way serves requests: retry when it is
    idle (or force the switch: its in-flight requests fail)."""


def placement_refused(message: str, violations: Sequence[Violation]) -> PlacementRefused:
    """`ModelsBusy` when a busy model is in the way, else `PlacementRefused`."""
    busy = any(v.kind == ViolationKind.BUSY for v in violations)
    return (ModelsBusy if busy else PlacementRefused)(message, violations)


def _models_of(violations: Sequence[Violation], kinds: set[ViolationKind]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for v in violations if v.kind in kinds for n in v.models))


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
