"""The fleet's lifecycle: the operations up, down, switch, sleep, wake, scale and logs.

`Fleet` is built from injected parts (registry, engine, lock, probe, clock) and holds no
global state: the truth lives in Docker (containers, their labels) and in each model's
`/health`. Every mutating operation runs in one frame (`Fleet.operation`, yielding a
`fleet.operation.Operation`): the switch lock held from observation through action (so two
`fleet` processes, or a gateway activation and a CLI switch, never both decide that the
same GPU memory is free), the report, the timings, and failures told the same way.
Reading the world is `fleet.observe`; deciding, `fleet.planner` and `fleet.placement`;
acting on one replica, `fleet.actions`; waiting for health, `fleet.waiting`.

Replicas: each replica is its own container (`fleet.spec`), acted on one by one. What up,
switch, wake and ensure_awake bring up is a model's *up set* (`fleet.observe.up_set`);
`down`, `sleep` and evictions act on every replica of a model; `scale` starts the lowest
free replica slots and stops the highest awake ones (containers kept), never evicting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from fleet.actions import ActorSettings, ReplicaActor
from fleet.autoscale import check_scale
from fleet.clock import Clock, SystemClock
from fleet.containers import ContainerRecord, Engine
from fleet.errors import (
    FleetError,
    PlacementRefused,
    UnknownModel,
    placement_refused,
)
from fleet.health import Probe
from fleet.lock import SwitchLock
from fleet.observe import (
    ModelSeen,
    Observer,
    awake_map,
    observed_models,
    replica_label,
    up_set,
)
from fleet.operation import Operation
from fleet.placement import check_placement
from fleet.planner import SwitchPlan, plan_switch
from fleet.registry import ModelSpec, Registry
from fleet.report import ActionTaken, ModelStatus, Report
from fleet.spec import DEFAULT_NAME_PREFIX, ContainerSpec, replica_specs
from fleet.states import READY_STATES, Action, Phase, ReplicaState, model_state
from fleet.waiting import DEFAULT_WATCH_EVERY, HealthWait, Unit

DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_LOG_LINES = 30


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
        watch_every: float = DEFAULT_WATCH_EVERY,
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
        self.watch_every = watch_every  # seconds between the lines of a load (0: none)
        self._specs: dict[str, tuple[ContainerSpec, ...]] | None = None

    # -- parts and helpers ---------------------------------------------------------------

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

    @property
    def observer(self) -> Observer:
        """Reads the world (made on each use, as `actor`: they hold no state)."""
        return Observer(self.registry, self.engine, self.probe, self.clock, self.replica_specs,
                        self.extra_labels)

    @property
    def actor(self) -> ReplicaActor:
        """Acts on single replicas."""
        settings = ActorSettings(self.extra_labels, self.network, self.environ, self.base_dir,
                                 self.stop_timeout, self.poll_interval, self.log_lines,
                                 self.compose_project)
        return ReplicaActor(self.registry, self.engine, self.probe, self.clock,
                            self.replica_specs, settings, self.say)

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

    def status(self, models: Collection[str] | None = None, *,
               probe: bool = True) -> list[ModelStatus]:
        """One row per replica of `models` (names; default: every managed model and every
        orphaned managed container): replicas 0..initial_replicas-1 always, others when they
        have a container. Read-only: no lock needed."""
        return self.observer.status(models, probe=probe)

    def _must_fit(self, awake: Mapping[str, Collection[int]], refusal: str) -> None:
        """PlacementRefused(`refusal`, the violations) unless the replicas `awake` fit."""
        violations = check_placement(self.registry, awake)
        if violations:
            raise PlacementRefused(refusal, violations)

    @contextmanager
    def operation(self, name: str, target: Sequence[str], *, deadline: float | None = None,
                  probe: bool = True, again: str | None = None) -> Iterator[Operation]:
        """The frame of a mutating operation: wait for the switch lock (within `deadline`,
        a `clock.monotonic()` value), observe, and hold the lock while the caller decides
        and acts with the yielded `Operation`."""
        started = self.clock.monotonic()
        timeout = None if deadline is None else max(0.0, deadline - started)
        self.lock.acquire(timeout)
        try:
            observer, actor = self.observer, self.actor
            waiter = HealthWait(self.registry, observer, self.probe, self.clock,
                                fail=actor.failure, say=self.say,
                                poll_interval=self.poll_interval, engine=self.engine,
                                watch_every=self.watch_every)
            yield Operation(name, target, seen=observer.observe(probe=probe), started=started,
                            clock=self.clock, observer=observer, actor=actor, waiter=waiter,
                            again=again)
        finally:
            self.lock.release()

    # -- switch --------------------------------------------------------------------------

    def plan(self, target: str, *, force: bool = False,
             evict: Collection[str] | None = None) -> SwitchPlan:
        """What `switch(target)` would do now (dry run; no lock, no action)."""
        return self._plan(self.observer.observe(), target, force, evict)

    def _plan(self, seen: Mapping[str, ModelSeen], target: str, force: bool,
              evict: Collection[str] | None) -> SwitchPlan:
        m = self.registry.get(target)
        replicas = None
        if m is not None and m.managed and m.name in seen:
            ms = seen[m.name]
            replicas = sorted({*up_set(m, ms), *ms.awake(m.replica_slots)})
        name = m.name if m is not None else target
        observed = observed_models(self.registry, seen, name, busy=self.busy,
                                   last_used=self.last_used)
        return plan_switch(self.registry, observed, target, force=force, replicas=replicas,
                           evictable=evict)

    def switch(self, target: str, *, force: bool = False, deadline: float | None = None,
               evict: Collection[str] | None = None) -> Report:
        """Make `target` awake and healthy (its up set of replicas), evicting (sleep or
        stop) what the planner says, every awake replica counted; never a pinned model and,
        when `evict` is given, only models named in it (PlacementRefused otherwise).

        `deadline` (a `clock.monotonic()` value) caps the wait for the lock and for health,
        on top of the model's own health_timeout.
        """
        m = self.model(target)
        with self.operation("switch", [m.name], deadline=deadline) as op:
            plan = self._plan(op.seen, m.name, force, evict)
            if plan.violations:
                raise placement_refused(f"cannot switch to {m.name}:", plan.violations)
            # Found out now, not after the evictions: nothing is left half done.
            units = [(m, i) for i in up_set(m, op.seen[m.name])]
            op.pull_images(units, f"cannot switch to {m.name}", "nothing was evicted")
            evicted = [ev.model for ev in plan.evict]
            with op.acting(f"`fleet switch {evicted[0]}` to go back" if evicted else ""):
                with op.phase(Phase.EVICT):
                    for ev in plan.evict:
                        op.actor.evict(ev, op.seen[ev.model], op.report)
                op.bring_up(units, deadline=deadline)
                return op.finish()

    # -- up / down -----------------------------------------------------------------------

    def _targets(self, models: Iterable[str] | None) -> list[ModelSpec]:
        if models:
            return list({m.name: m for m in (self.model(x) for x in models)}.values())
        return [m for m in self.registry.models.values() if m.managed and m.autostart]

    def up(self, models: Sequence[str] | None = None) -> Report:
        """Start (or adopt, recreate, wake) the up set of `models` (default: every autostart
        model): replicas 0..initial_replicas-1 (and sleeping ones), and wait until they are
        healthy. Refuses when they cannot be awake beside what is; never evicts."""
        targets = self._targets(models)
        names = [m.name for m in targets]
        with self.operation("up", names) as op:
            want = {m.name: up_set(m, op.seen[m.name]) for m in targets}
            after = awake_map(self.registry, op.seen)
            for name, indices in want.items():
                after[name] = tuple(sorted({*after.get(name, ()), *indices}))
            others = [n for n in awake_map(self.registry, op.seen) if n not in names]
            hint = (f" (awake now: {', '.join(others)}; use `fleet switch MODEL` to evict them, "
                    f"or `fleet down` first)" if others else "")
            self._must_fit(after, f"cannot bring up {', '.join(names)} together{hint}:")
            units: list[Unit] = [(m, i) for m in targets for i in want[m.name]]
            op.pull_images(units, f"cannot bring up {', '.join(names)}")
            with op.acting():
                with op.phase(Phase.START):
                    for m in targets:
                        op.actor.remove_strays(m, op.seen[m.name], op.report)
                    for m, i in units:
                        s = op.seen[m.name].replicas[i]
                        if s.state in READY_STATES:
                            op.report.actions.append(ActionTaken(
                                m.name, Action.NONE, 0.0, f"adopted ({s.state})", i))
                        else:
                            op.start(m, i, s)
                op.wait_healthy(units)
                return op.finish()

    def down(self, models: Sequence[str] | None = None) -> Report:
        """Stop and remove every replica's container of `models` (default: every managed
        container in this fleet's label scope, including ones whose model left the
        registry)."""
        again = " ".join(["fleet down", *(models or ())])
        with self.operation("down", [], probe=False, again=again) as op:
            names = [self._name_or_stray(x, op.seen) for x in models] if models else \
                list(op.seen)
            op.report.target = tuple(names)
            with op.acting():
                for name in names:
                    ms = op.seen.get(name)
                    for i, s in sorted(ms.replicas.items()) if ms is not None else ():
                        if s.records:
                            op.actor.remove(name, i, s, op.report)
                return op.finish(awake=False)

    def _name_or_stray(self, model: str, seen: Mapping[str, ModelSeen]) -> str:
        """A managed model's name, or the name on containers whose model left the registry."""
        return model if (model in seen and model not in self.registry.models) else \
            self.model(model).name

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
        check_scale(m, replicas)
        again = f"fleet scale {m.name} {replicas}"
        with self.operation("scale", [m.name], deadline=deadline, again=again) as op:
            ms = op.seen[m.name]
            awake = list(ms.awake(m.replica_slots))
            free = [i for i in range(m.replica_slots) if i not in awake]
            add = free[:max(0, replicas - len(awake))]
            if add:  # checked before acting: a refusal leaves nothing half done
                others = awake_map(self.registry, op.seen, exclude=m.name)
                self._must_fit({**others, m.name: sorted({*awake, *add})},
                               f"cannot scale {m.name} to {replicas} replica(s) beside what "
                               f"is awake ({', '.join(others) or 'nothing else'}); scaling "
                               f"never evicts (`fleet switch` does):")
                op.pull_images([(m, i) for i in add], f"cannot scale {m.name}")
            with op.acting():
                op.actor.remove_strays(m, ms, op.report)
                if add:
                    op.bring_up([(m, i) for i in add], deadline=deadline)
                for i in sorted(awake, reverse=True)[:max(0, len(awake) - replicas)]:
                    op.actor.evict_replica(m, i, ms.replicas[i], Action.STOP,
                                           f"scaled to {replicas}", op.report)
                if len(awake) == replicas:
                    op.report.actions.append(ActionTaken(
                        m.name, Action.NONE, 0.0, f"already {replicas} awake replica(s)"))
                return op.finish()

    # -- sleep / wake --------------------------------------------------------------------

    def sleep(self, model: str) -> Report:
        """Free `model`'s accelerator memory, every awake replica: vLLM sleep level 1 when
        the model has `sleep_mode` and the replica is running/healthy; otherwise stop its
        container (kept: `wake`/`switch` start it again). Each action says which was done
        (`sleep` or `stop`) and why (note: "no sleep_mode: stopped instead", "loading:
        cannot sleep, stopped instead", "sleep failed, stopped instead")."""
        m = self.model(model)
        with self.operation("sleep", [m.name]) as op:
            ms = op.seen[m.name]
            awake = ms.awake()
            if not awake:
                state = model_state(ms.states(up_set(m, ms)))
                op.report.actions.append(ActionTaken(m.name, Action.NONE, 0.0,
                                                     f"already {state}"))
            with op.acting():
                for i in awake:
                    s = ms.replicas[i]
                    can_sleep = m.sleep_mode and s.state in (ReplicaState.HEALTHY,
                                                             ReplicaState.RUNNING)
                    why = "requested" if can_sleep else (
                        "no sleep_mode: stopped instead" if not m.sleep_mode
                        else f"{s.state}: cannot sleep, stopped instead")
                    op.actor.evict_replica(m, i, s, Action.SLEEP if can_sleep else Action.STOP,
                                           why, op.report)
                return op.finish()

    def wake(self, model: str) -> Report:
        """Bring `model`'s up set back (wake from sleep, or start) without evicting
        anything: refused if it does not fit beside what is awake (use `switch` for that)."""
        m = self.model(model)
        with self.operation("wake", [m.name]) as op:
            ms = op.seen[m.name]
            want = up_set(m, ms)
            others = awake_map(self.registry, op.seen, exclude=m.name)
            mine = sorted({*ms.awake(m.replica_slots), *want})
            self._must_fit({**others, m.name: mine},
                           f"cannot wake {m.name} beside {', '.join(others) or 'nothing else'}; "
                           f"`fleet switch {m.name}` evicts what is in the way:")
            units = [(m, i) for i in want]
            op.pull_images(units, f"cannot wake {m.name}")
            with op.acting():
                op.bring_up(units)
                return op.finish()

    # -- logs ----------------------------------------------------------------------------

    def _container_of(self, model: str, replica: int = 0) -> ContainerRecord:
        seen = self.observer.observe(probe=False)
        name = self._name_or_stray(model, seen)
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
