"""`GatewaySource`: the dashboard's figures from the gateway's runtime.

- per model: the scheduler's figures when it admits (`scheduled.py`: state, queue, oldest
  wait, time resident, quantum left, ttl left, drain reason), else the admission objects';
  replicas (outstanding, ejected); the activator (activating, put to sleep); and the fleet's
  status rows (container state, health, port, uptime; `fleetview.py`, refreshed in the
  background, never on a page's request);
- capacity bars from the registry's host inventory and the awake models (`capacity.py`);
- the last switches: the fleet's reports recorded by `RecordingFleet` (`history.py`) joined
  with the scheduler's switch history;
- request series sampled from the gateway's Prometheus metrics (`series.py`);
- log lines through the fleet client's `logs` (the fleet's `docker logs`).
A key that is not the admin key gets a `redacted` snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import anyio

from gateway import errors
from gateway.auth import Principal
from gateway.balancer import Balancer, Instance
from gateway.metrics import GatewayMetrics
from gateway.routing import RoutingTable
from gateway.ui.capacity import capacity_bars
from gateway.ui.fleetview import FleetStatusCache
from gateway.ui.history import SwitchHistory
from gateway.ui.scheduled import SchedulerView, merge_switches, scheduler_figures
from gateway.ui.series import Reading, Sampler, readings
from gateway.ui.snapshot import ModelState, ModelView, ReplicaView, Snapshot, SwitchView
from gateway.ui.source import LogLines

LOGS_TIMEOUT = 10.0
MAX_LOG_LINES = 1000
AWAKE_ROWS = frozenset({"healthy", "running"})


class ActivatorView(Protocol):
    """What the source reads of the gateway's activator."""

    fleet: Any
    asleep: set[str]

    def pending(self, model: str) -> bool: ...


class LoadView(Protocol):
    """A model's live figures (gateway.state.LoadFigures: the scheduler's or an Admission)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def max_concurrency(self) -> int | None: ...

    @property
    def max_queue(self) -> int: ...


class RoutingFigures(Protocol):
    """One routing state: the table and each model's replicas, admission and idle ttl."""

    @property
    def table(self) -> RoutingTable: ...

    @property
    def admission(self) -> Mapping[str, LoadView]: ...

    @property
    def instances(self) -> Mapping[str, Sequence[Instance]]: ...

    @property
    def ttl(self) -> Mapping[str, float]: ...


class GatewayFigures(Protocol):
    """What the source reads of the gateway (its runtime): the routing state in force, the
    balancer, the activator, the metrics, and how long a model has been idle."""

    @property
    def state(self) -> RoutingFigures: ...

    @property
    def balancer(self) -> Balancer: ...

    @property
    def activator(self) -> ActivatorView | None: ...

    @property
    def metrics(self) -> GatewayMetrics: ...

    @property
    def scheduler(self) -> SchedulerView | None: ...

    def idle_for(self, model: str) -> float | None: ...


def metric_readings(metrics: GatewayMetrics) -> dict[str, Reading]:
    """Per model cumulative requests, errors and time-to-first-chunk from the app's metrics."""
    requests: list[tuple[str, str, float]] = []
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                requests.append((s.labels["model"], s.labels["status"], s.value))
    ttft: dict[str, list[float]] = {}
    for family in metrics.ttft.collect():
        for s in family.samples:
            row = ttft.setdefault(s.labels.get("model", ""), [0.0, 0.0])
            if s.name.endswith("_sum"):
                row[0] = s.value
            elif s.name.endswith("_count"):
                row[1] = s.value
    return readings(requests, ((m, r[0], r[1]) for m, r in ttft.items()))


class GatewaySource:
    """A `DashboardSource` over one gateway."""

    def __init__(self, gateway: GatewayFigures, history: SwitchHistory | None = None, *,
                 sample_interval: float = 2.0, sample_points: int = 90,
                 fleet_max_age: float = 2.0, wall: Callable[[], float] = time.time) -> None:
        self.gw = gateway
        self.history = history or SwitchHistory()
        self.sampler = Sampler(lambda: metric_readings(gateway.metrics),
                               interval=sample_interval, points=sample_points)
        self.fleet_status = FleetStatusCache(max_age=fleet_max_age)
        self.wall = wall

    async def snapshot(self, principal: Principal | None) -> Snapshot:
        gw = self.gw
        st, activator = gw.state, gw.activator  # one routing state for the whole snapshot
        table, admission, registry = st.table, st.admission, st.table.registry

        def visible(name: str) -> bool:
            spec = registry.models.get(name)
            return principal is None or principal.may_use(
                name, spec.aliases if spec is not None else ())

        rows, fleet_error = (None, None)
        if activator is not None:
            last = self.history.newest(1)
            rows, fleet_error = await self.fleet_status.get(
                activator.fleet, changed_at=last[0].at if last else float("-inf"))
        age = self.fleet_status.age() if rows is not None else 0.0
        plan, plan_history, mono = scheduler_figures(gw.scheduler)
        by_model: dict[str, dict[int, dict[str, Any]]] = {}
        for row in rows or ():
            by_model.setdefault(str(row.get("name")), {})[int(row.get("replica") or 0)] = row
        now = self.wall()
        self.sampler.sample(now)
        models: list[ModelView] = []
        states: dict[str, str] = {}
        awake_count: dict[str, int] = {}
        for name, route in table.routes.items():
            spec = registry.models[name]
            fleet_rows = by_model.get(name, {})
            sm = plan.get(name, {})
            state = self._state(name, route.managed, fleet_rows, activator, rows is not None,
                                str(sm.get("state") or ""))
            states[name] = state
            awake_count[name] = sum(r.get("state") in AWAKE_ROWS | {"loading"}
                                    for r in fleet_rows.values())
            if not visible(name):
                continue
            adm = admission.get(name)
            models.append(ModelView(
                name=name, state=state, managed=route.managed, description=spec.description,
                aliases=tuple(spec.aliases), tags=tuple(spec.tags),
                replicas=self._replicas(st.instances.get(name, ()), fleet_rows),
                in_flight=adm.in_flight if adm else 0, queued=adm.waiting if adm else 0,
                oldest_wait=_round(sm["oldest_wait"] if sm else _oldest_wait(adm)),
                time_resident=None if not route.managed else _round(
                    sm.get("resident_for") if sm else max(
                        (float(r["uptime"]) + age for r in fleet_rows.values()
                         if r.get("state") in AWAKE_ROWS and r.get("uptime") is not None),
                        default=None)),
                ttl=st.ttl.get(name),
                ttl_left=(_round(sm.get("ttl_left")) if sm else
                          self._ttl_left(name, st.ttl.get(name), state)),
                quantum_left=_round(sm.get("quantum_left")),
                rival=str(sm["rival"]) if sm.get("rival") else None,
                max_concurrency=adm.max_concurrency if adm else spec.max_concurrency,
                max_queue=adm.max_queue if adm else spec.max_queue,
                gpus=tuple(spec.gpus),
                gpu_fraction=registry.gpu_fraction(spec) if spec.managed and spec.gpus else None,
                cpus=registry.cpus(spec) if spec.managed else None,
                detail=_detail(sm, fleet_rows)))
        names = [m.name for m in models]
        snap = Snapshot(
            generated_at=now, registry_source=registry.source, models=tuple(models),
            capacity=capacity_bars(registry, states, awake_count, visible),
            switches=tuple(self._switches(visible, plan_history, mono, now)),
            series=self.sampler.view(names), activation=activator is not None,
            fleet_error=fleet_error)
        return snap if principal is None or principal.admin else redacted(snap)

    @staticmethod
    def _state(name: str, managed: bool, rows: Mapping[int, Mapping[str, Any]],
               activator: ActivatorView | None, observed: bool,
               scheduled: str = "") -> ModelState:
        """The scheduler's transitions first, then what the fleet's rows show, then the
        scheduler's (or the activator's) memory."""
        if not managed:
            return "remote"
        if scheduled in ("activating", "draining", "evicting"):
            return scheduled  # type: ignore[return-value]
        if activator is not None and activator.pending(name):
            return "activating"
        seen = {str(r.get("state")) for r in rows.values()}
        if seen & AWAKE_ROWS:
            return "awake"
        if "loading" in seen:
            return "activating"
        if "sleeping" in seen:
            return "asleep"
        if observed:  # the fleet's rows say better than the gateway's memory (sleep may stop)
            return "stopped"
        if scheduled in ("awake", "asleep", "stopped"):
            return scheduled  # type: ignore[return-value]
        if scheduled == "absent":
            return "stopped"
        if activator is not None and name in activator.asleep:
            return "asleep"
        return "unknown"

    def _ttl_left(self, name: str, ttl: float | None, state: str) -> float | None:
        if ttl is None or state != "awake":
            return None
        idle = self.gw.idle_for(name)
        return None if idle is None else _round(max(ttl - idle, 0.0))

    def _replicas(self, instances: Sequence[Instance],
                  rows: Mapping[int, Mapping[str, Any]]) -> tuple[ReplicaView, ...]:
        out = []
        for inst in instances:
            row = rows.get(inst.index, {})
            parts = urlsplit(inst.base_url)
            out.append(ReplicaView(
                index=inst.index, url=inst.base_url, node=parts.hostname,
                port=row.get("port") or parts.port, state=str(row.get("state", "-")),
                health=str(row.get("health", "-")), outstanding=inst.outstanding,
                ejected=not self.gw.balancer.available(inst),
                uptime=_round(row.get("uptime")), detail=inst.last_error or ""))
        return tuple(out)

    def _switches(self, visible: Callable[[str], bool], planned: Sequence[Mapping[str, Any]],
                  mono: float, wall: float, n: int = 20) -> list[SwitchView]:
        out = []
        for record in merge_switches(self.history.newest(), planned, mono, wall):
            if not visible(record.model):
                continue
            actions = tuple(a if visible(a.model) else type(a)("other", a.action, a.seconds)
                            for a in record.actions)
            reason = record.reason
            if any(not visible(a.model) for a in record.actions) and record.outcome == "ok":
                reason = ""  # it may name models this viewer may not see
            out.append(SwitchView(record.model, record.operation, record.at, record.outcome,
                                  record.seconds, reason, dict(record.timings), actions))
            if len(out) >= n:
                break
        return out

    async def log_lines(self, model: str, n: int, replica: int = 0) -> LogLines:
        table, activator = self.gw.state.table, self.gw.activator
        route = table.resolve(model)
        if route is None:
            raise errors.unknown_model(model, table.names())
        if not route.managed:
            raise errors.GatewayError(
                400, f"Model `{route.model}` is a remote server (`url` in the registry): the "
                     f"fleet does not run it, so it has no logs here.", param="model")
        logs = getattr(activator.fleet, "logs", None) if activator is not None else None
        if logs is None:
            raise errors.GatewayError(
                409, "This gateway has no fleet client that reads logs: start it with "
                     "activation on (GATEWAY_ACTIVATION=true) and Docker reachable, or use "
                     f"`fleet logs {route.model}`.", err_type="ConflictError")
        n = max(1, min(n, MAX_LOG_LINES))
        try:
            with anyio.fail_after(LOGS_TIMEOUT):
                text = await anyio.to_thread.run_sync(
                    lambda: logs(route.model, tail=n, replica=replica), abandon_on_cancel=True)
        except TimeoutError:
            raise errors.GatewayError(
                503, f"The fleet did not return the logs of `{route.model}` within "
                     f"{LOGS_TIMEOUT:g} s.") from None
        except Exception as exc:  # any fleet failure becomes the 503's reason
            raise errors.GatewayError(
                503, f"The fleet could not read the logs of `{route.model}` (replica "
                     f"{replica}): {str(exc).strip() or type(exc).__name__}") from None
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        lines = str(text).splitlines() if not isinstance(text, list) else [str(x) for x in text]
        return LogLines(route.model, replica, tuple(lines[-n:]))


def _detail(scheduled: Mapping[str, Any], rows: Mapping[int, Mapping[str, Any]]) -> str:
    """Why the scheduler drains it, and what the fleet says of its replicas."""
    parts = [f"draining: {scheduled['draining_because']}"] \
        if scheduled.get("draining_because") else []
    parts += [str(r["detail"]) for r in rows.values() if r.get("detail")]
    return "; ".join(parts)


def _oldest_wait(figures: LoadView | None) -> float | None:
    oldest = getattr(figures, "oldest_wait", None)  # gateway.limits.Admission has it
    return oldest() if callable(oldest) else None


def redacted(snap: Snapshot) -> Snapshot:
    """What an API key that is not the admin key sees: no upstream addresses, container
    details, registry path or fleet error texts (they may name hosts, paths and other
    models); states, queues, timings and charts stay."""
    models = tuple(replace(m, detail="", replicas=tuple(
        replace(r, url="", node=None, port=None, detail="") for r in m.replicas))
        for m in snap.models)
    switches = tuple(replace(s, reason=s.reason if s.reason.startswith("made room:") else "")
                     for s in snap.switches)
    error = "the fleet's view is unavailable" if snap.fleet_error else None
    return replace(snap, models=models, switches=switches, registry_source="",
                   fleet_error=error)


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)
