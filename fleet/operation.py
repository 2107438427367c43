"""The frame every mutating fleet operation runs in (`Fleet.operation` opens it).

Under the switch lock, an `Operation` holds what the fleet looked like when it began
(`seen`), the `Report` it builds, and the steps every operation shares:

- `acting()`: from here on the fleet changes things, so an engine failure part-way (the
  Docker daemon gone, say) is told as `Interrupted`: what was done, the state now, how to
  recover. Refusals before it (placement, a missing image) leave nothing half done.
- `phase(Phase.X)`: times a phase into `report.timings`.
- `start(...)` / `bring_up(...)`: start replicas (a refusal by the engine, e.g. a taken
  port, is a `StartFailed` that says what is awake now), then wait until they are healthy
  (`fleet.waiting`); failures are one `StartFailed` with each one's log lines.
- `finish()`: the total time and, re-observed, what is awake now.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from fleet.actions import ReplicaActor
from fleet.clock import Clock
from fleet.errors import (
    DockerUnreachable,
    EngineError,
    ImageMissing,
    Interrupted,
    ModelFailure,
    PullFailed,
    StartFailed,
)
from fleet.observe import ModelSeen, Observer, ReplicaSeen, awake_models, replica_label
from fleet.pull import pull_policy
from fleet.registry import ModelSpec
from fleet.report import Report
from fleet.states import Phase, PullPolicy, ReplicaState
from fleet.waiting import HealthWait, Unit


class Operation:
    """One mutating operation in progress (see the module's docstring)."""

    def __init__(self, name: str, target: Sequence[str], *, seen: Mapping[str, ModelSeen],
                 started: float, clock: Clock, observer: Observer, actor: ReplicaActor,
                 waiter: HealthWait, again: str | None = None) -> None:
        self.report = Report(name, tuple(target))
        self.seen = seen
        self.started = started
        self.clock = clock
        self.observer = observer
        self.actor = actor
        self.waiter = waiter
        self.again = again  # the command that retries it (default: from what failed)
        self.recover_extra = ""

    @contextmanager
    def acting(self, recover_extra: str = "") -> Iterator[None]:
        """The part of the operation that changes things; `recover_extra` is another way to
        recover, added to failure messages (e.g. "`fleet switch a` to go back")."""
        self.recover_extra = recover_extra
        try:
            yield
        except EngineError as exc:
            r = self.report
            done = [f"{replica_label(self.observer.registry, a.model, a.replica)} {a.action}"
                    + (f" ({a.note})" if a.note else "") for a in r.actions]
            again = self.again or f"fleet {r.operation} {' '.join(r.target)}"
            recover = ("when the cause above is fixed (the Docker daemon answers `docker "
                       "info`), `fleet status` shows where the fleet stands; then run "
                       f"`{again}` again")
            if self.recover_extra:
                recover += f"; or {self.recover_extra}"
            raise Interrupted(f"{r.operation} {' '.join(r.target)}", exc, done,
                              self.observer.state_line(), recover) from exc

    @contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        """Time the enclosed steps as `phase` (recorded when they succeed)."""
        t = self.clock.monotonic()
        yield
        self.report.timings[phase] = self.clock.monotonic() - t

    def pull_images(self, units: Sequence[Unit], refusal: str,
                    nothing: str = "nothing was started") -> None:
        """Before acting: get the images the units' new containers need (absent or drifted
        replicas), by each model's pull policy: missing (pull when not on the host), always
        (pull), never (refuse when missing). A refusal or a failed pull begins with
        `refusal` (e.g. "cannot switch to b") and ends with `nothing` (what was not done)."""
        registry, engine = self.observer.registry, self.actor.engine
        needed: dict[str, ModelSpec] = {}
        for m, i in units:
            if self.seen[m.name].replicas[i].state in (ReplicaState.ABSENT,
                                                       ReplicaState.DRIFTED):
                needed.setdefault(registry.image(m), m)
        t = self.clock.monotonic()
        pulled = False
        for image, m in needed.items():
            policy = pull_policy(registry, m)
            if policy != PullPolicy.ALWAYS and engine.has_image(image):
                continue
            if policy == PullPolicy.NEVER:
                raise ImageMissing(f"{refusal}: its image {image} is not on this host (build it "
                                   f"with scripts/build-images.sh or `docker pull {image}`); "
                                   f"{nothing}")
            try:
                self.actor.pull(m, image, self.report)
            except PullFailed as exc:
                raise PullFailed(f"{refusal}: {exc}; {nothing}", image=exc.image,
                                 answer=exc.answer) from exc
            pulled = True
        if pulled:
            self.report.timings[Phase.PULL] = self.clock.monotonic() - t

    def start(self, m: ModelSpec, replica: int, seen: ReplicaSeen) -> None:
        """Bring one replica up (no waiting). An engine refusal (port taken, no GPU
        runtime, image missing, name taken) is a StartFailed that states what is awake
        now; a daemon that does not answer is no refusal of this model: DockerUnreachable
        goes through (`acting` tells it as Interrupted)."""
        try:
            self.actor.bring_up(m, replica, seen, self.report)
        except DockerUnreachable:
            raise
        except EngineError as exc:
            failure = ModelFailure(m.name, str(exc), None, "",
                                   replica if m.replica_slots > 1 else None)
            raise self.start_failed([failure]) from exc

    def bring_up(self, units: Sequence[Unit], *, deadline: float | None = None) -> None:
        """Start every unit (phase start), then wait until all are healthy (phase healthy)
        within their health_timeout and `deadline`."""
        with self.phase(Phase.START):
            for m, i in units:
                self.start(m, i, self.seen[m.name].replicas[i])
        self.wait_healthy(units, deadline=deadline)

    def wait_healthy(self, units: Sequence[Unit], *, deadline: float | None = None) -> None:
        with self.phase(Phase.HEALTHY):
            failures = self.waiter.wait(units, deadline=deadline)
            if failures:
                raise self.start_failed(failures)

    def start_failed(self, failures: Sequence[ModelFailure]) -> StartFailed:
        names = " ".join(dict.fromkeys(f.model for f in failures))
        again = self.again or f"fleet {self.report.operation} {names}"
        recover = f"fix the cause shown above, then run `{again}` again"
        if self.recover_extra:
            recover += f"; or {self.recover_extra}"
        return StartFailed(failures, self.observer.state_line(), recover)

    def finish(self, *, awake: bool = True) -> Report:
        """The report, with the total time and (`awake`) the models awake now."""
        self.report.timings[Phase.TOTAL] = self.clock.monotonic() - self.started
        if awake:
            self.report.awake = tuple(awake_models(self.observer.observe()))
        return self.report
