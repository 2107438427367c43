"""Containers as the fleet sees them, and the engine interface that acts on them.

`ContainerRecord` is what the engine observed about one container; `Engine` is the small
interface `fleet.lifecycle` drives (list the managed containers by label, create+start one
from `docker_run_kwargs`, start, stop, remove, read logs, pull images); `record_from_attrs`
reads Docker's inspect JSON. Pure: the Docker SDK itself is only in `fleet.engine`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from fleet.spec import LABEL_MODEL, LABEL_SPEC_HASH


@dataclass(frozen=True)
class ContainerRecord:
    """What the engine observed about one container."""

    id: str
    name: str
    model: str
    state: str  # Docker's State.Status: created, running, paused, restarting, exited, dead
    health: str | None = None  # Docker healthcheck: starting, healthy, unhealthy; None if none
    spec_hash: str | None = None
    image: str = ""
    ports: tuple[int, ...] = ()
    started_at: float | None = None  # epoch seconds of the last start
    exit_code: int | None = None
    restart_count: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    networks: tuple[str, ...] = ()  # user-defined networks (not bridge/host/none)
    oom_killed: bool = False  # Docker's State.OOMKilled: the kernel's OOM killer struck

    @property
    def running(self) -> bool:
        return self.state in ("running", "restarting", "paused")


class Engine(Protocol):
    """What the lifecycle needs from a container engine (real: `DockerEngine`)."""

    def list_managed(self, labels: Mapping[str, str] | None = None) -> list[ContainerRecord]:
        """Containers labelled managed (and with every label in `labels`), stopped ones too."""

    def inspect(self, container: str) -> ContainerRecord | None: ...

    def has_image(self, image: str) -> bool:
        """Whether `image` is present locally (what a create would need)."""

    def pull(self, image: str, on_event: Callable[[Mapping[str, Any]], None]) -> None:
        """Pull `image` (Docker's own credentials), each progress event to `on_event`;
        `fleet.errors.PullFailed` with the registry's answer when it fails."""

    def run(self, run_kwargs: Mapping[str, Any]) -> ContainerRecord:
        """Create and start a container from `containers.create` keyword arguments."""

    def start(self, container: str) -> None: ...

    def stop(self, container: str, timeout: float) -> None: ...

    def remove(self, container: str, *, force: bool = False) -> None: ...

    def logs(self, container: str, tail: int = 50) -> str: ...

    def follow_logs(self, container: str, tail: int = 50) -> Iterator[str]: ...


def parse_time(value: str | None) -> float | None:
    if not value or value.startswith("0001-01-01"):
        return None
    text = value.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        digits = re.match(r"\d*", frac)
        frac_digits = digits.group(0)[:6] if digits else ""
        rest = frac[len(digits.group(0)) if digits else 0:]
        text = f"{head}.{frac_digits or '0'}{rest}"
    if not re.search(r"[+-]\d\d:\d\d$", text):
        text += "+00:00"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def record_from_attrs(attrs: Mapping[str, Any]) -> ContainerRecord:
    """A `ContainerRecord` from Docker's inspect JSON."""
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    host_config = attrs.get("HostConfig") or {}
    labels = dict(config.get("Labels") or {})
    ports: set[int] = set()
    for bindings in (host_config.get("PortBindings") or {}).values():
        for b in bindings or []:
            if str(b.get("HostPort") or "").isdigit():
                ports.add(int(b["HostPort"]))
    health = (state.get("Health") or {}).get("Status") or None
    running = state.get("Status") == "running"
    nets = ((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    networks = tuple(sorted(n for n in nets if n not in ("bridge", "host", "none")))
    return ContainerRecord(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        model=labels.get(LABEL_MODEL, ""),
        state=str(state.get("Status", "unknown")),
        health=health,
        spec_hash=labels.get(LABEL_SPEC_HASH),
        image=str(config.get("Image", "")),
        ports=tuple(sorted(ports)),
        started_at=parse_time(state.get("StartedAt")) if running else None,
        exit_code=None if running else state.get("ExitCode"),
        restart_count=int(attrs.get("RestartCount") or 0),
        labels=labels,
        networks=networks,
        oom_killed=bool(state.get("OOMKilled")),
    )
