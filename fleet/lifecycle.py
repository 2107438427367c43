"""The fleet's lifecycle: observe containers, plan with `fleet.planner`, act through an engine.

`Fleet` is built from injected parts (registry, engine, lock, probe, clock) and holds no
global state: the truth lives in Docker (containers, their labels) and in each model's
`/health`. Every mutating operation holds the switch lock from observation through action,
so two `fleet` processes (or a gateway activation and a CLI switch) never both decide that
the same GPU memory is free.

Reading the world (containers -> classified replica states, status rows) is
`fleet.observe`; what an operation returns or raises (Report, FleetError...) is
`fleet.report`. This module acts: up, down, switch, sleep, wake, scale, logs, and the waits
for health.

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
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet.autoscale import replica_bounds
from fleet.clock import Clock, SystemClock
from fleet.compose import compose_member_labels, project_on_network
from fleet.engine import (
    ContainerRecord,
    DockerUnreachable,
    Engine,
    EngineError,
    ImageMissing,
)
from fleet.health import Probe, ProbeError
from fleet.lock import SwitchLock
from fleet.observe import (
    ModelSeen,
    Observer,
    ReplicaSeen,
    awake_map,
    awake_models,
    base_url,
    ended_reason,
    observed_models,
    replica_label,
    up_set,
)
from fleet.planner import (
    READY_STATES,
    Eviction,
    ObservedModel,
    SwitchPlan,
    check_placement,
    model_state,
    plan_switch,
    replica_specs,
)
from fleet.registry import ModelSpec, Registry, replica_service_name
from fleet.report import (
    ActionTaken,
    FleetError,
    Interrupted,
    ModelFailure,
    ModelStatus,
    PlacementRefused,
    Report,
    ScaleOutOfRange,
    StartFailed,
    UnknownModel,
)
from fleet.spec import DEFAULT_NAME_PREFIX, ContainerSpec, docker_run_kwargs

DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_LOG_LINES = 30
SLEEP_CONFIRM_SECONDS = 30.0


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
        compose_project: str | None = None,
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
        self.compose_project = compose_project
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
            service = replica_service_name(name, replica)
            kwargs["network"] = net
            kwargs["networking_config"] = {net: {"Aliases": [service]}}
            # On a compose project's network: join the project (`docker compose down` removes it).
            project = self.compose_project or project_on_network(
                self.engine.list_managed(self.extra_labels), net)
            if project:
                kwargs["labels"].update(compose_member_labels(project, service))
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

    def label(self, name: str, replica: int) -> str:
        """How messages name a replica: `name`, or `name[i]` for a model with several
        replica slots (`fleet.observe.replica_label`)."""
        return replica_label(self.registry, name, replica)

    @property
    def observer(self) -> Observer:
        """Reads the world with this fleet's parts (made on each use: it holds no state)."""
        return Observer(self.registry, self.engine, self.probe, self.clock, self.replica_specs,
                        self.extra_labels)

    def status(self, models: Collection[str] | None = None, *,
               probe: bool = True) -> list[ModelStatus]:
        """One row per replica of `models` (names; default: every managed model and every
        orphaned managed container): replicas 0..initial_replicas-1 always, others when they
        have a container. Read-only: no lock needed."""
        return self.observer.status(models, probe=probe)

    def _observed_models(self, seen: Mapping[str, ModelSeen],
                         target: str | None = None) -> dict[str, ObservedModel]:
        return observed_models(self.registry, seen, target, busy=self.busy,
                               last_used=self.last_used)

    @contextmanager
    def _locked(self, deadline: float | None = None) -> Iterator[None]:
        timeout = None if deadline is None else max(0.0, deadline - self.clock.monotonic())
        self.lock.acquire(timeout)
        try:
            yield
        finally:
            self.lock.release()

    # -- switch --------------------------------------------------------------------------

    def plan(self, target: str, *, force: bool = False) -> SwitchPlan:
        """What `switch(target)` would do now (dry run; no lock, no action)."""
        seen = self.observer.observe()
        m = self.registry.get(target)
        replicas = None
        if m is not None and m.managed and m.name in seen:
            ms = seen[m.name]
            replicas = sorted({*up_set(m, ms), *ms.awake(m.replica_slots)})
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
            seen = self.observer.observe()
            ms = seen[m.name]
            want = up_set(m, ms)
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
                report.awake = tuple(awake_models(self.observer.observe()))
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
                              self.observer.state_line(), recover) from exc

    def _evict(self, ev: Eviction, ms: ModelSeen, report: Report) -> None:
        """Sleep or stop every awake replica of `ev.model` (a replica that is not running
        or healthy cannot sleep: it is stopped)."""
        m = self.registry.models[ev.model]
        for i in ms.awake():
            s = ms.replicas[i]
            action = ev.action if s.state in ("healthy", "running") else "stop"
            self._evict_replica(m, i, s, action, ev.reason, report)

    def _evict_replica(self, m: ModelSpec, replica: int, seen: ReplicaSeen, action: str,
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
        url = base_url(self.registry, m, replica)
        self.probe.sleep(url, level=1)
        deadline = self.clock.monotonic() + SLEEP_CONFIRM_SECONDS
        while self.probe.is_sleeping(url) is not True:
            if self.clock.monotonic() >= deadline:
                raise ProbeError(f"{url}/is_sleeping did not report sleeping within "
                                 f"{SLEEP_CONFIRM_SECONDS:g}s")
            self.clock.sleep(self.poll_interval)

    def _stop_all(self, seen: ReplicaSeen) -> None:
        for rec in seen.records:
            if rec.running:
                self.engine.stop(rec.id, self.stop_timeout)

    def _bring_up(self, m: ModelSpec, replica: int, seen: ReplicaSeen, report: Report) -> None:
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
                self.probe.wake_up(base_url(self.registry, m, replica))
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
                rec = self.observer.current(m.name, i)
                reason = None
                if rec is None:
                    reason = "its container disappeared"
                elif rec.state in ("exited", "dead", "created"):
                    reason = ended_reason(rec)
                elif rec.state == "restarting":
                    reason = "its container is crash-looping (restarting)"
                else:
                    url = base_url(self.registry, m, i)
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
        return StartFailed(failures, self.observer.state_line(), recover)

    def _start(self, m: ModelSpec, replica: int, seen: ReplicaSeen, report: Report,
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

    def _remove_strays(self, m: ModelSpec, ms: ModelSeen, report: Report) -> None:
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
            seen = self.observer.observe()
            names = [m.name for m in targets]
            want = {m.name: up_set(m, seen[m.name]) for m in targets}
            after = awake_map(self.registry, seen)
            for name, indices in want.items():
                after[name] = tuple(sorted({*after.get(name, ()), *indices}))
            violations = check_placement(self.registry, after)
            if violations:
                others = [n for n in awake_map(self.registry, seen) if n not in names]
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
                report.awake = tuple(awake_models(self.observer.observe()))
            return report

    def down(self, models: Sequence[str] | None = None) -> Report:
        """Stop and remove every replica's container of `models` (default: every managed
        container in this fleet's label scope, including ones whose model left the
        registry)."""
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self.observer.observe(probe=False)
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
            seen = self.observer.observe()
            ms = seen[m.name]
            report = Report("scale", (m.name,))
            with self._interruptible(report, again=again):
                self._remove_strays(m, ms, report)
                awake = list(ms.awake(m.replica_slots))
                if len(awake) < replicas:
                    free = [i for i in range(m.replica_slots) if i not in awake]
                    add = free[:replicas - len(awake)]
                    others = awake_map(self.registry, seen, exclude=m.name)
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
                report.awake = tuple(awake_models(self.observer.observe()))
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
            seen = self.observer.observe()
            ms = seen[m.name]
            report = Report("sleep", (m.name,))
            awake = ms.awake()
            if not awake:
                state = model_state(ms.states(up_set(m, ms)))
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
                report.awake = tuple(awake_models(self.observer.observe()))
            return report

    def wake(self, model: str) -> Report:
        """Bring `model`'s up set back (wake from sleep, or start) without evicting
        anything: refused if it does not fit beside what is awake (use `switch` for that)."""
        m = self.model(model)
        t0 = self.clock.monotonic()
        with self._locked():
            seen = self.observer.observe()
            ms = seen[m.name]
            want = up_set(m, ms)
            others = awake_map(self.registry, seen, exclude=m.name)
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
                report.awake = tuple(awake_models(self.observer.observe()))
            return report

    # -- logs ----------------------------------------------------------------------------

    def _container_of(self, model: str, replica: int = 0) -> ContainerRecord:
        seen = self.observer.observe(probe=False)
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
