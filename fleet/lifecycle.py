"""The fleet's lifecycle: observe containers, plan with `fleet.planner`, act through an engine.

`Fleet` is built from injected parts (registry, engine, lock, probe, clock) and holds no
global state: the truth lives in Docker (containers, their labels) and in each model's
`/health`. Every mutating operation holds the switch lock from observation through action,
so two `fleet` processes (or a gateway activation and a CLI switch) never both decide that
the same GPU memory is free.

States a model can be in (`ModelStatus.state`, the same words the planner uses):

- absent: no container; stopped: a container that is not running (created/exited);
- loading: running, /health not answering yet; healthy: running, /health 200;
- running: running but unhealthy past its health timeout (or Docker says unhealthy);
- sleeping: vLLM sleep mode, weights offloaded (`/is_sleeping` true);
- drifted: the container was made from another spec (registry changed): `fleet up`
  recreates it. A managed container whose model left the registry is listed as drifted too.

Replicas: each replica of a model is its own container (`fleet.spec`), observed, classified
and acted on one by one; a status row is one replica. What a model "brings up" (up, switch,
wake, ensure_awake) is its *up set*: replicas 0..initial_replicas-1 plus any sleeping
replica (evicted together, they come back together). `down`, `sleep` and evictions act on
every replica of a model. `scale` starts the lowest free replica slots and retires (stops,
keeping the container for a faster start) the highest awake ones, never evicting other
models. The planner counts every awake replica against the GPU and CPU budgets.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fleet.engine import ContainerRecord, DockerUnreachable, Engine, EngineError, ImageMissing
from fleet.health import Probe, ProbeError
from fleet.lock import SwitchLock
from fleet.autoscale import replica_bounds
from fleet.planner import (
    AWAKE_STATES,
    READY_STATES,
    Eviction,
    ObservedModel,
    SwitchPlan,
    Violation,
    check_placement,
    model_state,
    plan_switch,
    replica_specs,
)
from fleet.registry import ModelSpec, Registry, replica_service_name
from fleet.spec import DEFAULT_NAME_PREFIX, LABEL_REPLICA, ContainerSpec, docker_run_kwargs

DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_LOG_LINES = 30
SLEEP_CONFIRM_SECONDS = 30.0


# ---------------------------------------------------------------------------------------
# Injected parts and results
# ---------------------------------------------------------------------------------------


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


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


# ---------------------------------------------------------------------------------------
# Observation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Seen:
    """One replica's container(s) as observed, with its classified status."""

    status: ModelStatus
    record: ContainerRecord | None
    extras: tuple[ContainerRecord, ...] = ()  # more containers labelled with the same replica

    @property
    def state(self) -> str:
        return self.status.state

    @property
    def records(self) -> tuple[ContainerRecord, ...]:
        return tuple(r for r in (self.record, *self.extras) if r is not None)


@dataclass(frozen=True)
class _ModelSeen:
    """One model as observed: every replica slot of a registry model (absent ones too) and
    any other replica index a container carries."""

    name: str
    replicas: Mapping[int, _Seen]

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


def _pick(records: Sequence[ContainerRecord], preferred_name: str | None) -> ContainerRecord:
    def key(r: ContainerRecord) -> tuple[int, int, float]:
        return (r.running, r.name == preferred_name, r.started_at or 0.0)

    return max(records, key=key)


Unit = tuple[ModelSpec, int]  # (model, replica index)


class Fleet:
    """Lifecycle of the managed models of one registry on one Docker host."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        *,
        lock: SwitchLock,
        probe: Probe,
        clock: Clock | None = None,
        busy: Callable[[str], bool] | None = None,
        last_used: Callable[[str], float] | None = None,
        progress: Callable[[str], None] | None = None,
        name_prefix: str = DEFAULT_NAME_PREFIX,
        extra_labels: Mapping[str, str] | None = None,
        network: str | None = None,
        environ: Mapping[str, str] | None = None,
        base_dir: str | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        poll_interval: float = 0.25,
        log_lines: int = DEFAULT_LOG_LINES,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.lock = lock
        self.probe = probe
        self.clock = clock or SystemClock()
        self.busy = busy
        self.last_used = last_used
        self._progress = progress
        self.name_prefix = name_prefix
        self.extra_labels = dict(extra_labels or {})
        self.network = network
        self.environ = os.environ if environ is None else environ
        if base_dir is None and registry.source:
            base_dir = str(Path(registry.source).resolve().parent)
        self.base_dir = base_dir
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self.log_lines = log_lines
        self._specs: dict[str, tuple[ContainerSpec, ...]] | None = None

    # -- helpers -------------------------------------------------------------------------

    def say(self, message: str) -> None:
        if self._progress is not None:
            self._progress(message)

    @property
    def replica_specs(self) -> dict[str, tuple[ContainerSpec, ...]]:
        """Every replica slot's container spec per managed model (pinned as compose.yaml
        pins them)."""
        if self._specs is None:
            self._specs = replica_specs(self.registry, name_prefix=self.name_prefix)
        return self._specs

    @property
    def specs(self) -> dict[str, ContainerSpec]:
        """Replica 0's container spec of every managed model."""
        return {n: specs[0] for n, specs in self.replica_specs.items()}

    def run_kwargs(self, name: str, network: str | None = None, replica: int = 0) -> dict[str, Any]:
        """docker-py create kwargs for replica `replica` of `name`, with this fleet's extra
        (scoping) labels.

        `network` (else the fleet's): a user-defined network to join, with the replica's
        service name as alias, as compose does (so a gateway in compose reaches it).
        """
        spec = self.replica_specs[name][replica]
        kwargs = docker_run_kwargs(spec, self.environ, base_dir=self.base_dir)
        kwargs["labels"] = {**kwargs.get("labels", {}), **self.extra_labels}
        net = network or self.network
        if net:
            kwargs["network"] = net
            kwargs["networking_config"] = {net: {"Aliases": [replica_service_name(name, replica)]}}
        return kwargs

    def model(self, name_or_alias: str) -> ModelSpec:
        """The managed model called `name_or_alias`; UnknownModel otherwise."""
        m = self.registry.get(name_or_alias)
        if m is None:
            known = ", ".join(n for n, s in self.registry.models.items() if s.managed) or "none"
            raise UnknownModel(f"{name_or_alias!r} is not a model or alias in "
                               f"{self.registry.source} (managed models: {known})")
        if not m.managed:
            raise UnknownModel(f"{m.name!r} is a remote model ({m.url}): the fleet routes to "
                               f"it but never starts or stops it")
        return m

    def base_url(self, m: ModelSpec, replica: int = 0) -> str:
        ip = self.registry.host_ip(m)
        if ip in ("", "0.0.0.0", "::"):
            ip = "127.0.0.1"
        if ":" in ip:
            ip = f"[{ip}]"
        return f"http://{ip}:{m.replica_port(replica)}"

    def label(self, name: str, replica: int) -> str:
        """How messages name a replica: the model's name when it has a single replica slot,
        else `name[i]`."""
        m = self.registry.models.get(name)
        single = (m.replica_slots == 1) if m is not None else True
        return name if (single and replica == 0) else f"{name}[{replica}]"

    @staticmethod
    def up_set(m: ModelSpec, ms: _ModelSeen) -> tuple[int, ...]:
        """The replicas up/switch/wake bring up: 0..initial_replicas-1 and any sleeping one."""
        sleeping = {i for i, s in ms.replicas.items()
                    if s.state == "sleeping" and i < m.replica_slots}
        return tuple(sorted({*range(m.initial_replicas), *sleeping}))

    @contextmanager
    def _locked(self, deadline: float | None = None) -> Iterator[None]:
        timeout = None if deadline is None else max(0.0, deadline - self.clock.monotonic())
        self.lock.acquire(timeout)
        try:
            yield
        finally:
            self.lock.release()

    # -- observe -------------------------------------------------------------------------

    def _observe(self, *, probe: bool = True,
                 only: Collection[str] | None = None) -> dict[str, _ModelSeen]:
        records = self.engine.list_managed(self.extra_labels)
        grouped: dict[str, dict[int, list[ContainerRecord]]] = {}
        for r in records:
            grouped.setdefault(r.model, {}).setdefault(replica_index(r), []).append(r)
        seen: dict[str, _ModelSeen] = {}
        now = self.clock.time()
        for name, m in self.registry.models.items():
            if not m.managed:
                continue
            specs = self.replica_specs[name]
            mine = grouped.pop(name, {})
            if only is not None and name not in only:
                continue
            replicas: dict[int, _Seen] = {}
            for i in sorted({*range(len(specs)), *mine}):
                recs = mine.get(i, [])
                if i < len(specs):
                    rec = _pick(recs, specs[i].name) if recs else None
                    status = self._classify(m, i, specs[i], rec, now, probe)
                else:
                    rec = _pick(recs, None)
                    status = self._stray(name, i, rec, now,
                                         f"replica {i} is beyond the {len(specs)} replica "
                                         f"slot(s) the registry gives {name}: `fleet up {name}` "
                                         f"or `fleet scale` removes it")
                replicas[i] = _Seen(status, rec, tuple(r for r in recs if r is not rec))
            seen[name] = _ModelSeen(name, replicas)
        for name, mine in grouped.items():  # managed containers the registry no longer has
            if only is not None and name not in only:
                continue
            replicas = {}
            for i, recs in sorted(mine.items()):
                rec = _pick(recs, None)
                replicas[i] = _Seen(self._stray(
                    name or "?", i, rec, now,
                    f"not in the registry: remove it with `fleet down {name}`"),
                    rec, tuple(r for r in recs if r is not rec))
            seen[name] = _ModelSeen(name, replicas)
        return seen

    @staticmethod
    def _stray(name: str, replica: int, rec: ContainerRecord, now: float,
               detail: str) -> ModelStatus:
        return ModelStatus(name=name, state="drifted", port=rec.ports[0] if rec.ports else None,
                           gpus=(), fraction=None, uptime=_uptime(rec, now), health=rec.state,
                           container=rec.name, detail=detail, replica=replica)

    def _classify(self, m: ModelSpec, replica: int, spec: ContainerSpec,
                  rec: ContainerRecord | None, now: float, probe: bool) -> ModelStatus:
        base = dict(name=m.name, port=m.replica_port(replica), gpus=tuple(m.gpus),
                    fraction=self.registry.gpu_fraction(m), replica=replica)
        if rec is None:
            return ModelStatus(state="absent", uptime=None, health="-", **base)
        uptime = _uptime(rec, now)
        common = dict(uptime=uptime, container=rec.name, **base)
        if not rec.running:
            state = "drifted" if rec.spec_hash != spec.spec_hash else "stopped"
            detail = f"container {rec.state}{_exit_note(rec)}"
            if state == "drifted":
                detail += "; the registry changed since it was made: `fleet up` recreates it"
            return ModelStatus(state=state, health="-", detail=detail, **common)
        if rec.state == "paused":
            return ModelStatus(state="running", health="paused",
                               detail="container paused (`docker unpause`)", **common)
        if rec.state == "restarting":
            return ModelStatus(state="loading", health="restarting",
                               detail=f"container restarting (restarts: {rec.restart_count})",
                               **common)
        health, sleeping, detail = "-", False, ""
        url = self.base_url(m, replica)
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
        if rec.spec_hash != spec.spec_hash:
            return ModelStatus(state="drifted", health=health,
                               detail="the registry changed since this container was made: "
                                      "`fleet up` recreates it", **common)
        if sleeping:
            state = "sleeping"
        elif health == "ok" or (not probe and rec.health == "healthy"):
            state = "healthy"
        elif rec.health == "unhealthy" or (uptime or 0.0) > self.registry.health_timeout(m):
            state, health = "running", "unhealthy"
        elif not probe and rec.health is None:
            state = "running"
        else:
            state = "loading"
        return ModelStatus(state=state, health=health, detail=detail, **common)

    def status(self, models: Collection[str] | None = None, *,
               probe: bool = True) -> list[ModelStatus]:
        """One row per replica of `models` (names; default: every managed model and every
        orphaned managed container): replicas 0..initial_replicas-1 always, others when they
        have a container. Read-only: no lock needed."""
        only = None if models is None else {self._name(x) for x in models}
        rows: list[ModelStatus] = []
        for name, ms in self._observe(probe=probe, only=only).items():
            m = self.registry.models.get(name)
            shown = m.initial_replicas if m is not None else 0
            rows += [s.status for i, s in sorted(ms.replicas.items())
                     if i < shown or s.record is not None]
        return rows

    def _name(self, model: str) -> str:
        m = self.registry.get(model)
        return m.name if m is not None else model

    def _observed_models(self, seen: Mapping[str, _ModelSeen],
                         target: str | None = None) -> dict[str, ObservedModel]:
        """The planner's view. The target's state covers its up set (ready only when all of
        it is); another model's covers its awake replicas (what an eviction acts on)."""
        out: dict[str, ObservedModel] = {}
        for name, ms in seen.items():
            m = self.registry.models.get(name)
            if m is None:
                continue
            awake = ms.awake(below=m.replica_slots)
            if name == target or not awake:
                state = model_state(ms.states(sorted({*self.up_set(m, ms), *awake})))
            else:
                state = model_state(ms.states(awake))
            busy = bool(self.busy(name)) if self.busy is not None else False
            last = float(self.last_used(name)) if self.last_used is not None else 0.0
            out[name] = ObservedModel(name, state, busy=busy, last_used=last, replicas=awake)
        return out

    @staticmethod
    def _awake(seen: Mapping[str, _ModelSeen]) -> list[str]:
        return [n for n, ms in seen.items() if ms.awake()]

    def _awake_map(self, seen: Mapping[str, _ModelSeen],
                   exclude: str | None = None) -> dict[str, tuple[int, ...]]:
        """Awake replica indices of every registry model (but `exclude`) with any awake."""
        out: dict[str, tuple[int, ...]] = {}
        for name, ms in seen.items():
            m = self.registry.models.get(name)
            if m is not None and name != exclude and (awake := ms.awake(m.replica_slots)):
                out[name] = awake
        return out

    def _state_line(self) -> str:
        try:
            seen = self._observe()
        except DockerUnreachable:
            return "unknown while the Docker daemon does not answer"
        except EngineError as exc:
            return f"unknown ({exc})"
        parts = [f"{self.label(n, i)} {s.state}" for n, ms in seen.items()
                 for i, s in sorted(ms.replicas.items()) if s.state != "absent"]
        awake = self._awake(seen)
        return (", ".join(parts) or "no containers") + \
            f"; awake: {', '.join(awake) if awake else 'none'}"

    # -- switch --------------------------------------------------------------------------

    def plan(self, target: str, *, force: bool = False) -> SwitchPlan:
        """What `switch(target)` would do now (dry run; no lock, no action)."""
        seen = self._observe()
        m = self.registry.get(target)
        replicas = None
        if m is not None and m.managed and m.name in seen:
            ms = seen[m.name]
            replicas = sorted({*self.up_set(m, ms), *ms.awake(m.replica_slots)})
        name = m.name if m is not None else target
        return plan_switch(self.registry, self._observed_models(seen, name), target,
                           force=force, replicas=replicas)

    def switch(self, target: str, *, force: bool = False, deadline: float | None = None) -> Report:
        """Make `target` awake and healthy (its up set of replicas), evicting (sleep or
        stop) what the planner says, every awake replica counted.

        `deadline` (a `clock.monotonic()` value) caps the wait for the lock and for health,
        on top of the model's own health_timeout.
        """
        m = self.model(target)
        t0 = self.clock.monotonic()
        with self._locked(deadline):
            seen = self._observe()
            ms = seen[m.name]
            want = self.up_set(m, ms)
            plan = plan_switch(self.registry, self._observed_models(seen, m.name), m.name,
                               force=force,
                               replicas=sorted({*want, *ms.awake(m.replica_slots)}))
            if plan.violations:
                raise PlacementRefused(f"cannot switch to {m.name}:", plan.violations)
            image = self.registry.image(m)
            if plan.evict and not self.engine.has_image(image):
                # Found out now, not after the evictions: nothing is left half done.
                raise ImageMissing(
                    f"cannot switch to {m.name}: its image {image} is not on this host (build "
                    f"it with scripts/build-images.sh or `docker pull {image}`); nothing was "
                    f"evicted")
            report = Report("switch", (m.name,))
            evicted = [ev.model for ev in plan.evict]
            back = (f"`fleet switch {evicted[0]}` to go back" if evicted else "")
            with self._interruptible(report, back):
                t_evict = self.clock.monotonic()
                for ev in plan.evict:
                    self._evict(ev, seen[ev.model], report)
                t_start = self.clock.monotonic()
                report.timings["evict"] = t_start - t_evict
                for i in want:
                    self._start(m, i, ms.replicas[i], report, recover_extra=back)
                t_healthy = self.clock.monotonic()
                report.timings["start"] = t_healthy - t_start
                self._wait_healthy([(m, i) for i in want], report, recover_extra=back,
                                   deadline=deadline)
                report.timings["healthy"] = self.clock.monotonic() - t_healthy
                report.timings["total"] = self.clock.monotonic() - t0
                report.awake = tuple(self._awake(self._observe()))
            return report

    @contextmanager
    def _interruptible(self, report: Report, recover_extra: str = "",
                       again: str | None = None) -> Iterator[None]:
        """Turn an engine failure part-way through acting (the Docker daemon gone, say) into
        `Interrupted`: what was done, the state now, and how to recover (run `again`, by
        default `fleet <operation> <target...>`, once the daemon answers)."""
        try:
            yield
        except EngineError as exc:
            done = [f"{self.label(a.model, a.replica)} {a.action}" + (f" ({a.note})" if a.note
                                                                      else "")
                    for a in report.actions]
            again = again or f"fleet {report.operation} {' '.join(report.target)}"
            recover = ("when the cause above is fixed (the Docker daemon answers `docker "
                       "info`), `fleet status` shows where the fleet stands; then run "
                       f"`{again}` again")
            if recover_extra:
                recover += f"; or {recover_extra}"
            raise Interrupted(f"{report.operation} {' '.join(report.target)}", exc, done,
                              self._state_line(), recover) from exc

    def _evict(self, ev: Eviction, ms: _ModelSeen, report: Report) -> None:
        """Sleep or stop every awake replica of `ev.model` (a replica that is not running
        or healthy cannot sleep: it is stopped)."""
        m = self.registry.models[ev.model]
        for i in ms.awake():
            s = ms.replicas[i]
            action = ev.action if s.state in ("healthy", "running") else "stop"
            self._evict_replica(m, i, s, action, ev.reason, report)

    def _evict_replica(self, m: ModelSpec, replica: int, seen: _Seen, action: str,
                       reason: str, report: Report) -> None:
        t = self.clock.monotonic()
        note = reason
        who = self.label(m.name, replica)
        if action == "sleep":
            self.say(f"sleeping {who} ({reason})")
            try:
                self._sleep_vllm(m, replica)
            except ProbeError as exc:
                self.say(f"sleep of {who} failed ({exc}); stopping it instead")
                note, action = f"{reason}; sleep failed, stopped instead", "stop"
        if action == "stop":
            self.say(f"stopping {who} ({reason})")
            self._stop_all(seen)
        report.actions.append(ActionTaken(m.name, action, self.clock.monotonic() - t, note,
                                          replica=replica))

    def _sleep_vllm(self, m: ModelSpec, replica: int = 0) -> None:
        url = self.base_url(m, replica)
        self.probe.sleep(url, level=1)
        deadline = self.clock.monotonic() + SLEEP_CONFIRM_SECONDS
        while self.probe.is_sleeping(url) is not True:
            if self.clock.monotonic() >= deadline:
                raise ProbeError(f"{url}/is_sleeping did not report sleeping within "
                                 f"{SLEEP_CONFIRM_SECONDS:g}s")
            self.clock.sleep(self.poll_interval)

    def _stop_all(self, seen: _Seen) -> None:
        for rec in seen.records:
            if rec.running:
                self.engine.stop(rec.id, self.stop_timeout)

    def _bring_up(self, m: ModelSpec, replica: int, seen: _Seen, report: Report) -> None:
        """Start, create, recreate or wake one replica (no waiting)."""
        t = self.clock.monotonic()
        rec = seen.record
        state = seen.state
        who = self.label(m.name, replica)
        if state in READY_STATES:
            report.actions.append(ActionTaken(m.name, "none", 0.0, f"already {state}",
                                              replica=replica))
            return
        if state == "sleeping":
            self.say(f"waking {who}")
            try:
                self.probe.wake_up(self.base_url(m, replica))
                done = "wake"
            except ProbeError as exc:
                assert rec is not None
                self.say(f"wake of {who} failed ({exc}); restarting its container")
                self.engine.stop(rec.id, self.stop_timeout)
                self.engine.start(rec.id)
                done = "restart"
        elif state == "absent":
            self.say(f"creating {who} ({self.replica_specs[m.name][replica].name})")
            self.engine.run(self.run_kwargs(m.name, network=self._peer_network(),
                                            replica=replica))
            done = "create"
        elif state == "drifted":
            assert rec is not None
            self.say(f"recreating {who}: its container was made from another spec")
            for old in seen.records:
                self.engine.remove(old.id, force=True)
            # Keep it on the network it was on (e.g. made by compose: the gateway's network).
            self.engine.run(self.run_kwargs(m.name, network=rec.networks[0] if rec.networks
                                            else None, replica=replica))
            done = "recreate"
        else:  # stopped
            assert rec is not None
            self.say(f"starting {who} ({rec.name})")
            self.engine.start(rec.id)
            done = "start"
        report.actions.append(ActionTaken(m.name, done, self.clock.monotonic() - t,
                                          replica=replica))

    def _peer_network(self) -> str | None:
        """The user-defined network the fleet's other containers share (e.g. the compose
        project's network), so a new container is reachable the same way; None if none."""
        if self.network:
            return None  # run_kwargs applies the configured one
        counts: dict[str, int] = {}
        for rec in self.engine.list_managed(self.extra_labels):
            for net in rec.networks:
                counts[net] = counts.get(net, 0) + 1
        return max(sorted(counts), key=lambda n: counts[n]) if counts else None

    def _wait_healthy(self, units: Sequence[Unit], report: Report, recover_extra: str = "",
                      deadline: float | None = None, again: str | None = None) -> None:
        """Poll until every replica answers /health 200 (and is not sleeping), or fail."""
        start = self.clock.monotonic()
        cap = float("inf") if deadline is None else deadline
        deadlines = {(m.name, i): min(start + self.registry.health_timeout(m), cap)
                     for m, i in units}
        pending = {(m.name, i): (m, i) for m, i in units}
        failures: list[ModelFailure] = []
        last: dict[tuple[str, int], str] = {}
        while pending:
            for key, (m, i) in list(pending.items()):
                rec = self._current(m.name, i)
                reason = None
                if rec is None:
                    reason = "its container disappeared"
                elif rec.state in ("exited", "dead", "created"):
                    reason = _ended_reason(rec)
                elif rec.state == "restarting":
                    reason = "its container is crash-looping (restarting)"
                else:
                    url = self.base_url(m, i)
                    h = self.probe.health(url)
                    if h.ok and not (m.sleep_mode and self.probe.is_sleeping(url)):
                        del pending[key]
                        self.say(f"{self.label(m.name, i)} healthy after "
                                 f"{self.clock.monotonic() - start:.2f}s")
                        continue
                    last[key] = h.detail or ("still sleeping" if h.ok else "")
                    if self.clock.monotonic() >= deadlines[key]:
                        waited = self.clock.monotonic() - start
                        timeout = self.registry.health_timeout(m)
                        limit = (f"its health_timeout of {timeout:g}s" if waited >= timeout
                                 else "the caller's deadline")
                        reason = (f"not healthy within {limit} (waited {waited:.1f}s; last "
                                  f"/health: {last[key] or 'no answer'})")
                if reason is not None:
                    del pending[key]
                    failures.append(self._fail(m, i, rec, reason))
            if pending:
                self.clock.sleep(self.poll_interval)
        if failures:
            raise self._start_failed(failures, report, recover_extra, again)

    def _start_failed(self, failures: Sequence[ModelFailure], report: Report,
                      recover_extra: str = "", again: str | None = None) -> StartFailed:
        names = " ".join(dict.fromkeys(f.model for f in failures))
        recover = (f"fix the cause shown above, then run "
                   f"`{again or f'fleet {report.operation} {names}'}` again")
        if recover_extra:
            recover += f"; or {recover_extra}"
        return StartFailed(failures, self._state_line(), recover)

    def _start(self, m: ModelSpec, replica: int, seen: _Seen, report: Report,
               recover_extra: str = "", again: str | None = None) -> None:
        """`_bring_up`, turning an engine refusal (port taken, no GPU runtime, image
        missing, name taken) into StartFailed, which states what is awake now. A daemon
        that does not answer is no refusal of this model: DockerUnreachable goes through
        (the operation's `_interruptible` states it as Interrupted)."""
        try:
            self._bring_up(m, replica, seen, report)
        except DockerUnreachable:
            raise
        except EngineError as exc:
            failure = ModelFailure(m.name, str(exc), None, "",
                                   replica if m.replica_slots > 1 else None)
            raise self._start_failed([failure], report, recover_extra, again) from exc

    def _current(self, name: str, replica: int = 0) -> ContainerRecord | None:
        mine = [r for r in self.engine.list_managed(self.extra_labels)
                if r.model == name and replica_index(r) == replica]
        return _pick(mine, self.replica_specs[name][replica].name) if mine else None

    def _fail(self, m: ModelSpec, replica: int, rec: ContainerRecord | None,
              reason: str) -> ModelFailure:
        which = replica if m.replica_slots > 1 else None
        if rec is None:
            return ModelFailure(m.name, reason, None, "", which)
        try:
            tail = self.engine.logs(rec.id, tail=self.log_lines)
        except EngineError as exc:
            tail = f"(logs unavailable: {exc})"
        if rec.running:
            # Free what it holds (GPU memory, cores); keep the container for `fleet logs`.
            try:
                self.engine.stop(rec.id, self.stop_timeout)
                reason += "; stopped it (container kept for `fleet logs`)"
            except EngineError as exc:
                reason += f"; could not stop it: {exc}"
        return ModelFailure(m.name, reason, rec.name, tail, which)

    def _remove_strays(self, m: ModelSpec, ms: _ModelSeen, report: Report) -> None:
        """Remove the containers of replicas beyond the model's replica slots."""
        for i, s in sorted(ms.replicas.items()):
            if i < m.replica_slots or not s.records:
                continue
            t = self.clock.monotonic()
            for rec in s.records:
                self.say(f"removing {self.label(m.name, i)} ({rec.name}): beyond the "
                         f"registry's {m.replica_slots} replica slot(s)")
                self.engine.remove(rec.id, force=True)
            report.actions.append(ActionTaken(m.name, "remove", self.clock.monotonic() - t,
                                              "beyond the registry's replica slots", i))

    # -- up / down -----------------------------------------------------------------------

    def _targets(self, models: Iterable[str] | None, *, default_autostart: bool) -> list[ModelSpec]:
        if models:
            return list({m.name: m for m in (self.model(x) for x in models)}.values())
        return [m for m in self.registry.models.values()
                if m.managed and (m.autostart or not default_autostart)]

    def up(self, models: Sequence[str] | None = None) -> Report:
        """Start (or adopt, recreate, wake) the up set of `models` (default: every autostart
        model): replicas 0..initial_replicas-1 (and sleeping ones), and wait until they are
        healthy. Refuses when they cannot be awake beside what is; never evicts."""
        targets = self._targets(models, default_autostart=True)
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self._observe()
            names = [m.name for m in targets]
            want = {m.name: self.up_set(m, seen[m.name]) for m in targets}
            after = self._awake_map(seen)
            for name, indices in want.items():
                after[name] = tuple(sorted({*after.get(name, ()), *indices}))
            violations = check_placement(self.registry, after)
            if violations:
                others = [n for n in self._awake_map(seen) if n not in names]
                hint = (f" (awake now: {', '.join(others)}; use `fleet switch MODEL` to evict "
                        f"them, or `fleet down` first)" if others else "")
                raise PlacementRefused(f"cannot bring up {', '.join(names)} together{hint}:",
                                       violations)
            report = Report("up", tuple(names))
            units: list[Unit] = []
            with self._interruptible(report):
                for m in targets:
                    ms = seen[m.name]
                    self._remove_strays(m, ms, report)
                    for i in want[m.name]:
                        units.append((m, i))
                        s = ms.replicas[i]
                        if s.state in READY_STATES:
                            report.actions.append(ActionTaken(m.name, "none", 0.0,
                                                              f"adopted ({s.state})", i))
                            continue
                        self._start(m, i, s, report)
                t1 = self.clock.monotonic()
                report.timings["start"] = t1 - t0
                self._wait_healthy(units, report)
                report.timings["healthy"] = self.clock.monotonic() - t1
                report.timings["total"] = self.clock.monotonic() - t0
                report.awake = tuple(self._awake(self._observe()))
            return report

    def down(self, models: Sequence[str] | None = None) -> Report:
        """Stop and remove every replica's container of `models` (default: every managed
        container in this fleet's label scope, including ones whose model left the
        registry)."""
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self._observe(probe=False)
            if models:
                names = []
                for x in models:
                    names.append(x if (x in seen and x not in self.registry.models)
                                 else self.model(x).name)
            else:
                names = list(seen)
            report = Report("down", tuple(names))
            with self._interruptible(report, again=" ".join(["fleet down", *(models or ())])):
                for name in names:
                    ms = seen.get(name)
                    if ms is None:
                        continue
                    for i, s in sorted(ms.replicas.items()):
                        if not s.records:
                            continue
                        t = self.clock.monotonic()
                        for rec in s.records:
                            self.say(f"removing {self.label(name, i)} ({rec.name})")
                            if rec.running:
                                self.engine.stop(rec.id, self.stop_timeout)
                            self.engine.remove(rec.id, force=True)
                        report.actions.append(ActionTaken(name, "remove",
                                                          self.clock.monotonic() - t, replica=i))
            report.timings["total"] = self.clock.monotonic() - t0
            return report

    # -- scale ---------------------------------------------------------------------------

    def scale(self, model: str, replicas: int, *, deadline: float | None = None) -> Report:
        """Start or stop replicas of `model` until `replicas` of them are awake.

        `replicas` must lie in the model's range (`fleet.autoscale.replica_bounds`:
        [min_replicas, max_replicas] when autoscaled, [1, replicas] otherwise), else
        ScaleOutOfRange (exit 2). Up: the lowest free replica slots are started (woken,
        created, restarted), refused with PlacementRefused when they do not fit beside what
        is awake (scaling never evicts another model); waits until they are healthy, within
        `deadline` (a `clock.monotonic()` value, also capping the wait for the lock). Down:
        the highest-index awake replicas are stopped, their containers kept for a faster
        start (the gateway should stop routing to them first). Under the switch lock.
        """
        m = self.model(model)
        low, high = replica_bounds(m)
        if not low <= replicas <= high:
            kind = "autoscaled between min_replicas and max_replicas" if m.autoscaled else \
                "a fixed count (`replicas` in the registry)"
            raise ScaleOutOfRange(f"cannot scale {m.name} to {replicas} replica(s): it takes "
                                  f"{low} to {high} ({kind})")
        again = f"fleet scale {m.name} {replicas}"
        t0 = self.clock.monotonic()
        with self._locked(deadline):
            seen = self._observe()
            ms = seen[m.name]
            report = Report("scale", (m.name,))
            with self._interruptible(report, again=again):
                self._remove_strays(m, ms, report)
                awake = list(ms.awake(m.replica_slots))
                if len(awake) < replicas:
                    free = [i for i in range(m.replica_slots) if i not in awake]
                    add = free[:replicas - len(awake)]
                    others = self._awake_map(seen, exclude=m.name)
                    violations = check_placement(self.registry,
                                                 {**others, m.name: sorted({*awake, *add})})
                    if violations:
                        beside = ", ".join(others) or "nothing else"
                        raise PlacementRefused(
                            f"cannot scale {m.name} to {replicas} replica(s) beside what is "
                            f"awake ({beside}); scaling never evicts (`fleet switch` does):",
                            violations)
                    for i in add:
                        self._start(m, i, ms.replicas[i], report, again=again)
                    t1 = self.clock.monotonic()
                    report.timings["start"] = t1 - t0
                    self._wait_healthy([(m, i) for i in add], report, deadline=deadline,
                                       again=again)
                    report.timings["healthy"] = self.clock.monotonic() - t1
                elif len(awake) > replicas:
                    for i in sorted(awake, reverse=True)[:len(awake) - replicas]:
                        self._evict_replica(m, i, ms.replicas[i], "stop",
                                            f"scaled to {replicas}", report)
                else:
                    report.actions.append(ActionTaken(
                        m.name, "none", 0.0, f"already {replicas} awake replica(s)"))
                report.timings["total"] = self.clock.monotonic() - t0
                report.awake = tuple(self._awake(self._observe()))
            return report

    # -- sleep / wake --------------------------------------------------------------------

    def sleep(self, model: str) -> Report:
        """Free `model`'s accelerator memory, every awake replica: vLLM sleep level 1 when
        the model has `sleep_mode` and the replica is running/healthy; otherwise stop its
        container (kept: `wake`/`switch` start it again). Each action says which was done
        (`sleep` or `stop`) and why (note: "no sleep_mode: stopped instead", "loading:
        cannot sleep, stopped instead", "sleep failed, stopped instead")."""
        m = self.model(model)
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self._observe()
            ms = seen[m.name]
            report = Report("sleep", (m.name,))
            awake = ms.awake()
            if not awake:
                state = model_state(ms.states(self.up_set(m, ms)))
                report.actions.append(ActionTaken(m.name, "none", 0.0, f"already {state}"))
            with self._interruptible(report):
                for i in awake:
                    s = ms.replicas[i]
                    can_sleep = m.sleep_mode and s.state in ("healthy", "running")
                    why = "requested" if can_sleep else (
                        "no sleep_mode: stopped instead" if not m.sleep_mode
                        else f"{s.state}: cannot sleep, stopped instead")
                    self._evict_replica(m, i, s, "sleep" if can_sleep else "stop", why, report)
                report.timings["total"] = self.clock.monotonic() - t0
                report.awake = tuple(self._awake(self._observe()))
            return report

    def wake(self, model: str) -> Report:
        """Bring `model`'s up set back (wake from sleep, or start) without evicting
        anything: refused if it does not fit beside what is awake (use `switch` for that)."""
        m = self.model(model)
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self._observe()
            ms = seen[m.name]
            want = self.up_set(m, ms)
            others = self._awake_map(seen, exclude=m.name)
            mine = sorted({*ms.awake(m.replica_slots), *want})
            violations = check_placement(self.registry, {**others, m.name: mine})
            if violations:
                raise PlacementRefused(
                    f"cannot wake {m.name} beside {', '.join(others) or 'nothing else'}; "
                    f"`fleet switch {m.name}` evicts what is in the way:", violations)
            report = Report("wake", (m.name,))
            with self._interruptible(report):
                for i in want:
                    self._start(m, i, ms.replicas[i], report)
                t1 = self.clock.monotonic()
                report.timings["start"] = t1 - t0
                self._wait_healthy([(m, i) for i in want], report)
                report.timings["healthy"] = self.clock.monotonic() - t1
                report.timings["total"] = self.clock.monotonic() - t0
                report.awake = tuple(self._awake(self._observe()))
            return report

    # -- logs ----------------------------------------------------------------------------

    def _container_of(self, model: str, replica: int = 0) -> ContainerRecord:
        seen = self._observe(probe=False)
        name = model if (model in seen and model not in self.registry.models) else \
            self.model(model).name
        ms = seen.get(name)
        s = ms.replicas.get(replica) if ms is not None else None
        if s is None or s.record is None:
            which = self.label(name, replica)
            raise FleetError(f"model {which!r} has no container (state absent); start it with "
                             f"`fleet up {name}` or `fleet switch {name}`")
        return s.record

    def logs(self, model: str, *, tail: int = 100, replica: int = 0) -> str:
        return self.engine.logs(self._container_of(model, replica).id, tail=tail)

    def follow_logs(self, model: str, *, tail: int = 100, replica: int = 0) -> Iterable[str]:
        return self.engine.follow_logs(self._container_of(model, replica).id, tail=tail)


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


def _ended_reason(rec: ContainerRecord) -> str:
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
