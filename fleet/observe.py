"""Reading the world: the managed containers (by label) and each replica's /health,
classified into the states the planner and `fleet status` use (`fleet.states.ReplicaState`,
which says what each means). Read-only: nothing here acts.

A model's *up set* (`up_set`) is what up, switch and wake bring up: replicas
0..initial_replicas-1 plus any sleeping replica.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleet.clock import Clock
from fleet.containers import ContainerRecord, Engine
from fleet.errors import DockerUnreachable, EngineError
from fleet.health import Probe
from fleet.planner import ObservedModel
from fleet.registry import ModelSpec, Registry
from fleet.report import ModelStatus
from fleet.spec import LABEL_REPLICA, ContainerSpec
from fleet.states import AWAKE_STATES, ReplicaState, model_state


@dataclass(frozen=True)
class ReplicaSeen:
    """One replica's container(s) as observed, with its classified status."""

    status: ModelStatus
    record: ContainerRecord | None
    extras: tuple[ContainerRecord, ...] = ()  # more containers labelled with the same replica

    @property
    def state(self) -> ReplicaState:
        return self.status.state

    @property
    def records(self) -> tuple[ContainerRecord, ...]:
        return tuple(r for r in (self.record, *self.extras) if r is not None)


@dataclass(frozen=True)
class ModelSeen:
    """One model as observed: every replica slot of a registry model (absent ones too) and
    any other replica index a container carries."""

    name: str
    replicas: Mapping[int, ReplicaSeen]

    def awake(self, below: int | None = None) -> tuple[int, ...]:
        """Indices of the awake replicas (only those < `below` when given)."""
        return tuple(i for i, s in sorted(self.replicas.items())
                     if s.state in AWAKE_STATES and (below is None or i < below))

    def states(self, indices: Iterable[int]) -> list[str]:
        return [self.replicas[i].state for i in indices if i in self.replicas]


def replica_index(rec: ContainerRecord) -> int:
    """A container's replica index from its label (0 when missing: made before replicas)."""
    try:
        return max(0, int(rec.labels.get(LABEL_REPLICA, "0")))
    except ValueError:
        return 0


def pick_record(records: Sequence[ContainerRecord],
                preferred_name: str | None) -> ContainerRecord:
    """The container that stands for a replica when several carry its labels: a running
    one, the one with the spec's name, the latest started."""
    def key(r: ContainerRecord) -> tuple[int, int, float]:
        return (r.running, r.name == preferred_name, r.started_at or 0.0)

    return max(records, key=key)


def up_set(m: ModelSpec, ms: ModelSeen) -> tuple[int, ...]:
    """The replicas up/switch/wake bring up: 0..initial_replicas-1 and any sleeping one."""
    sleeping = {i for i, s in ms.replicas.items()
                if s.state == ReplicaState.SLEEPING and i < m.replica_slots}
    return tuple(sorted({*range(m.initial_replicas), *sleeping}))


def base_url(registry: Registry, m: ModelSpec, replica: int = 0) -> str:
    """Where the fleet reaches replica `replica` of `m` from this host."""
    ip = registry.host_ip(m)
    if ip in ("", "0.0.0.0", "::"):
        ip = "127.0.0.1"
    if ":" in ip:
        ip = f"[{ip}]"
    return f"http://{ip}:{m.replica_port(replica)}"

def replica_label(registry: Registry, name: str, replica: int) -> str:
    """How messages name a replica: the model's name when it has a single replica slot,
    else `name[i]`."""
    m = registry.models.get(name)
    single = (m.replica_slots == 1) if m is not None else True
    return name if (single and replica == 0) else f"{name}[{replica}]"


def awake_models(seen: Mapping[str, ModelSeen]) -> list[str]:
    """The models with an awake replica."""
    return [n for n, ms in seen.items() if ms.awake()]

def awake_map(registry: Registry, seen: Mapping[str, ModelSeen],
              exclude: str | None = None) -> dict[str, tuple[int, ...]]:
    """Awake replica indices of every registry model (but `exclude`) with any awake."""
    out: dict[str, tuple[int, ...]] = {}
    for name, ms in seen.items():
        m = registry.models.get(name)
        if m is not None and name != exclude and (awake := ms.awake(m.replica_slots)):
            out[name] = awake
    return out


def observed_models(registry: Registry, seen: Mapping[str, ModelSeen],
                    target: str | None = None, *,
                    busy: Callable[[str], bool] | None = None,
                    last_used: Callable[[str], float] | None = None,
                    ) -> dict[str, ObservedModel]:
    """The planner's view. The target's state covers its up set (ready only when all of
    it is); another model's covers its awake replicas (what an eviction acts on)."""
    out: dict[str, ObservedModel] = {}
    for name, ms in seen.items():
        m = registry.models.get(name)
        if m is None:
            continue
        awake = ms.awake(below=m.replica_slots)
        if name == target or not awake:
            state = model_state(ms.states(sorted({*up_set(m, ms), *awake})))
        else:
            state = model_state(ms.states(awake))
        is_busy = bool(busy(name)) if busy is not None else False
        last = float(last_used(name)) if last_used is not None else 0.0
        out[name] = ObservedModel(name, state, busy=is_busy, last_used=last, replicas=awake)
    return out


class Observer:
    """Observes the managed containers of one registry (within `extra_labels`' scope) through
    an engine and a probe. Read-only: it never acts and needs no lock."""

    def __init__(self, registry: Registry, engine: Engine, probe: Probe, clock: Clock,
                 replica_specs: Mapping[str, Sequence[ContainerSpec]],
                 extra_labels: Mapping[str, str]) -> None:
        self.registry = registry
        self.engine = engine
        self.probe = probe
        self.clock = clock
        self.replica_specs = replica_specs
        self.extra_labels = extra_labels

    def observe(self, *, probe: bool = True,
                only: Collection[str] | None = None) -> dict[str, ModelSeen]:
        """Every managed model (and every managed container in scope), replica by replica,
        classified; `probe` asks each running replica's /health (and /is_sleeping)."""
        records = self.engine.list_managed(self.extra_labels)
        grouped: dict[str, dict[int, list[ContainerRecord]]] = {}
        for r in records:
            grouped.setdefault(r.model, {}).setdefault(replica_index(r), []).append(r)
        seen: dict[str, ModelSeen] = {}
        now = self.clock.time()
        for name, m in self.registry.models.items():
            if not m.managed:
                continue
            specs = self.replica_specs[name]
            mine = grouped.pop(name, {})
            if only is not None and name not in only:
                continue
            replicas: dict[int, ReplicaSeen] = {}
            for i in sorted({*range(len(specs)), *mine}):
                recs = mine.get(i, [])
                if i < len(specs):
                    rec = pick_record(recs, specs[i].name) if recs else None
                    status = self._classify(m, i, specs[i], rec, now, probe)
                else:
                    rec = pick_record(recs, None)
                    status = self._stray(name, i, rec, now,
                                         f"replica {i} is beyond the {len(specs)} replica "
                                         f"slot(s) the registry gives {name}: `fleet up {name}` "
                                         f"or `fleet scale` removes it")
                replicas[i] = ReplicaSeen(status, rec, tuple(r for r in recs if r is not rec))
            seen[name] = ModelSeen(name, replicas)
        for name, mine in grouped.items():  # managed containers the registry no longer has
            if only is not None and name not in only:
                continue
            replicas = {}
            for i, recs in sorted(mine.items()):
                rec = pick_record(recs, None)
                replicas[i] = ReplicaSeen(self._stray(
                    name or "?", i, rec, now,
                    f"not in the registry: remove it with `fleet down {name}`"),
                    rec, tuple(r for r in recs if r is not rec))
            seen[name] = ModelSeen(name, replicas)
        return seen

    @staticmethod
    def _stray(name: str, replica: int, rec: ContainerRecord, now: float,
               detail: str) -> ModelStatus:
        return ModelStatus(name=name, state=ReplicaState.DRIFTED,
                           port=rec.ports[0] if rec.ports else None, gpus=(), fraction=None,
                           uptime=_uptime(rec, now), health=rec.state, container=rec.name,
                           detail=detail, replica=replica)

    def _classify(self, m: ModelSpec, replica: int, spec: ContainerSpec,
                  rec: ContainerRecord | None, now: float, probe: bool) -> ModelStatus:
        def row(state: ReplicaState, health: str, detail: str = "") -> ModelStatus:
            return ModelStatus(name=m.name, state=state, port=m.replica_port(replica),
                               gpus=tuple(m.gpus), fraction=self.registry.gpu_fraction(m),
                               uptime=None if rec is None else _uptime(rec, now), health=health,
                               container=None if rec is None else rec.name, detail=detail,
                               replica=replica)

        if rec is None:
            return row(ReplicaState.ABSENT, "-")
        drifted = rec.spec_hash != spec.spec_hash
        if not rec.running:
            detail = f"container {rec.state}{_exit_note(rec)}"
            if drifted:
                detail += "; the registry changed since it was made: `fleet up` recreates it"
            return row(ReplicaState.DRIFTED if drifted else ReplicaState.STOPPED, "-", detail)
        if rec.state == "paused":
            return row(ReplicaState.RUNNING, "paused", "container paused (`docker unpause`)")
        if rec.state == "restarting":
            return row(ReplicaState.LOADING, "restarting",
                       f"container restarting (restarts: {rec.restart_count})")
        health, sleeping, detail = "-", False, ""
        url = base_url(self.registry, m, replica)
        if probe:
            result = self.probe.health(url)
            if result.ok:
                health = "ok"
                if m.sleep_mode and self.probe.is_sleeping(url):
                    sleeping, health = True, "sleeping"
            else:
                health = rec.health or "starting"
                detail = f"/health: {result.detail}"
        else:
            health = rec.health or "-"
        if drifted:
            return row(ReplicaState.DRIFTED, health, "the registry changed since this "
                                                     "container was made: `fleet up` recreates it")
        uptime = _uptime(rec, now)
        if sleeping:
            state = ReplicaState.SLEEPING
        elif health == "ok" or (not probe and rec.health == "healthy"):
            state = ReplicaState.HEALTHY
        elif rec.health == "unhealthy" or (uptime or 0.0) > self.registry.health_timeout(m):
            state, health = ReplicaState.RUNNING, "unhealthy"
        elif not probe and rec.health is None:
            state = ReplicaState.RUNNING
        else:
            state = ReplicaState.LOADING
        return row(state, health, detail)

    def status(self, models: Collection[str] | None = None, *,
               probe: bool = True) -> list[ModelStatus]:
        """One row per replica of `models` (names; default: every managed model and every
        orphaned managed container): replicas 0..initial_replicas-1 always, others when they
        have a container."""
        only = None if models is None else {self._name(x) for x in models}
        rows: list[ModelStatus] = []
        for name, ms in self.observe(probe=probe, only=only).items():
            m = self.registry.models.get(name)
            shown = m.initial_replicas if m is not None else 0
            rows += [s.status for i, s in sorted(ms.replicas.items())
                     if i < shown or s.record is not None]
        return rows

    def _name(self, model: str) -> str:
        m = self.registry.get(model)
        return m.name if m is not None else model

    def state_line(self) -> str:
        """The fleet's state in one line, for a failure message: each container's state and
        what is awake; "unknown ..." when the engine does not answer."""
        try:
            seen = self.observe()
        except DockerUnreachable:
            return "unknown while the Docker daemon does not answer"
        except EngineError as exc:
            return f"unknown ({exc})"
        parts = [f"{replica_label(self.registry, n, i)} {s.state}" for n, ms in seen.items()
                 for i, s in sorted(ms.replicas.items()) if s.state != ReplicaState.ABSENT]
        awake = awake_models(seen)
        return (", ".join(parts) or "no containers") + \
            f"; awake: {', '.join(awake) if awake else 'none'}"

    def containers(self) -> dict[tuple[str, int], ContainerRecord]:
        """(model, replica) -> the container that stands for it now, from one listing (no
        probe): what a wait polls, once per round for every replica it waits for."""
        grouped: dict[tuple[str, int], list[ContainerRecord]] = {}
        for r in self.engine.list_managed(self.extra_labels):
            grouped.setdefault((r.model, replica_index(r)), []).append(r)
        out: dict[tuple[str, int], ContainerRecord] = {}
        for (name, i), recs in grouped.items():
            specs = self.replica_specs.get(name, ())
            out[(name, i)] = pick_record(recs, specs[i].name if i < len(specs) else None)
        return out


def _signal_name(rec: ContainerRecord) -> str | None:
    """SIGKILL for exit code 137 and the like (128 + signal number), else None."""
    code = rec.exit_code
    if code is None or not 128 < code < 128 + signal.NSIG:
        return None
    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return None


def _exit_note(rec: ContainerRecord) -> str:
    """How a stopped container ended, for `fleet status`: " (exit code 1)",
    " (exit code 137, OOM-killed)", " (exit code 137: SIGKILL)"; "" without a code."""
    if rec.exit_code is None:
        return ""
    if rec.oom_killed:
        return f" (exit code {rec.exit_code}, OOM-killed)"
    sig = _signal_name(rec)
    return f" (exit code {rec.exit_code}" + (f": {sig})" if sig else ")")


def ended_reason(rec: ContainerRecord) -> str:
    """Why a replica that stopped before becoming healthy failed, with Docker's OOMKilled."""
    if rec.oom_killed:
        return (f"its container was killed by the kernel's out-of-memory killer (exit code "
                f"{rec.exit_code}, Docker: OOMKilled) before becoming healthy: it needs more "
                f"memory than it may use (a memory limit on the container, or the host's free "
                f"memory: `free -m`); free memory or serve a smaller model")
    sig = _signal_name(rec)
    how = f": killed by {sig}, not by the OOM killer" if sig else ""
    return f"its container {rec.state} (exit code {rec.exit_code}{how}) before becoming healthy"


def _uptime(rec: ContainerRecord, now: float) -> float | None:
    if not rec.running or rec.started_at is None:
        return None
    return max(0.0, now - rec.started_at)
