"""Images pulled when missing (the `pull` policy) with per-layer progress, failed pulls that
say what to do, and loads you can watch: a line every few seconds per loading model.
Fakes only (no Docker): tests/support/fleet_fakes.py and a stand-in docker-py client."""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests

from fleet.api import FleetClient
from fleet.cli import main
from fleet.engine import DockerEngine
from fleet.errors import EngineError, ImageMissing, PullFailed, RegistryError
from fleet.pull import PullProgress, pull_failed_message
from fleet.registry import parse_registry
from fleet.states import Action, Phase
from support.fleet_fakes import REGISTRY_TOML, FakeWorld, make_fleet, make_registry

pytestmark = pytest.mark.unit

IMAGE = "vllm-fleet/sim:dev"  # every model's image in REGISTRY_TOML


def with_pull(policy: str, text: str = REGISTRY_TOML) -> str:
    return text.replace('image = "vllm-fleet/sim:dev"\n',
                        f'image = "vllm-fleet/sim:dev"\npull = "{policy}"\n', 1)


# -- the policy ------------------------------------------------------------------------------


def test_a_missing_image_is_pulled_once_with_per_layer_progress(tmp_path: Path) -> None:
    world = FakeWorld()
    world.missing_images.add(IMAGE)
    world.pullable.add(IMAGE)
    said: list[str] = []
    fleet = make_fleet(world, make_registry(REGISTRY_TOML.replace("0.6", "0.3")), tmp_path,
                       messages=said)
    report = fleet.up(["a", "b"])                      # two models, one image
    assert world.names("pull") == [IMAGE]
    first = report.actions[0]
    assert (first.model, first.action, first.note) == ("a", Action.PULL, IMAGE)
    assert list(report.timings) == [Phase.PULL, Phase.START, Phase.HEALTHY, Phase.TOTAL]
    layer_lines = [m for m in said if "layer aaa111" in m]
    assert layer_lines == [f"pull {IMAGE}: layer aaa111: Pulling fs layer",
                           f"pull {IMAGE}: layer aaa111: Downloading 1.0MB/2.0MB",
                           f"pull {IMAGE}: layer aaa111: Pull complete"]  # 2nd download: throttled
    assert said.index(f"pulling {IMAGE} for a") < said.index(
        next(m for m in said if m.startswith("creating a")))
    assert world.awake_models() == {"a", "b"}


def test_present_images_are_not_pulled_unless_always(tmp_path: Path) -> None:
    world = FakeWorld()
    make_fleet(world, make_registry(), tmp_path).up(["a"])
    assert world.names("pull") == []
    world2 = FakeWorld()
    world2.pullable.add(IMAGE)
    report = make_fleet(world2, make_registry(with_pull("always")), tmp_path).up(["a"])
    assert world2.names("pull") == [IMAGE] and Phase.PULL in report.timings


def test_never_refuses_a_missing_image_before_starting_anything(tmp_path: Path) -> None:
    world = FakeWorld()
    world.missing_images.add(IMAGE)
    world.pullable.add(IMAGE)
    fleet = make_fleet(world, make_registry(with_pull("never")), tmp_path)
    with pytest.raises(ImageMissing) as caught:
        fleet.up(["a"])
    assert str(caught.value) == (
        f"cannot bring up a: its image {IMAGE} is not on this host (build it with "
        f"scripts/build-images.sh or `docker pull {IMAGE}`); nothing was started")
    assert world.names("pull") == [] and world.names("run") == []


def test_a_failed_pull_names_the_image_the_answer_and_what_to_do_before_evicting(
        tmp_path: Path) -> None:
    world = FakeWorld()
    fleet = make_fleet(world, make_registry(), tmp_path)
    fleet.up(["a"])
    other = "registry.example:5000/team/model:nope"
    registry = make_registry(REGISTRY_TOML.replace(
        'autostart = false\n', f'autostart = false\nimage = "{other}"\n', 1))
    fleet = make_fleet(world, registry, tmp_path)
    world.missing_images.add(other)
    with pytest.raises(PullFailed) as caught:
        fleet.switch("b")                       # would evict a
    text = str(caught.value)
    assert text.startswith(f"cannot switch to b: cannot pull image {other}: registry.example:5000 "
                           f"answered: manifest for {other} not found: manifest unknown")
    assert "check the image name and tag" in text and text.endswith("nothing was evicted")
    assert caught.value.image == other and "manifest unknown" in caught.value.answer
    assert world.awake_models() == {"a"} and world.names("stop") == []


def test_on_demand_activation_pulls_too(tmp_path: Path) -> None:
    world = FakeWorld()
    world.missing_images.add(IMAGE)
    world.pullable.add(IMAGE)
    client = FleetClient(make_fleet(world, make_registry(), tmp_path))
    report = client.ensure_awake("b")
    assert report is not None and world.names("pull") == [IMAGE]
    assert report.bring_up_kind == "create"


def test_the_pull_setting_is_validated_and_managed_only() -> None:
    with pytest.raises(RegistryError) as caught:
        parse_registry(with_pull("sometimes"), source="t.toml")
    assert "[defaults]: field 'pull'" in str(caught.value)
    assert "'missing', 'always' or 'never'" in str(caught.value)
    with pytest.raises(RegistryError, match="pull only apply to managed models"):
        parse_registry(REGISTRY_TOML.replace('url = "http://10.0.0.9:8000"',
                                             'url = "http://10.0.0.9:8000"\npull = "always"'))
    r = parse_registry(with_pull("never").replace('[models.b]\n', '[models.b]\npull = "always"\n'))
    assert (r.defaults.pull, r.models["a"].pull, r.models["b"].pull) == ("never", None, "always")


# -- progress and messages -----------------------------------------------------------------


def test_pull_progress_throttles_repeating_steps_per_layer() -> None:
    now = [0.0]
    lines: list[str] = []
    p = PullProgress("x:1", lines.append, lambda: now[0])
    for current in (1, 2, 3):
        p({"status": "Downloading", "id": "l1", "progressDetail": {"current": current * 10**6,
                                                                   "total": 5 * 10**6}})
    now[0] = 2.5
    p({"status": "Downloading", "id": "l1", "progressDetail": {"current": 4 * 10**6,
                                                               "total": 5 * 10**6}})
    p({"status": "Digest: sha256:abc"})
    assert lines == ["pull x:1: layer l1: Downloading 1.0MB/5.0MB",
                     "pull x:1: layer l1: Downloading 4.0MB/5.0MB", "pull x:1: Digest: sha256:abc"]


def test_failed_pull_messages_say_what_to_do() -> None:
    text = pull_failed_message("ghcr.io/org/private:1", "unauthorized: authentication required")
    assert "ghcr.io answered: unauthorized" in text and "`docker login ghcr.io`" in text
    text = pull_failed_message("vllm/vllm-openai:v1", "Get \"https://registry-1.docker.io/v2/\": "
                               "dial tcp: lookup registry-1.docker.io: no such host")
    assert "docker.io answered" in text and "reachable from the Docker daemon's host" in text


# -- DockerEngine.pull against a stand-in docker-py client -----------------------------------


class FakeApi:
    def __init__(self, events: list[Any], error: Exception | None = None,
                 block: threading.Event | None = None) -> None:
        self.events, self.error, self.block = events, error, block
        self.calls: list[tuple[Any, ...]] = []

    def pull(self, repo: str, **kw: Any) -> Iterator[Any]:
        self.calls.append((repo, kw))
        if self.error is not None:
            raise self.error
        yield from self.events
        if self.block is not None:
            self.block.wait(10)


class FakeDocker:
    def __init__(self, api: FakeApi) -> None:
        self.api = api

    def close(self) -> None:
        pass


def test_docker_engine_pull_passes_events_and_maps_failures() -> None:
    api = FakeApi([{"status": "Pulling fs layer", "id": "l1"}, {"status": "Pull complete",
                                                                "id": "l1"}])
    engine = DockerEngine("unix:///x.sock", client_factory=lambda: FakeDocker(api))
    seen: list[Any] = []
    engine.pull("127.0.0.1:5000/sim:pulltest", seen.append)
    assert [e["status"] for e in seen] == ["Pulling fs layer", "Pull complete"]
    assert api.calls == [("127.0.0.1:5000/sim", {"tag": "pulltest", "stream": True,
                                                 "decode": True})]
    api = FakeApi([{"error": "manifest unknown", "errorDetail": {"message": "manifest for "
                                                                  "x:nope not found"}}])
    engine = DockerEngine("unix:///x.sock", client_factory=lambda: FakeDocker(api))
    with pytest.raises(PullFailed, match=re.escape("cannot pull image x:nope: docker.io "
                                                   "answered: manifest for x:nope not found")):
        engine.pull("x:nope", seen.append)
    response = requests.Response()
    response.status_code = 404
    api = FakeApi([], docker.errors.NotFound("404", response=response,
                                             explanation="pull access denied for x"))
    engine = DockerEngine("unix:///x.sock", client_factory=lambda: FakeDocker(api))
    with pytest.raises(PullFailed, match="answered: pull access denied for x") as caught:
        engine.pull("x", seen.append)
    assert "`docker login docker.io`" in str(caught.value)


def test_a_silent_pull_is_an_error_not_a_hang() -> None:
    release = threading.Event()
    api = FakeApi([{"status": "Pulling fs layer", "id": "l1"}], block=release)
    engine = DockerEngine("unix:///x.sock", client_factory=lambda: FakeDocker(api),
                          pull_silence=0.2)
    try:
        with pytest.raises(EngineError,
                           match=re.escape("reported nothing for 0.2s while pulling x:1")):
            engine.pull("x:1", lambda _: None)
    finally:
        release.set()


# -- loads you can watch ---------------------------------------------------------------------


def test_a_loading_model_is_said_every_few_seconds_with_its_latest_log_line(
        tmp_path: Path) -> None:
    world = FakeWorld()
    said: list[str] = []
    fleet = make_fleet(world, make_registry(), tmp_path, messages=said, watch_every=5.0)
    world.load_seconds["a"] = 12
    fleet.up(["a"])
    watch = [m for m in said if ": loading," in m]
    assert [m.split(";")[0] for m in watch] == ["a: loading, 5s of its 60s health_timeout",
                                                "a: loading, 10s of its 60s health_timeout"]
    assert all(m.endswith("; last log line: INFO starting a") for m in watch)
    said.clear()
    fleet.down()
    make_fleet(world, make_registry(), tmp_path, messages=said, watch_every=0).up(["a"])
    assert not [m for m in said if ": loading," in m]


def run_cli(world: FakeWorld, tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    registry_file = tmp_path / "models.toml"
    registry_file.write_text(REGISTRY_TOML)

    def builder(registry, args, progress):  # type: ignore[no-untyped-def]
        fleet = make_fleet(world, registry, tmp_path)
        fleet._progress = progress
        return fleet

    out, err = io.StringIO(), io.StringIO()
    code = main(["--registry", str(registry_file), *argv], fleet_builder=builder,
                stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_shows_load_lines_on_stderr_keeps_json_stdout_clean_and_quiet_hides_them(
        tmp_path: Path) -> None:
    world = FakeWorld()
    world.load_seconds["a"] = 12
    code, out, err = run_cli(world, tmp_path, "up", "a", "--json")
    assert code == 0, err
    assert json.loads(out)["operation"] == "up"          # stdout: the report alone
    assert "a: loading, 5s of its 60s health_timeout; last log line: INFO starting a" in err
    world2 = FakeWorld()
    world2.load_seconds["a"] = 12
    code, out, err = run_cli(world2, tmp_path, "--quiet", "up", "a")
    assert code == 0 and "loading" not in err and "creating" not in err
    assert err.startswith("up a: start ")                 # the timings line stays
