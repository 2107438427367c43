"""What the scheduler core hears (events) and what it tells the gateway to do (actions).

Every event carries the time it happened (`now`, seconds on the gateway's monotonic clock), so
the core never reads a clock: a test drives it with a simulated one. Plain frozen dataclasses,
no I/O, no asyncio.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Residency(StrEnum):
    """Where a model stands with respect to the resource (GPU memory or cores) it needs."""

    AWAKE = "awake"            # holds the resource, admits requests
    DRAINING = "draining"      # holds it, finishes what is in flight, admits nothing new
    ACTIVATING = "activating"  # a switch is bringing it up (holds the resource)
    EVICTING = "evicting"      # a switch or idle ttl is putting it to sleep or stopping it
    ASLEEP = "asleep"          # vLLM sleep mode: cheap to wake
    STOPPED = "stopped"        # its container exists, stopped
    ABSENT = "absent"          # no container

    @property
    def holds(self) -> bool:
        return self in _HOLDING

    @property
    def cold(self) -> bool:
        return self in _COLD


_HOLDING = frozenset({Residency.AWAKE, Residency.DRAINING, Residency.ACTIVATING})
_COLD = frozenset({Residency.ASLEEP, Residency.STOPPED, Residency.ABSENT})


class BringUp(StrEnum):
    """How a cold model comes back: the kind of switch cost it pays."""

    WAKE = "wake"      # from vLLM sleep
    START = "start"    # a stopped container started
    CREATE = "create"  # a container created (image present or pulled)

    @classmethod
    def of(cls, state: Residency) -> BringUp:
        if state is Residency.ASLEEP:
            return cls.WAKE
        return cls.START if state is Residency.STOPPED else cls.CREATE


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrive:
    """A request for `model` wants a slot. `arrived` (default `now`) orders it in line: a
    request re-queued after its upstream turned out to be down keeps its first arrival."""

    now: float
    rid: int
    model: str
    arrived: float | None = None


@dataclass(frozen=True)
class Done:
    """An admitted request finished (whatever its status): its slot is free."""

    now: float
    rid: int


@dataclass(frozen=True)
class Leave:
    """The client of a request went away: out of its queue at once, or its slot freed."""

    now: float
    rid: int


@dataclass(frozen=True)
class SwitchDone:
    """The fleet brought `target` up (having put `evicted` into the states given)."""

    now: float
    target: str
    seconds: float
    evicted: Mapping[str, Residency] = field(default_factory=dict)
    evict_seconds: float = 0.0


@dataclass(frozen=True)
class SwitchFailed:
    now: float
    target: str
    reason: str
    status: int = 503
    observed: Mapping[str, Residency] = field(default_factory=dict)
    retry: bool = False  # the fleet saw another world than the core: keep the queue, replan


@dataclass(frozen=True)
class SleepDone:
    """An idle model was put to sleep (or stopped); `state` is where it ended."""

    now: float
    model: str
    state: Residency
    ok: bool = True


@dataclass(frozen=True)
class Observed:
    """What the fleet sees (at start, after a failure, or periodically): models not in a
    transition the scheduler started take these states."""

    now: float
    states: Mapping[str, Residency]


@dataclass(frozen=True)
class Lost:
    """An admitted request found `model` not answering (connection refused): it is not awake
    after all (stopped from outside, crashed)."""

    now: float
    model: str


@dataclass(frozen=True)
class Tick:
    now: float


Event = Arrive | Done | Leave | SwitchDone | SwitchFailed | SleepDone | Observed | Lost | Tick


# -- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    rid: int
    model: str
    waited: float


@dataclass(frozen=True)
class Reject:
    rid: int
    model: str
    status: int
    message: str
    retry_after: int


@dataclass(frozen=True)
class StartSwitch:
    """Bring `target` up; `evict` (idle, drained) make room. The fleet acts, then the gateway
    reports SwitchDone or SwitchFailed."""

    target: str
    evict: tuple[str, ...]
    kind: BringUp
    reason: str


@dataclass(frozen=True)
class Drain:
    model: str
    reason: str


@dataclass(frozen=True)
class Undrain:
    model: str
    reason: str


@dataclass(frozen=True)
class PutToSleep:
    model: str
    reason: str


Action = Admit | Reject | StartSwitch | Drain | Undrain | PutToSleep
