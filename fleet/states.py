"""The fleet's vocabulary: replica states, actions, bring-up kinds, report phases, placement
violation kinds and pull policies.

Each is a `StrEnum`: a member compares equal to its plain word (`ReplicaState.HEALTHY ==
"healthy"`), prints as it and serializes to it in JSON, so `fleet status --json`, reports
and messages show the same words as before. Pure: no Docker, no I/O; the gateway imports it.

Replica states (`ReplicaState`, a row of `fleet status`, the planner's words too):

- absent: no container; stopped: a container that is not running (created, exited);
- loading: running, /health not answering yet; healthy: running, /health 200;
- running: running but unhealthy past its health timeout (or Docker says unhealthy), or
  running and not probed;
- sleeping: vLLM sleep mode, weights offloaded (`/is_sleeping` true);
- drifted: the container was made from another spec (the registry changed; `fleet up`
  recreates it), or its model left the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class ReplicaState(StrEnum):
    ABSENT = "absent"
    STOPPED = "stopped"
    LOADING = "loading"
    HEALTHY = "healthy"
    RUNNING = "running"
    SLEEPING = "sleeping"
    DRIFTED = "drifted"


# Awake: holds accelerator memory and cores (a drifted container may be running).
AWAKE_STATES = frozenset({ReplicaState.RUNNING, ReplicaState.HEALTHY, ReplicaState.LOADING,
                          ReplicaState.DRIFTED})
# Ready: serving or about to (nothing to start).
READY_STATES = frozenset({ReplicaState.RUNNING, ReplicaState.HEALTHY, ReplicaState.LOADING})


def model_state(replica_states: Iterable[str]) -> ReplicaState:
    """One word for a model from its replicas' states (the replicas that matter: those that
    should be up). All ready: the least ready of them (loading, then running, then healthy);
    otherwise drifted, sleeping, stopped, absent, the first present in that order."""
    states = [ReplicaState(s) for s in replica_states]
    if not states:
        return ReplicaState.ABSENT
    if all(s in READY_STATES for s in states):
        order = (ReplicaState.LOADING, ReplicaState.RUNNING, ReplicaState.HEALTHY)
        return next(s for s in order if s in states)
    for s in (ReplicaState.DRIFTED, ReplicaState.SLEEPING, ReplicaState.STOPPED):
        if s in states:
            return s
    return ReplicaState.ABSENT


class Action(StrEnum):
    """What an operation did to one replica (`ActionTaken.action`)."""

    SLEEP = "sleep"
    STOP = "stop"
    WAKE = "wake"
    START = "start"
    RESTART = "restart"
    CREATE = "create"
    RECREATE = "recreate"
    REMOVE = "remove"
    PULL = "pull"
    NONE = "none"


class BringUp(StrEnum):
    """How a model was brought up, cheapest first: woken from vLLM sleep (seconds), its
    stopped container started (a full model load), or a container created (a full load,
    and the image pulled first when it was missing)."""

    WAKE = "wake"
    START = "start"
    CREATE = "create"

    @classmethod
    def of(cls, action: str) -> BringUp | None:
        """The bring-up kind of an action: wake; start and restart; create and recreate;
        None for an action that brings nothing up."""
        return _BRING_UP.get(Action(action)) if action in _ACTIONS else None

    @property
    def cost(self) -> int:
        return _COST[self]


_BRING_UP = {Action.WAKE: BringUp.WAKE, Action.START: BringUp.START,
             Action.RESTART: BringUp.START, Action.CREATE: BringUp.CREATE,
             Action.RECREATE: BringUp.CREATE}
_ACTIONS = frozenset(a.value for a in Action)
_COST = {BringUp.WAKE: 0, BringUp.START: 1, BringUp.CREATE: 2}


class Phase(StrEnum):
    """The phases an operation reports timings for (`Report.timings` keys, seconds):
    pull (images fetched before anything else), evict (other models put to sleep or
    stopped), start (containers woken, started or created: no waiting), healthy (the wait
    until every replica answered /health), total (the whole operation, lock wait
    included)."""

    PULL = "pull"
    EVICT = "evict"
    START = "start"
    HEALTHY = "healthy"
    TOTAL = "total"


class ViolationKind(StrEnum):
    """Why a set of models cannot be awake together (`fleet.placement.Violation.kind`)."""

    GPU_OVERCOMMIT = "gpu-overcommit"
    DEDICATED_CONFLICT = "dedicated-conflict"
    UNKNOWN_GPU = "unknown-gpu"
    TENSOR_PARALLEL = "tensor-parallel"
    CPU_OVERSUBSCRIBED = "cpu-oversubscribed"
    UNKNOWN_MODEL = "unknown-model"
    REMOTE_MODEL = "remote-model"
    UNKNOWN_NODE = "unknown-node"  # on a Swarm: no node can run the model
    BUSY = "busy"                  # the models in the way serve requests (no force)
    NOT_EVICTABLE = "not-evictable"  # the models in the way are pinned, or not allowed
    SPEC = "spec"                  # the model cannot be turned into a container


class PullPolicy(StrEnum):
    """When the fleet pulls a model's image before creating its container (registry field
    `pull`, per model or in `[defaults]`): missing (only when not on the host), always
    (every create: picks up a moved tag), never (fail if it is missing)."""

    MISSING = "missing"
    ALWAYS = "always"
    NEVER = "never"
