"""A recording fake of the fleet's engine, probe and clock (no Docker, no sleeps).

`FakeWorld` ties them together: containers "load" for `load_seconds` of fake time after a
start, then answer /health; `crash` makes a model's container exit at start with log lines;
`fail_run` makes `run` raise an engine error; `unreachable` makes every engine call raise,
and `cut_after` makes the daemon go away part-way through an operation; `missing_images`
are not on the host, `pullable` images are served by the fake registry. Every engine and
probe call is recorded in `world.calls` as a tuple, e.g. ("run", "vllm-fleet-a"),
("stop", "vllm-fleet-a"), ("sleep", "a"), ("pull", IMAGE).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.containers import ContainerRecord
from fleet.errors import EngineError, ImageMissing, ProbeError, PullFailed
from fleet.health import HealthResult
from fleet.lifecycle import Fleet
from fleet.lock import SwitchLock
from fleet.pull import pull_failed_message
from fleet.registry import Registry, parse_registry
from fleet.spec import LABEL_MANAGED, LABEL_MODEL, LABEL_REPLICA, LABEL_SPEC_HASH


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


@dataclass
class FakeContainer:
    id: str
    name: str
    labels: dict[str, str]
    port: int
    state: str = "created"
    started_at: float | None = None  # fake monotonic time of the last start
    exit_code: int | None = None
    sleeping: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    networks: tuple[str, ...] = ()

    @property
    def model(self) -> str:
        return self.labels.get(LABEL_MODEL, "")


class FakeWorld:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.containers: dict[str, FakeContainer] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.load_seconds: dict[str, float] = {}  # model -> seconds until /health is 200
        self.crash: set[str] = set()  # models whose container exits right after start
        self.fail_run: dict[str, EngineError] = {}  # model -> error raised by run()
        self.missing_images: set[str] = set()  # images has_image() says are absent
        self.pullable: set[str] = set()  # images the fake registry serves (pull() gets them)
        self.sleep_fails: set[str] = set()  # models whose POST /sleep fails
        self.unreachable: EngineError | None = None  # every engine call raises this
        self._cut: tuple[str, int, EngineError] | None = None
        self._ids = itertools.count(1)
        self.engine = FakeEngine(self)
        self.probe = FakeProbe(self)

    # -- helpers for tests -----------------------------------------------------------

    def cut_after(self, call: str, error: EngineError, count: int = 1) -> None:
        """The daemon goes away once `count` more calls named `call` (e.g. "run", "stop",
        "remove", "start", "sleep") are recorded: every engine call after that raises
        `error` (as `unreachable` does; set `unreachable = None` to bring it back)."""
        done = len(self.names(call))
        self._cut = (call, done + count, error)

    def _check_cut(self) -> None:
        if self._cut is not None and self.unreachable is None:
            call, count, error = self._cut
            if len(self.names(call)) >= count:
                self.unreachable, self._cut = error, None

    def add_container(self, model: str, *, port: int, spec_hash: str, state: str = "running",
                      name: str | None = None, labels: Mapping[str, str] | None = None,
                      loaded: bool = True, networks: tuple[str, ...] = (),
                      replica: int | None = None) -> FakeContainer:
        """A container that exists before the fleet looks (e.g. made by compose). Without
        `replica` it carries no replica label, as containers made before replicas existed."""
        suffix = f"-r{replica}" if replica else ""
        c = FakeContainer(
            id=f"c{next(self._ids)}", name=name or f"vllm-fleet-{model}{suffix}",
            labels={LABEL_MANAGED: "true", LABEL_MODEL: model, LABEL_SPEC_HASH: spec_hash,
                    **({} if replica is None else {LABEL_REPLICA: str(replica)}),
                    **(labels or {})},
            port=port, state=state, networks=networks,
        )
        if state == "running":
            c.started_at = self.clock.now - (10_000.0 if loaded else 0.0)
        self.containers[c.id] = c
        return c

    def by_model(self, model: str) -> list[FakeContainer]:
        return [c for c in self.containers.values() if c.model == model]

    def running_models(self) -> set[str]:
        return {c.model for c in self.containers.values() if c.state == "running"}

    def awake_models(self) -> set[str]:
        return {c.model for c in self.containers.values()
                if c.state == "running" and not c.sleeping}

    def awake_containers(self) -> list[str]:
        """Names of running, not sleeping containers, sorted."""
        return sorted(c.name for c in self.containers.values()
                      if c.state == "running" and not c.sleeping)

    def names(self, op: str) -> list[Any]:
        return [c[1] for c in self.calls if c[0] == op]

    def container_on_port(self, port: int) -> FakeContainer | None:
        for c in self.containers.values():
            if c.port == port and c.state == "running":
                return c
        return None

    def _start(self, c: FakeContainer) -> None:
        c.sleeping = False
        if c.model in self.crash:
            c.state, c.exit_code, c.started_at = "exited", 1, None
            c.log += ["INFO loading model", "ERROR EngineCore failed to start",
                      "RuntimeError: simulated failure at start"]
            return
        c.state, c.exit_code, c.started_at = "running", None, self.clock.now
        c.log.append(f"INFO starting {c.model}")


class FakeEngine:
    def __init__(self, world: FakeWorld) -> None:
        self.w = world

    def _check(self) -> None:
        self.w._check_cut()
        if self.w.unreachable is not None:
            raise self.w.unreachable

    def _record(self, c: FakeContainer) -> ContainerRecord:
        running = c.state == "running"
        return ContainerRecord(
            id=c.id, name=c.name, model=c.model, state=c.state, health=None,
            spec_hash=c.labels.get(LABEL_SPEC_HASH), image="fake", ports=(c.port,),
            started_at=(self.w.clock.time() - (self.w.clock.now - c.started_at))
            if running and c.started_at is not None else None,
            exit_code=None if running else c.exit_code, labels=dict(c.labels),
            networks=c.networks,
        )

    def _get(self, cid: str) -> FakeContainer:
        c = self.w.containers.get(cid)
        if c is None:
            raise EngineError(f"no such container {cid}")
        return c

    def list_managed(self, labels: Mapping[str, str] | None = None) -> list[ContainerRecord]:
        self._check()
        want = {LABEL_MANAGED: "true", **(labels or {})}
        return [self._record(c) for c in self.w.containers.values()
                if all(c.labels.get(k) == v for k, v in want.items())]

    def inspect(self, container: str) -> ContainerRecord | None:
        self._check()
        c = self.w.containers.get(container)
        return None if c is None else self._record(c)

    def has_image(self, image: str) -> bool:
        self._check()
        return image not in self.w.missing_images

    def pull(self, image: str, on_event: Callable[[Mapping[str, Any]], None]) -> None:
        """Two layers' worth of Docker's pull events, then the image is on the host; an
        image the fake registry does not serve fails as a real unknown tag does."""
        self._check()
        self.w.calls.append(("pull", image))
        if image not in self.w.pullable:
            answer = f"manifest for {image} not found: manifest unknown: manifest unknown"
            raise PullFailed(pull_failed_message(image, answer), image=image, answer=answer)
        on_event({"status": f"Pulling from {image.rsplit(':', 1)[0]}", "id": "dev"})
        for layer in ("aaa111", "bbb222"):
            on_event({"status": "Pulling fs layer", "id": layer, "progressDetail": {}})
            for done in (1_000_000, 2_000_000):
                on_event({"status": "Downloading", "id": layer,
                          "progressDetail": {"current": done, "total": 2_000_000}})
            on_event({"status": "Pull complete", "id": layer, "progressDetail": {}})
        on_event({"status": f"Status: Downloaded newer image for {image}"})
        self.w.missing_images.discard(image)

    def run(self, run_kwargs: Mapping[str, Any]) -> ContainerRecord:
        self._check()
        if run_kwargs["image"] in self.w.missing_images:
            raise ImageMissing(f"image {run_kwargs['image']} not found locally")
        labels = dict(run_kwargs["labels"])
        model = labels[LABEL_MODEL]
        self.w.calls.append(("run", run_kwargs["name"]))
        if model in self.w.fail_run:
            raise self.w.fail_run[model]
        if any(c.name == run_kwargs["name"] for c in self.w.containers.values()):
            raise EngineError(f"container name {run_kwargs['name']!r} is already in use")
        (host_ip, port), = run_kwargs["ports"].values()
        c = FakeContainer(id=f"c{next(self.w._ids)}", name=run_kwargs["name"], labels=labels,
                          port=int(port), kwargs=dict(run_kwargs),
                          networks=(run_kwargs["network"],) if "network" in run_kwargs else ())
        self.w.containers[c.id] = c
        self.w._start(c)
        return self._record(c)

    def start(self, container: str) -> None:
        self._check()
        c = self._get(container)
        self.w.calls.append(("start", c.name))
        self.w._start(c)

    def stop(self, container: str, timeout: float) -> None:
        self._check()
        c = self._get(container)
        self.w.calls.append(("stop", c.name))
        if c.state == "running":
            c.state, c.exit_code, c.started_at, c.sleeping = "exited", 0, None, False

    def remove(self, container: str, *, force: bool = False) -> None:
        self._check()
        c = self._get(container)
        self.w.calls.append(("remove", c.name))
        if c.state == "running" and not force:
            raise EngineError("container is running")
        del self.w.containers[container]

    def logs(self, container: str, tail: int = 50) -> str:
        self._check()
        c = self._get(container)
        return "".join(line + "\n" for line in c.log[-tail:])

    def follow_logs(self, container: str, tail: int = 50) -> Iterator[str]:
        self._check()
        yield from self._get(container).log[-tail:]


class FakeProbe:
    def __init__(self, world: FakeWorld) -> None:
        self.w = world

    def _at(self, base_url: str) -> FakeContainer | None:
        return self.w.container_on_port(int(base_url.rsplit(":", 1)[1]))

    def health(self, base_url: str) -> HealthResult:
        c = self._at(base_url)
        if c is None:
            return HealthResult(False, "connection refused")
        assert c.started_at is not None
        if self.w.clock.now - c.started_at < self.w.load_seconds.get(c.model, 0.0):
            return HealthResult(False, "connection refused")
        return HealthResult(True)

    def is_sleeping(self, base_url: str) -> bool | None:
        c = self._at(base_url)
        return None if c is None else c.sleeping

    def sleep(self, base_url: str, level: int = 1) -> None:
        c = self._at(base_url)
        model = c.model if c else base_url
        self.w.calls.append(("sleep", model))
        if c is None or model in self.w.sleep_fails:
            raise ProbeError(f"POST {base_url}/sleep failed: simulated")
        c.sleeping = True

    def wake_up(self, base_url: str) -> None:
        c = self._at(base_url)
        self.w.calls.append(("wake", c.model if c else base_url))
        if c is None:
            raise ProbeError(f"POST {base_url}/wake_up failed: connection refused")
        c.sleeping = False


REGISTRY_TOML = """
[host]
gpus = [{ id = 0 }]
gpu_memory_ceiling = 0.95

[defaults]
image = "vllm-fleet/sim:dev"
hf_cache = ""
health_timeout = 60

[models.a]
source = "org/a"
port = 18001
gpus = [0]
gpu_memory_utilization = 0.6
sleep_mode = true

[models.b]
source = "org/b"
port = 18002
gpus = [0]
gpu_memory_utilization = 0.6
autostart = false

[models.c]
source = "org/c"
port = 18003
gpus = [0]
gpu_memory_utilization = 0.3
autostart = false

[models.remote]
url = "http://10.0.0.9:8000"
"""


# Replicas: pool has 2 fixed replicas (sleep mode), auto 1..3 autoscaled, big one; on GPU 0
# pool's 2 x 0.3 + auto's 0.2 fit (0.8), big's 0.5 fits beside auto alone. 7 cores for the
# models (1 kept for the gateway), one per replica.
REPLICA_TOML = """
[host]
gpus = [{ id = 0 }]
gpu_memory_ceiling = 0.95
cpus = 8
gateway_cpus = 1

[defaults]
image = "vllm-fleet/sim:dev"
hf_cache = ""
health_timeout = 60
cpus = 1

[models.pool]
source = "org/pool"
port = 18101
gpus = [0]
gpu_memory_utilization = 0.3
replicas = 2
sleep_mode = true

[models.auto]
source = "org/auto"
port = 18111
gpus = [0]
gpu_memory_utilization = 0.2
min_replicas = 1
max_replicas = 3
target_ongoing_requests = 4

[models.big]
source = "org/big"
port = 18121
gpus = [0]
gpu_memory_utilization = 0.5
autostart = false
"""


def make_registry(text: str = REGISTRY_TOML) -> Registry:
    return parse_registry(text, source="test-models.toml")


def make_fleet(world: FakeWorld, registry: Registry, tmp_path: Path, **kw: Any) -> Fleet:
    messages: list[str] = kw.pop("messages", [])
    return Fleet(
        registry, world.engine, lock=SwitchLock(tmp_path / "fleet.lock", timeout=5),
        probe=world.probe, clock=world.clock, progress=messages.append,
        environ={"HF_TOKEN": "hf_secret_value", "HOME": "/home/u"}, base_dir=str(tmp_path),
        **kw,
    )


def spec_hash_of(fleet: Fleet, model: str) -> str:
    return fleet.specs[model].spec_hash
