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
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fleet.engine import ContainerRecord, Engine, EngineError
from fleet.health import Probe, ProbeError
from fleet.lock import SwitchLock
from fleet.planner import (
    AWAKE_STATES,
    Eviction,
    ObservedModel,
    SwitchPlan,
    Violation,
    check_placement,
    fleet_specs,
    plan_switch,
)
from fleet.registry import ModelSpec, Registry, service_name
from fleet.spec import DEFAULT_NAME_PREFIX, ContainerSpec, docker_run_kwargs

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


class StartFailed(FleetError):
    """One or more models did not become healthy; the message has their logs and the state."""

    def __init__(self, failures: Sequence[ModelFailure], state: str, recover: str) -> None:
        self.failures = tuple(failures)
        self.state = state
        self.recover = recover
        parts: list[str] = []
        for f in self.failures:
            parts.append(f"model {f.model!r} failed to start: {f.reason}")
            if f.log_tail.strip():
                parts.append(f"--- last log lines of {f.container} ---")
                parts.append(f.log_tail.rstrip("\n"))
                parts.append("---")
        parts.append(f"fleet state now: {state}")
        parts.append(f"to recover: {recover}")
        super().__init__("\n".join(parts))


@dataclass(frozen=True)
class ModelStatus:
    """One row of `fleet status`."""

    name: str
    state: str
    port: int | None
    gpus: tuple[int, ...]
    fraction: float | None
    uptime: float | None
    health: str
    container: str | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = list(self.gpus)
        d["uptime"] = None if self.uptime is None else round(self.uptime, 1)
        return d


@dataclass(frozen=True)
class ActionTaken:
    model: str
    action: str  # sleep, stop, wake, start, create, recreate, remove, none
    seconds: float
    note: str = ""


@dataclass
class Report:
    """What an operation did, with phase timings in seconds (evict, start, healthy, total)."""

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
    """One model's container(s) as observed, with its classified status."""

    status: ModelStatus
    record: ContainerRecord | None
    extras: tuple[ContainerRecord, ...] = ()  # more containers labelled with the same model


def _pick(records: Sequence[ContainerRecord], preferred_name: str | None) -> ContainerRecord:
    def key(r: ContainerRecord) -> tuple[int, int, float]:
        return (r.running, r.name == preferred_name, r.started_at or 0.0)

    return max(records, key=key)


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
        self._specs: dict[str, ContainerSpec] | None = None

    # -- helpers -------------------------------------------------------------------------

    def say(self, message: str) -> None:
        if self._progress is not None:
            self._progress(message)

    @property
    def specs(self) -> dict[str, ContainerSpec]:
        """Every managed model's container spec (pinned as compose.yaml pins them)."""
        if self._specs is None:
            self._specs = fleet_specs(self.registry, name_prefix=self.name_prefix)
        return self._specs

    def run_kwargs(self, name: str, network: str | None = None) -> dict[str, Any]:
        """docker-py create kwargs for `name`, with this fleet's extra (scoping) labels.

        `network` (else the fleet's): a user-defined network to join, with the model's
        service name as alias, as compose does (so a gateway in compose reaches it).
        """
        kwargs = docker_run_kwargs(self.specs[name], self.environ, base_dir=self.base_dir)
        kwargs["labels"] = {**kwargs.get("labels", {}), **self.extra_labels}
        net = network or self.network
        if net:
            kwargs["network"] = net
            kwargs["networking_config"] = {net: {"Aliases": [service_name(name)]}}
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

    def base_url(self, m: ModelSpec) -> str:
        ip = self.registry.host_ip(m)
        if ip in ("", "0.0.0.0", "::"):
            ip = "127.0.0.1"
        if ":" in ip:
            ip = f"[{ip}]"
        return f"http://{ip}:{m.port}"

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
                 only: Collection[str] | None = None) -> dict[str, _Seen]:
        records = self.engine.list_managed(self.extra_labels)
        grouped: dict[str, list[ContainerRecord]] = {}
        for r in records:
            grouped.setdefault(r.model, []).append(r)
        seen: dict[str, _Seen] = {}
        now = self.clock.time()
        for name, m in self.registry.models.items():
            if not m.managed:
                continue
            spec = self.specs[name]
            mine = grouped.pop(name, [])
            if only is not None and name not in only:
                continue
            rec = _pick(mine, spec.name) if mine else None
            extras = tuple(r for r in mine if r is not rec)
            seen[name] = _Seen(self._classify(m, spec, rec, now, probe), rec, extras)
        for name, mine in grouped.items():  # managed containers the registry no longer has
            if only is not None and name not in only:
                continue
            rec = _pick(mine, None)
            seen[name] = _Seen(ModelStatus(
                name=name or "?", state="drifted", port=rec.ports[0] if rec.ports else None,
                gpus=(), fraction=None, uptime=_uptime(rec, now),
                health=rec.state, container=rec.name,
                detail="not in the registry: remove it with `fleet down "
                       f"{name}`"), rec, tuple(r for r in mine if r is not rec))
        return seen

    def _classify(self, m: ModelSpec, spec: ContainerSpec, rec: ContainerRecord | None,
                  now: float, probe: bool) -> ModelStatus:
        base = dict(name=m.name, port=m.port, gpus=tuple(m.gpus),
                    fraction=self.registry.gpu_fraction(m))
        if rec is None:
            return ModelStatus(state="absent", uptime=None, health="-", **base)
        uptime = _uptime(rec, now)
        common = dict(uptime=uptime, container=rec.name, **base)
        if not rec.running:
            code = f" (exit code {rec.exit_code})" if rec.exit_code is not None else ""
            state = "drifted" if rec.spec_hash != spec.spec_hash else "stopped"
            detail = (f"container {rec.state}{code}")
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
        if probe:
            result = self.probe.health(self.base_url(m))
            if result.ok:
                health = "ok"
                if m.sleep_mode and self.probe.is_sleeping(self.base_url(m)):
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
        """The state of `models` (names; default: every managed model and every orphaned
        managed container). Read-only: no lock needed."""
        only = None if models is None else {self._name(x) for x in models}
        return [s.status for s in self._observe(probe=probe, only=only).values()]

    def _name(self, model: str) -> str:
        m = self.registry.get(model)
        return m.name if m is not None else model

    def _observed_models(self, seen: Mapping[str, _Seen]) -> dict[str, ObservedModel]:
        out: dict[str, ObservedModel] = {}
        for name, s in seen.items():
            if name not in self.registry.models:
                continue
            busy = bool(self.busy(name)) if self.busy is not None else False
            last = float(self.last_used(name)) if self.last_used is not None else 0.0
            out[name] = ObservedModel(name, s.status.state, busy=busy, last_used=last)
        return out

    @staticmethod
    def _awake(seen: Mapping[str, _Seen]) -> list[str]:
        return [n for n, s in seen.items() if s.status.state in AWAKE_STATES]

    def _state_line(self) -> str:
        try:
            seen = self._observe()
        except EngineError as exc:
            return f"unknown ({exc})"
        parts = [f"{n} {s.status.state}" for n, s in seen.items() if s.status.state != "absent"]
        awake = self._awake(seen)
        return (", ".join(parts) or "no containers") + \
            f"; awake: {', '.join(awake) if awake else 'none'}"

    # -- switch --------------------------------------------------------------------------

    def plan(self, target: str, *, force: bool = False) -> SwitchPlan:
        """What `switch(target)` would do now (dry run; no lock, no action)."""
        seen = self._observe()
        return plan_switch(self.registry, self._observed_models(seen), target, force=force)

    def switch(self, target: str, *, force: bool = False, deadline: float | None = None) -> Report:
        """Make `target` awake and healthy, evicting (sleep or stop) what the planner says.

        `deadline` (a `clock.monotonic()` value) caps the wait for the lock and for health,
        on top of the model's own health_timeout.
        """
        m = self.model(target)
        t0 = self.clock.monotonic()
        with self._locked(deadline):
            seen = self._observe()
            plan = plan_switch(self.registry, self._observed_models(seen), m.name, force=force)
            if plan.violations:
                raise PlacementRefused(f"cannot switch to {m.name}:", plan.violations)
            report = Report("switch", (m.name,))
            t_evict = self.clock.monotonic()
            for ev in plan.evict:
                self._evict(ev, seen[ev.model], report)
            t_start = self.clock.monotonic()
            report.timings["evict"] = t_start - t_evict
            evicted = [ev.model for ev in plan.evict]
            back = (f"`fleet switch {evicted[0]}` to go back" if evicted else "")
            self._start(m, seen[m.name], plan.start_action, report, recover_extra=back)
            t_healthy = self.clock.monotonic()
            report.timings["start"] = t_healthy - t_start
            self._wait_healthy([m], report, recover_extra=back, deadline=deadline)
            report.timings["healthy"] = self.clock.monotonic() - t_healthy
            report.timings["total"] = self.clock.monotonic() - t0
            report.awake = tuple(self._awake(self._observe()))
            return report

    def _evict(self, ev: Eviction, seen: _Seen, report: Report) -> None:
        m = self.registry.models[ev.model]
        t = self.clock.monotonic()
        note = ev.reason
        action = ev.action
        if action == "sleep":
            self.say(f"sleeping {ev.model} ({ev.reason})")
            try:
                self._sleep_vllm(m)
            except ProbeError as exc:
                self.say(f"sleep of {ev.model} failed ({exc}); stopping it instead")
                note, action = f"{ev.reason}; sleep failed, stopped instead", "stop"
        if action == "stop":
            self.say(f"stopping {ev.model} ({ev.reason})")
            self._stop_all(seen)
        report.actions.append(ActionTaken(ev.model, action, self.clock.monotonic() - t, note))

    def _sleep_vllm(self, m: ModelSpec) -> None:
        url = self.base_url(m)
        self.probe.sleep(url, level=1)
        deadline = self.clock.monotonic() + SLEEP_CONFIRM_SECONDS
        while self.probe.is_sleeping(url) is not True:
            if self.clock.monotonic() >= deadline:
                raise ProbeError(f"{url}/is_sleeping did not report sleeping within "
                                 f"{SLEEP_CONFIRM_SECONDS:g}s")
            self.clock.sleep(self.poll_interval)

    def _stop_all(self, seen: _Seen) -> None:
        for rec in (seen.record, *seen.extras):
            if rec is not None and rec.running:
                self.engine.stop(rec.id, self.stop_timeout)

    def _bring_up(self, m: ModelSpec, seen: _Seen, action: str, report: Report) -> None:
        """Start, create, recreate or wake one model (no waiting)."""
        t = self.clock.monotonic()
        rec = seen.record
        state = seen.status.state
        if action == "none" and state in ("healthy", "loading", "running"):
            report.actions.append(ActionTaken(m.name, "none", 0.0, f"already {state}"))
            return
        if state == "sleeping":
            self.say(f"waking {m.name}")
            try:
                self.probe.wake_up(self.base_url(m))
                done = "wake"
            except ProbeError as exc:
                assert rec is not None
                self.say(f"wake of {m.name} failed ({exc}); restarting its container")
                self.engine.stop(rec.id, self.stop_timeout)
                self.engine.start(rec.id)
                done = "restart"
        elif state == "absent":
            self.say(f"creating {m.name} ({self.specs[m.name].name})")
            self.engine.run(self.run_kwargs(m.name, network=self._peer_network()))
            done = "create"
        elif state == "drifted":
            assert rec is not None
            self.say(f"recreating {m.name}: its container was made from another spec")
            for old in (rec, *seen.extras):
                self.engine.remove(old.id, force=True)
            # Keep it on the network it was on (e.g. made by compose: the gateway's network).
            self.engine.run(self.run_kwargs(m.name, network=rec.networks[0] if rec.networks
                                            else None))
            done = "recreate"
        elif state == "stopped":
            assert rec is not None
            self.say(f"starting {m.name} ({rec.name})")
            self.engine.start(rec.id)
            done = "start"
        else:  # running/healthy/loading reached with another action: nothing to do
            done = "none"
        report.actions.append(ActionTaken(m.name, done, self.clock.monotonic() - t))

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

    def _wait_healthy(self, models: Sequence[ModelSpec], report: Report,
                      recover_extra: str = "", deadline: float | None = None) -> None:
        """Poll until every model answers /health 200 (and is not sleeping), or fail."""
        start = self.clock.monotonic()
        cap = float("inf") if deadline is None else deadline
        deadlines = {m.name: min(start + self.registry.health_timeout(m), cap) for m in models}
        pending = {m.name: m for m in models}
        failures: list[ModelFailure] = []
        last: dict[str, str] = {}
        while pending:
            for name, m in list(pending.items()):
                rec = self._current(name)
                reason = None
                if rec is None:
                    reason = "its container disappeared"
                elif rec.state in ("exited", "dead", "created"):
                    reason = f"its container {rec.state} (exit code {rec.exit_code}) before " \
                             f"becoming healthy"
                elif rec.state == "restarting":
                    reason = "its container is crash-looping (restarting)"
                else:
                    h = self.probe.health(self.base_url(m))
                    if h.ok and not (m.sleep_mode and self.probe.is_sleeping(self.base_url(m))):
                        del pending[name]
                        self.say(f"{name} healthy after "
                                 f"{self.clock.monotonic() - start:.2f}s")
                        continue
                    last[name] = h.detail or ("still sleeping" if h.ok else "")
                    if self.clock.monotonic() >= deadlines[name]:
                        waited = self.clock.monotonic() - start
                        timeout = self.registry.health_timeout(m)
                        limit = (f"its health_timeout of {timeout:g}s" if waited >= timeout
                                 else "the caller's deadline")
                        reason = (f"not healthy within {limit} (waited {waited:.1f}s; last "
                                  f"/health: {last[name] or 'no answer'})")
                if reason is not None:
                    del pending[name]
                    failures.append(self._fail(name, rec, reason))
            if pending:
                self.clock.sleep(self.poll_interval)
        if failures:
            names = [f.model for f in failures]
            raise self._start_failed(failures, report, recover_extra)

    def _start_failed(self, failures: Sequence[ModelFailure], report: Report,
                      recover_extra: str = "") -> StartFailed:
        names = " ".join(f.model for f in failures)
        recover = (f"fix the cause shown above, then run `fleet {report.operation} {names}` "
                   f"again")
        if recover_extra:
            recover += f"; or {recover_extra}"
        return StartFailed(failures, self._state_line(), recover)

    def _start(self, m: ModelSpec, seen: _Seen, action: str, report: Report,
               recover_extra: str = "") -> None:
        """`_bring_up`, turning an engine refusal (port taken, no GPU runtime, image
        missing, name taken) into StartFailed, which states what is awake now."""
        try:
            self._bring_up(m, seen, action, report)
        except EngineError as exc:
            raise self._start_failed([ModelFailure(m.name, str(exc), None, "")], report,
                                     recover_extra) from exc

    def _current(self, name: str) -> ContainerRecord | None:
        mine = [r for r in self.engine.list_managed(self.extra_labels) if r.model == name]
        return _pick(mine, self.specs[name].name) if mine else None

    def _fail(self, name: str, rec: ContainerRecord | None, reason: str) -> ModelFailure:
        if rec is None:
            return ModelFailure(name, reason, None, "")
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
        return ModelFailure(name, reason, rec.name, tail)

    # -- up / down -----------------------------------------------------------------------

    def _targets(self, models: Iterable[str] | None, *, default_autostart: bool) -> list[ModelSpec]:
        if models:
            return list({m.name: m for m in (self.model(x) for x in models)}.values())
        return [m for m in self.registry.models.values()
                if m.managed and (m.autostart or not default_autostart)]

    def up(self, models: Sequence[str] | None = None) -> Report:
        """Start (or adopt, recreate, wake) `models` (default: every autostart model) and
        wait until they are healthy. Refuses when they cannot be awake beside what is."""
        targets = self._targets(models, default_autostart=True)
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self._observe()
            names = [m.name for m in targets]
            awake = [n for n in self._awake(seen) if n in self.registry.models]
            violations = check_placement(self.registry, list(dict.fromkeys([*awake, *names])))
            if violations:
                others = [n for n in awake if n not in names]
                hint = (f" (awake now: {', '.join(others)}; use `fleet switch MODEL` to evict "
                        f"them, or `fleet down` first)" if others else "")
                raise PlacementRefused(f"cannot bring up {', '.join(names)} together{hint}:",
                                       violations)
            report = Report("up", tuple(names))
            for m in targets:
                s = seen[m.name]
                if s.status.state in ("healthy", "loading", "running"):
                    report.actions.append(ActionTaken(m.name, "none", 0.0,
                                                      f"adopted ({s.status.state})"))
                    continue
                self._start(m, s, "start", report)
            t1 = self.clock.monotonic()
            report.timings["start"] = t1 - t0
            self._wait_healthy(targets, report)
            report.timings["healthy"] = self.clock.monotonic() - t1
            report.timings["total"] = self.clock.monotonic() - t0
            report.awake = tuple(self._awake(self._observe()))
            return report

    def down(self, models: Sequence[str] | None = None) -> Report:
        """Stop and remove the containers of `models` (default: every managed container in
        this fleet's label scope, including ones whose model left the registry)."""
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
            for name in names:
                s = seen.get(name)
                if s is None or s.record is None:
                    continue
                t = self.clock.monotonic()
                for rec in (s.record, *s.extras):
                    self.say(f"removing {name} ({rec.name})")
                    if rec.running:
                        self.engine.stop(rec.id, self.stop_timeout)
                    self.engine.remove(rec.id, force=True)
                report.actions.append(ActionTaken(name, "remove", self.clock.monotonic() - t))
            report.timings["total"] = self.clock.monotonic() - t0
            return report

    # -- sleep / wake --------------------------------------------------------------------

    def sleep(self, model: str) -> Report:
        """Free `model`'s accelerator memory: vLLM sleep level 1 when it has `sleep_mode`,
        else (or when sleeping fails) stop its container."""
        m = self.model(model)
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self._observe()
            s = seen[m.name]
            report = Report("sleep", (m.name,))
            state = s.status.state
            if state in ("absent", "stopped", "sleeping"):
                report.actions.append(ActionTaken(m.name, "none", 0.0, f"already {state}"))
            else:
                can_sleep = m.sleep_mode and state in ("healthy", "running")
                why = "requested" if can_sleep else (
                    "no sleep_mode: stopped instead" if not m.sleep_mode
                    else f"{state}: cannot sleep, stopped instead")
                self._evict(Eviction(m.name, "sleep" if can_sleep else "stop", why), s, report)
            report.timings["total"] = self.clock.monotonic() - t0
            report.awake = tuple(self._awake(self._observe()))
            return report

    def wake(self, model: str) -> Report:
        """Bring `model` back (wake from sleep, or start) without evicting anything: refused
        if it does not fit beside what is awake (use `switch` for that)."""
        m = self.model(model)
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self._observe()
            s = seen[m.name]
            awake = [n for n in self._awake(seen) if n in self.registry.models and n != m.name]
            violations = check_placement(self.registry, [*awake, m.name])
            if violations:
                raise PlacementRefused(
                    f"cannot wake {m.name} beside {', '.join(awake)}; `fleet switch {m.name}` "
                    f"evicts what is in the way:", violations)
            report = Report("wake", (m.name,))
            action = "none" if s.status.state in ("healthy", "loading", "running") else "start"
            self._start(m, s, action, report)
            t1 = self.clock.monotonic()
            report.timings["start"] = t1 - t0
            self._wait_healthy([m], report)
            report.timings["healthy"] = self.clock.monotonic() - t1
            report.timings["total"] = self.clock.monotonic() - t0
            report.awake = tuple(self._awake(self._observe()))
            return report

    # -- logs ----------------------------------------------------------------------------

    def _container_of(self, model: str) -> ContainerRecord:
        seen = self._observe(probe=False)
        name = model if (model in seen and model not in self.registry.models) else \
            self.model(model).name
        s = seen.get(name)
        if s is None or s.record is None:
            raise FleetError(f"model {name!r} has no container (state absent); start it with "
                             f"`fleet up {name}` or `fleet switch {name}`")
        return s.record

    def logs(self, model: str, *, tail: int = 100) -> str:
        return self.engine.logs(self._container_of(model).id, tail=tail)

    def follow_logs(self, model: str, *, tail: int = 100) -> Iterable[str]:
        return self.engine.follow_logs(self._container_of(model).id, tail=tail)


def _uptime(rec: ContainerRecord, now: float) -> float | None:
    if not rec.running or rec.started_at is None:
        return None
    return max(0.0, now - rec.started_at)
