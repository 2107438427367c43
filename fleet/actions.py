"""Acting on one replica at a time: bring it up (wake, start, create, recreate), put it to
sleep or stop it, remove it, and gather what a failed replica left behind.

`ReplicaActor` never decides (the planner and `fleet.lifecycle` do) and never waits for
health (`fleet.waiting` does); it calls the engine and the probe, says what it does through
`say`, and records one `ActionTaken` per replica in the report it is given. Engine errors
go through to the operation, which tells them as a start failure or an interruption.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.clock import Clock
from fleet.compose import compose_member_labels, project_on_network
from fleet.containers import ContainerRecord, Engine
from fleet.errors import EngineError, ModelFailure, ProbeError
from fleet.health import Probe
from fleet.observe import ModelSeen, ReplicaSeen, base_url, replica_label
from fleet.planner import Eviction
from fleet.pull import PullProgress
from fleet.registry import ModelSpec, Registry, replica_service_name
from fleet.report import ActionTaken, Report
from fleet.spec import ContainerSpec, docker_run_kwargs
from fleet.states import READY_STATES, Action, ReplicaState

SLEEP_CONFIRM_SECONDS = 30.0


@dataclass(frozen=True)
class ActorSettings:
    """How the actor makes and stops containers (from `fleet.api.FleetSettings`)."""

    extra_labels: Mapping[str, str]
    network: str | None
    environ: Mapping[str, str]
    base_dir: str | None
    stop_timeout: float
    poll_interval: float
    log_lines: int
    compose_project: str | None = None  # containers made here join it (compose down removes)


class ReplicaActor:
    """Acts on single replicas of one registry's models through an engine and a probe."""

    def __init__(self, registry: Registry, engine: Engine, probe: Probe, clock: Clock,
                 replica_specs: Mapping[str, Sequence[ContainerSpec]],
                 settings: ActorSettings, say: Callable[[str], None]) -> None:
        self.registry = registry
        self.engine = engine
        self.probe = probe
        self.clock = clock
        self.replica_specs = replica_specs
        self.settings = settings
        self.say = say

    def label(self, name: str, replica: int) -> str:
        return replica_label(self.registry, name, replica)

    def _record(self, report: Report, m: str, action: Action, since: float, note: str = "",
                replica: int = 0) -> None:
        report.actions.append(ActionTaken(m, action, self.clock.monotonic() - since, note,
                                          replica=replica))

    # -- containers --------------------------------------------------------------------

    def run_kwargs(self, name: str, network: str | None = None,
                   replica: int = 0) -> dict[str, Any]:
        """docker-py create kwargs for replica `replica` of `name`, with the extra (scoping)
        labels; `network` (else the configured one): a user-defined network to join, with
        the replica's service name as alias, as compose does (so a gateway in compose
        reaches it)."""
        spec = self.replica_specs[name][replica]
        kwargs = docker_run_kwargs(spec, self.settings.environ, base_dir=self.settings.base_dir)
        kwargs["labels"] = {**kwargs.get("labels", {}), **self.settings.extra_labels}
        net = network or self.settings.network
        if net:
            service = replica_service_name(name, replica)
            kwargs["network"] = net
            kwargs["networking_config"] = {net: {"Aliases": [service]}}
            # On a compose project's network: join the project (`docker compose down` removes it).
            project = self.settings.compose_project or project_on_network(
                self.engine.list_managed(self.settings.extra_labels), net)
            if project:
                kwargs["labels"].update(compose_member_labels(project, service))
        return kwargs

    def _peer_network(self) -> str | None:
        """The user-defined network the fleet's other containers share (e.g. the compose
        project's network), so a new container is reachable the same way; None if none."""
        if self.settings.network:
            return None  # run_kwargs applies the configured one
        counts: dict[str, int] = {}
        for rec in self.engine.list_managed(self.settings.extra_labels):
            for net in rec.networks:
                counts[net] = counts.get(net, 0) + 1
        return max(sorted(counts), key=lambda n: counts[n]) if counts else None

    # -- bringing up ---------------------------------------------------------------------

    def bring_up(self, m: ModelSpec, replica: int, seen: ReplicaSeen, report: Report) -> None:
        """Start, create, recreate or wake one replica (no waiting); "none" when it is
        already running, healthy or loading."""
        t = self.clock.monotonic()
        rec, state, who = seen.record, seen.state, self.label(m.name, replica)
        if state in READY_STATES:
            report.actions.append(ActionTaken(m.name, Action.NONE, 0.0, f"already {state}",
                                              replica=replica))
            return
        if state == ReplicaState.SLEEPING:
            assert rec is not None
            done = self._wake(m, replica, rec, who)
        elif state == ReplicaState.ABSENT:
            self.say(f"creating {who} ({self.replica_specs[m.name][replica].name})")
            self.engine.run(self.run_kwargs(m.name, network=self._peer_network(),
                                            replica=replica))
            done = Action.CREATE
        elif state == ReplicaState.DRIFTED:
            assert rec is not None
            self.say(f"recreating {who}: its container was made from another spec")
            for old in seen.records:
                self.engine.remove(old.id, force=True)
            # Keep it on the network it was on (e.g. made by compose: the gateway's network).
            self.engine.run(self.run_kwargs(m.name, network=rec.networks[0] if rec.networks
                                            else None, replica=replica))
            done = Action.RECREATE
        else:  # stopped
            assert rec is not None
            self.say(f"starting {who} ({rec.name})")
            self.engine.start(rec.id)
            done = Action.START
        self._record(report, m.name, done, t, replica=replica)

    def _wake(self, m: ModelSpec, replica: int, rec: ContainerRecord, who: str) -> Action:
        self.say(f"waking {who}")
        try:
            self.probe.wake_up(base_url(self.registry, m, replica))
            return Action.WAKE
        except ProbeError as exc:
            self.say(f"wake of {who} failed ({exc}); restarting its container")
            self.engine.stop(rec.id, self.settings.stop_timeout)
            self.engine.start(rec.id)
            return Action.RESTART

    def pull(self, m: ModelSpec, image: str, report: Report) -> None:
        """Pull `image` for `m`, its progress said layer by layer (`fleet.pull`)."""
        t = self.clock.monotonic()
        self.say(f"pulling {image} for {m.name}")
        self.engine.pull(image, PullProgress(image, self.say, self.clock.monotonic))
        self.say(f"pulled {image} in {self.clock.monotonic() - t:.1f}s")
        self._record(report, m.name, Action.PULL, t, image)

    # -- evicting, stopping, removing ----------------------------------------------------

    def evict(self, ev: Eviction, ms: ModelSeen, report: Report) -> None:
        """Sleep or stop every awake replica of `ev.model` (a replica that is not running
        or healthy cannot sleep: it is stopped)."""
        m = self.registry.models[ev.model]
        for i in ms.awake():
            s = ms.replicas[i]
            can_sleep = s.state in (ReplicaState.HEALTHY, ReplicaState.RUNNING)
            action = Action(ev.action) if can_sleep else Action.STOP
            self.evict_replica(m, i, s, action, ev.reason, report)

    def evict_replica(self, m: ModelSpec, replica: int, seen: ReplicaSeen, action: Action,
                      reason: str, report: Report) -> None:
        """Sleep (vLLM sleep level 1; stopped instead when that fails) or stop one
        replica, its container kept for a faster start."""
        t = self.clock.monotonic()
        note = reason
        who = self.label(m.name, replica)
        if action == Action.SLEEP:
            self.say(f"sleeping {who} ({reason})")
            try:
                self._sleep_vllm(m, replica)
            except ProbeError as exc:
                self.say(f"sleep of {who} failed ({exc}); stopping it instead")
                note, action = f"{reason}; sleep failed, stopped instead", Action.STOP
        if action == Action.STOP:
            self.say(f"stopping {who} ({reason})")
            for rec in seen.records:
                if rec.running:
                    self.engine.stop(rec.id, self.settings.stop_timeout)
        self._record(report, m.name, action, t, note, replica)

    def _sleep_vllm(self, m: ModelSpec, replica: int = 0) -> None:
        url = base_url(self.registry, m, replica)
        self.probe.sleep(url, level=1)
        deadline = self.clock.monotonic() + SLEEP_CONFIRM_SECONDS
        while self.probe.is_sleeping(url) is not True:
            if self.clock.monotonic() >= deadline:
                raise ProbeError(f"{url}/is_sleeping did not report sleeping within "
                                 f"{SLEEP_CONFIRM_SECONDS:g}s")
            self.clock.sleep(self.settings.poll_interval)

    def remove(self, name: str, replica: int, seen: ReplicaSeen, report: Report, *,
               graceful: bool = True, why: str = "", note: str = "") -> None:
        """Remove every container of one replica (`graceful`: stop a running one first)."""
        t = self.clock.monotonic()
        for rec in seen.records:
            self.say(f"removing {self.label(name, replica)} ({rec.name})"
                     + (f": {why}" if why else ""))
            if graceful and rec.running:
                self.engine.stop(rec.id, self.settings.stop_timeout)
            self.engine.remove(rec.id, force=True)
        self._record(report, name, Action.REMOVE, t, note, replica)

    def remove_strays(self, m: ModelSpec, ms: ModelSeen, report: Report) -> None:
        """Remove the containers of replicas beyond the model's replica slots."""
        for i, s in sorted(ms.replicas.items()):
            if i >= m.replica_slots and s.records:
                self.remove(m.name, i, s, report, graceful=False,
                            why=f"beyond the registry's {m.replica_slots} replica slot(s)",
                            note="beyond the registry's replica slots")

    # -- failures ------------------------------------------------------------------------

    def failure(self, m: ModelSpec, replica: int, rec: ContainerRecord | None,
                reason: str) -> ModelFailure:
        """A replica that failed to come up: its last log lines, and its container stopped
        (to free what it holds: GPU memory, cores), kept for `fleet logs`."""
        which = replica if m.replica_slots > 1 else None
        if rec is None:
            return ModelFailure(m.name, reason, None, "", which)
        try:
            tail = self.engine.logs(rec.id, tail=self.settings.log_lines)
        except EngineError as exc:
            tail = f"(logs unavailable: {exc})"
        if rec.running:
            try:
                self.engine.stop(rec.id, self.settings.stop_timeout)
                reason += "; stopped it (container kept for `fleet logs`)"
            except EngineError as exc:
                reason += f"; could not stop it: {exc}"
        return ModelFailure(m.name, reason, rec.name, tail, which)
