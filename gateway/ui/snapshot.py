"""What the dashboard shows, as plain frozen dataclasses (JSON through `as_dict`).

A `Snapshot` is one moment of the fleet as one viewer may see it: the models (state, replicas,
queue, residency, ttl), the capacity bars (GPU memory fractions or the core budget), the last
switches with their phase timings, and short request series per model. Whatever feeds the
dashboard (`gateway.ui.source.DashboardSource`) builds these; the page only reads them.
Fields a source cannot know today are None (the page shows "-").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# A model's state as the page shows it. The first six are the scheduler's vocabulary
# (`evicting`: being put to sleep or stopped); `remote` is a server the fleet does not run,
# `unknown` a managed model whose containers could not be observed (no fleet client, or
# Docker not answering).
ModelState = Literal["awake", "asleep", "stopped", "activating", "draining", "evicting",
                     "remote", "unknown"]
MODEL_STATES: tuple[str, ...] = ("awake", "asleep", "stopped", "activating", "draining",
                                 "evicting", "remote", "unknown")


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica: where it runs and what the gateway and the fleet see of it."""

    index: int
    url: str
    node: str | None = None        # host or Swarm node
    port: int | None = None
    state: str = "-"               # the fleet's row state (healthy, loading, sleeping, ...)
    health: str = "-"
    outstanding: int = 0           # requests the gateway has on it now
    ejected: bool = False          # taken out by the gateway after failures
    uptime: float | None = None    # seconds since the container started
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ModelView:
    """One registry model as the dashboard shows it."""

    name: str
    state: ModelState
    managed: bool
    description: str = ""
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    replicas: tuple[ReplicaView, ...] = ()
    in_flight: int = 0
    queued: int = 0
    oldest_wait: float | None = None    # seconds the oldest queued request has waited
    time_resident: float | None = None  # seconds awake (since its last start or wake)
    ttl: float | None = None            # idle seconds before it is put to sleep
    ttl_left: float | None = None       # of that, what is left now (None while busy)
    quantum_left: float | None = None   # its time slice left while `rival` waits (scheduler)
    rival: str | None = None            # the model waiting for the resource it holds
    max_concurrency: int | None = None
    max_queue: int | None = None
    gpus: tuple[int, ...] = ()
    gpu_fraction: float | None = None
    cpus: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Share:
    """What one model holds of one capacity bar (`model` is "other" for models the viewer
    may not see)."""

    model: str
    amount: float
    state: str


@dataclass(frozen=True, slots=True)
class CapacityBar:
    """One GPU (memory fractions, capacity 1.0) or the host's core budget (cores)."""

    id: str
    label: str
    unit: Literal["fraction", "cores"]
    capacity: float
    ceiling: float       # what the planner lets awake models hold together
    reserved: float = 0.0  # held by something that is not a model (the gateway's cores)
    shares: tuple[Share, ...] = ()


@dataclass(frozen=True, slots=True)
class ActionView:
    """One thing a switch did to one replica."""

    model: str
    action: str
    seconds: float
    note: str = ""
    replica: int = 0


@dataclass(frozen=True, slots=True)
class SwitchView:
    """A switch, activation or sleep, newest first in a snapshot."""

    model: str
    operation: str                  # switch, activation, wake, sleep (or the scheduler's kind)
    at: float                       # unix time it ended (started, while running)
    outcome: str                    # ok, already_awake, busy, failed, running
    seconds: float
    reason: str = ""                # why it happened, or why it failed
    timings: dict[str, float] = field(default_factory=dict)  # evict, start, healthy, total
    actions: tuple[ActionView, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelSeries:
    """Per interval of a `Series`: requests per second, mean time to first chunk (seconds,
    None when no stream started), errors per second (429 and 5xx answers)."""

    rate: tuple[float, ...]
    ttft: tuple[float | None, ...]
    errors: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Series:
    """Request figures over the last minutes: `t` holds the end (unix time) of each
    interval, oldest first; every model's tuples have the same length."""

    interval: float
    t: tuple[float, ...] = ()
    models: dict[str, ModelSeries] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The fleet at one moment, as one viewer may see it."""

    generated_at: float                      # unix time
    registry_source: str
    models: tuple[ModelView, ...]
    capacity: tuple[CapacityBar, ...] = ()
    switches: tuple[SwitchView, ...] = ()
    series: Series = field(default_factory=lambda: Series(interval=0.0))
    activation: bool = False                 # the gateway can act through a fleet
    fleet_error: str | None = None           # why the fleet's view is missing or stale
    scheduler: bool = False                  # the fields only a scheduler knows are filled

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
