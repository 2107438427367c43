"""The fleet's small Python API (for the gateway's on-demand activation and for scripts).

    from fleet.api import open_fleet
    client = open_fleet(load_registry("models.toml"))
    client.ensure_awake("qwen-7b", timeout=120)   # blocking: run it in a worker thread
    client.status()                               # one row per replica
    client.scale("qwen-7b", 2, timeout=120)       # autoscaling (see fleet.autoscale.decide)
    client.sleep("qwen-7b")                       # idle ttl: vLLM sleep, or stop

Settings come from a `FleetSettings` object (environment `FLEET_*`, plus `DOCKER_HOST`) that
the caller may build and pass in; nothing is read at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.addressing import addressed
from fleet.clock import Clock
from fleet.containers import Engine
from fleet.engine import DEFAULT_DOCKER_TIMEOUT, DEFAULT_PULL_SILENCE, DockerEngine
from fleet.health import HttpProbe, Probe
from fleet.lifecycle import DEFAULT_STOP_TIMEOUT, Fleet
from fleet.lock import DEFAULT_LOCK_TIMEOUT, SwitchLock, default_lock_path
from fleet.registry import Registry
from fleet.report import ModelStatus, Report
from fleet.spec import DEFAULT_NAME_PREFIX
from fleet.states import READY_STATES, ReplicaState
from fleet.waiting import DEFAULT_WATCH_EVERY


class FleetSettings(BaseSettings):
    """Runtime settings of the fleet (not of the models: those live in the registry).

    Environment: FLEET_NAME_PREFIX, FLEET_EXTRA_LABELS ("k=v,k2=v2": added to every container
    the fleet creates and required of every container it manages, to scope a fleet, e.g. a
    test run), FLEET_LOCK_FILE, FLEET_LOCK_TIMEOUT, FLEET_DOCKER_HOST or DOCKER_HOST,
    FLEET_DOCKER_TIMEOUT, FLEET_STOP_TIMEOUT, FLEET_NETWORK (a user-defined network, e.g. the
    compose project's, that created containers join with their service name as alias).

    For a fleet that runs inside a container (the compose gateway): FLEET_UPSTREAM_HOST
    (`service`: health waits, sleep and wake reach each replica by its service name, as the
    gateway's traffic does; see fleet.addressing), FLEET_COMPOSE_PROJECT (containers the
    fleet creates join that compose project, so `docker compose down` removes them) and
    FLEET_BASE_DIR (the registry's directory on the Docker host, for relative bind paths).

    Progress: FLEET_WATCH_EVERY (seconds between the progress lines of a model that loads; 0:
    none), FLEET_PULL_SILENCE (seconds an image pull may go without progress).
    """

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", populate_by_name=True)

    name_prefix: str = DEFAULT_NAME_PREFIX
    extra_labels: str = ""
    lock_file: str | None = None
    lock_timeout: float = Field(default=DEFAULT_LOCK_TIMEOUT, ge=0)
    docker_host: str | None = Field(
        default=None, validation_alias=AliasChoices("FLEET_DOCKER_HOST", "DOCKER_HOST"))
    docker_timeout: float = Field(default=DEFAULT_DOCKER_TIMEOUT, gt=0)
    stop_timeout: float = Field(default=DEFAULT_STOP_TIMEOUT, ge=0)
    network: str | None = None
    upstream_host: str | None = None
    compose_project: str | None = None
    base_dir: str | None = None
    watch_every: float = Field(default=DEFAULT_WATCH_EVERY, ge=0)
    pull_silence: float = Field(default=DEFAULT_PULL_SILENCE, gt=0)

    def labels(self) -> dict[str, str]:
        return parse_labels(self.extra_labels)


class SettingsError(ValueError):
    """A runtime setting (environment or option) is invalid."""


def load_settings(**overrides: object) -> FleetSettings:
    """FleetSettings from the environment plus `overrides`; SettingsError when invalid."""
    try:
        settings = FleetSettings(**overrides)  # type: ignore[arg-type]
        settings.labels()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise SettingsError(f"invalid fleet settings (FLEET_* environment): {problems}") from None
    return settings


def parse_labels(text: str) -> dict[str, str]:
    """"k=v,k2=v2" -> {"k": "v", "k2": "v2"}; SettingsError names a malformed item."""
    out: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"FLEET_EXTRA_LABELS: {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def build_fleet(
    registry: Registry,
    settings: FleetSettings | None = None,
    *,
    engine: Engine | None = None,
    probe: Probe | None = None,
    clock: Clock | None = None,
    busy: Callable[[str], bool] | None = None,
    last_used: Callable[[str], float] | None = None,
    progress: Callable[[str], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Fleet:
    """A `Fleet` wired with real parts (Docker, httpx, flock) unless given others.

    `progress` receives every progress line (what is created, started, evicted; image pulls
    layer by layer; a loading model every `watch_every` seconds): the CLI prints them on
    stderr, the gateway can route them to its log."""
    s = settings or load_settings()
    env = os.environ if environ is None else environ
    lock_path = s.lock_file or default_lock_path(env)
    if engine is None and registry.swarm:
        from fleet.swarm import SwarmEngine, SwarmProbe

        manager = (registry.cluster.manager if registry.cluster else None) or s.docker_host
        swarm = SwarmEngine(DockerEngine(manager, timeout=s.docker_timeout), registry,
                            stop_timeout=s.stop_timeout)
        engine, probe = swarm, SwarmProbe(probe or HttpProbe(), swarm)
    return Fleet(
        registry,
        engine or DockerEngine(s.docker_host, timeout=s.docker_timeout,
                               pull_silence=s.pull_silence),
        lock=SwitchLock(lock_path, timeout=s.lock_timeout, on_wait=progress),
        probe=addressed(probe or HttpProbe(), registry, s.upstream_host),
        clock=clock,
        busy=busy,
        last_used=last_used,
        progress=progress,
        name_prefix=s.name_prefix,
        extra_labels=s.labels(),
        network=s.network,
        compose_project=s.compose_project or None,
        base_dir=s.base_dir or None,
        environ=env,
        stop_timeout=s.stop_timeout,
        watch_every=s.watch_every,
    )


class FleetClient:
    """What the gateway needs: make a model awake (switching if needed), put it to sleep,
    scale it, read status. Every call blocks (Docker, health polls) and serializes with
    other switches through the switch lock: call it from a worker thread."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def status(self, models: Collection[str] | None = None) -> list[ModelStatus]:
        """One row per replica (`ModelStatus.replica`) of `models` (default: all)."""
        return self.fleet.status(models)

    def awake_replicas(self, model: str) -> int:
        """How many replicas of `model` are running, healthy or loading now (what `scale`
        counts from; for `fleet.autoscale.decide`'s `current`)."""
        name = self.fleet.model(model).name
        return sum(s.state in READY_STATES for s in self.fleet.status([name])
                   if s.name == name)

    def sleep(self, model: str) -> Report:
        """Put every awake replica of `model` to sleep: vLLM sleep level 1 (weights offloaded,
        GPU memory freed, the container keeps running and wakes in seconds) when the model
        has `sleep_mode`; otherwise, or when sleeping fails, the container is stopped (kept;
        the next `ensure_awake` starts it again, a full model load). The report's actions say
        which (`sleep` or `stop`, with the reason in `note`); "none" when nothing was awake.
        """
        return self.fleet.sleep(model)

    def wake(self, model: str) -> Report:
        """Bring `model` back (vLLM wake_up, or start) without evicting anything: refuses
        with `PlacementRefused` when it does not fit beside what is awake (use ensure_awake,
        which switches, for that)."""
        return self.fleet.wake(model)

    def logs(self, model: str, *, tail: int = 100, replica: int = 0) -> str:
        """The last `tail` lines a replica of `model` printed (`docker logs`; the dashboard)."""
        return self.fleet.logs(model, tail=tail, replica=replica)

    def scale(self, model: str, n: int, *, timeout: float | None = None) -> Report:
        """Start or stop replicas of `model` until `n` are awake (`Fleet.scale`): refuses
        with `PlacementRefused` when the new replicas do not fit beside what is awake (it
        never evicts) and with `ScaleOutOfRange` (exit_code 2) outside the model's range.
        Scaling down stops the highest-index replicas: stop routing to them first.
        `timeout` (seconds) caps the wait for the switch lock and for health."""
        deadline = None if timeout is None else self.fleet.clock.monotonic() + timeout
        return self.fleet.scale(model, n, deadline=deadline)

    def ensure_awake(self, model: str, *, timeout: float | None = None,
                     evict: Collection[str] | None = None) -> Report | None:
        """Return at once (None) if a replica of `model` is healthy; else switch to it (its
        initial replicas, and any sleeping ones) and wait.

        A missing image is pulled first (the model's `pull` policy; progress lines go to
        `build_fleet`'s `progress`); the pull itself is not capped by `timeout`.

        `timeout` (seconds) caps the wait for the switch lock and for health. `evict`: the
        only models the switch may evict (e.g. those the caller drained); None lets the
        planner choose among all awake models. Pinned models are never evicted. The
        report's `bring_up_kind` and `timings` say how the model came up and how long each
        phase took.

        Raises (`fleet.errors`): `PlacementRefused` when it does not fit (`ModelsBusy`, a
        subclass, when a model in the way serves requests; `blocking_models` names the
        models in the way that could not be evicted), `StartFailed` with log lines,
        `Interrupted`, `EngineError` kinds (e.g. `DockerUnreachable`), `LockTimeout`.
        """
        name = self.fleet.model(model).name
        if any(s.state == ReplicaState.HEALTHY for s in self.fleet.status([name])):
            return None
        deadline = None if timeout is None else self.fleet.clock.monotonic() + timeout
        return self.fleet.switch(name, deadline=deadline, evict=evict)


def open_fleet(registry: Registry, settings: FleetSettings | None = None,
               **parts: object) -> FleetClient:
    """A `FleetClient` for `registry`; `parts` are passed to `build_fleet` (busy=..., etc.)."""
    return FleetClient(build_fleet(registry, settings, **parts))  # type: ignore[arg-type]
