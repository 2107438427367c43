"""fleet.addressing: the fleet inside the compose gateway reaches models by service name."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.addressing import AddressedProbe, address_map, addressed
from fleet.api import build_fleet, load_settings
from fleet.health import HealthResult
from fleet.registry import parse_registry

pytestmark = pytest.mark.unit

TEXT = """
[defaults]
host_ip = "0.0.0.0"

[models.chat]
source = "org/chat"
port = 8001
max_replicas = 2
target_ongoing_requests = 4

[models.remote]
url = "http://10.0.0.5:8000"
"""


class RecordingProbe:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def health(self, base_url: str) -> HealthResult:
        self.calls.append(("health", base_url))
        return HealthResult(True)

    def is_sleeping(self, base_url: str) -> bool | None:
        self.calls.append(("is_sleeping", base_url))
        return False

    def sleep(self, base_url: str, level: int = 1) -> None:
        self.calls.append(("sleep", base_url))

    def wake_up(self, base_url: str) -> None:
        self.calls.append(("wake_up", base_url))


def test_every_managed_replica_maps_to_its_service_name() -> None:
    registry = parse_registry(TEXT)
    assert address_map(registry, "service") == {
        "http://127.0.0.1:8001": "http://vllm-chat:8001",
        "http://127.0.0.1:8002": "http://vllm-chat-r1:8002",
    }
    assert address_map(registry, "models.internal")["http://127.0.0.1:8001"] == \
        "http://models.internal:8001"


def test_probe_calls_go_to_the_service_address() -> None:
    inner = RecordingProbe()
    probe = AddressedProbe(inner, parse_registry(TEXT), "service")
    probe.health("http://127.0.0.1:8002")
    probe.is_sleeping("http://127.0.0.1:8001")
    probe.sleep("http://127.0.0.1:8001")
    probe.wake_up("http://127.0.0.1:8001")
    probe.health("http://127.0.0.1:9999")  # not a replica: unchanged
    assert inner.calls == [("health", "http://vllm-chat-r1:8002"),
                           ("is_sleeping", "http://vllm-chat:8001"),
                           ("sleep", "http://vllm-chat:8001"),
                           ("wake_up", "http://vllm-chat:8001"),
                           ("health", "http://127.0.0.1:9999")]


def test_host_addressing_keeps_the_probe() -> None:
    inner = RecordingProbe()
    registry = parse_registry(TEXT)
    assert addressed(inner, registry, None) is inner
    assert addressed(inner, registry, "127.0.0.1") is inner
    assert isinstance(addressed(inner, registry, "service"), AddressedProbe)


def test_settings_wire_the_compose_gateway_fleet(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    for key, value in {"FLEET_UPSTREAM_HOST": "service", "FLEET_COMPOSE_PROJECT": "proj",
                       "FLEET_BASE_DIR": str(tmp_path), "FLEET_NETWORK": "proj",
                       "FLEET_LOCK_DIR": str(tmp_path / "locks")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FLEET_LOCK_FILE", raising=False)
    inner = RecordingProbe()
    fleet = build_fleet(parse_registry(TEXT), load_settings(), probe=inner, engine=object())  # type: ignore[arg-type]
    assert isinstance(fleet.probe, AddressedProbe) and fleet.probe.inner is inner
    assert fleet.compose_project == "proj" and fleet.network == "proj"
    assert fleet.base_dir == str(tmp_path)
    assert fleet.lock.path == tmp_path / "locks" / "switch.lock"


def test_the_gateway_fleet_follows_the_gateway_upstream_host(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gateway.cli import RegistryFleetOpener

    monkeypatch.setenv("FLEET_LOCK_FILE", str(tmp_path / "lock"))
    monkeypatch.delenv("FLEET_UPSTREAM_HOST", raising=False)
    registry = parse_registry(TEXT)
    client = RegistryFleetOpener(registry, "service")(lambda _m: False, lambda _m: 0.0)
    probe = client.fleet.probe  # type: ignore[attr-defined]
    assert isinstance(probe, AddressedProbe) and probe.upstream_host == "service"
    opener = RegistryFleetOpener(registry, "service")
    assert opener.for_registry(registry).upstream_host == "service"
    monkeypatch.setenv("FLEET_UPSTREAM_HOST", "127.0.0.1")  # an explicit fleet setting wins
    client = RegistryFleetOpener(registry, "service")(lambda _m: False, lambda _m: 0.0)
    assert not isinstance(client.fleet.probe, AddressedProbe)  # type: ignore[attr-defined]
