"""The routing table derived from the registry."""

from __future__ import annotations

import pytest

from fleet.registry import parse_registry
from gateway.routing import RoutingTable

pytestmark = pytest.mark.unit

REG = parse_registry("""
[models.a]
source = "org/a"
port = 9001
aliases = ["gpt-4o", "org/a-alias"]
[models.r]
url = "http://10.1.2.3:8000/"
served_model_name = "tiny"
""")


def test_names_and_aliases_resolve_to_one_route() -> None:
    table = RoutingTable(REG)
    route = table.resolve("gpt-4o")
    assert route is table.resolve("a") is table.resolve("org/a-alias")
    assert route is not None and route.base_url == "http://127.0.0.1:9001"
    assert route.upstream_model == "a" and route.served_names == {"a", "gpt-4o", "org/a-alias"}
    assert table.resolve("nope") is None
    assert sorted(table.names()) == ["a", "gpt-4o", "org/a-alias", "r"]


def test_remote_model_keeps_its_url_and_served_name() -> None:
    route = RoutingTable(REG, upstream_host="service").resolve("r")
    assert route is not None and not route.managed
    assert (route.base_url, route.upstream_model) == ("http://10.1.2.3:8000", "tiny")


def test_compose_mode_uses_service_names() -> None:
    table = RoutingTable(REG, upstream_host="service")
    assert table.base_urls() == {"http://vllm-a:9001", "http://10.1.2.3:8000"}
