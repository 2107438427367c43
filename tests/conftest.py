"""Test tiers and the rule that, in CI, a skipped test is a failure.

Each test module declares its tier with `pytestmark = pytest.mark.<tier>` (unit, gateway,
docker, browser, vllm, swarm). With REQUIRE_ALL_TIERS=1 (set by .ci/run and `make test`), any skip turns into
a failure, so a tier that cannot run never passes quietly.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["support.gateway_fixtures", "support.sim_fixtures", "support.docker_fixtures",
                  "support.vllm_fixtures", "support.registries", "support.swarm_fixtures"]

TIERS = ("unit", "gateway", "docker", "browser", "vllm", "swarm")


def _require_all() -> bool:
    return os.environ.get("REQUIRE_ALL_TIERS", "") not in ("", "0", "false", "no")


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (marked `pytest.mark.anyio`) run on asyncio."""
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = [i.nodeid for i in items if not any(i.get_closest_marker(t) for t in TIERS)]
    if untiered:
        raise pytest.UsageError(
            "tests without a tier marker (add `pytestmark = pytest.mark.<tier>`): "
            + ", ".join(untiered[:5])
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _require_all() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped while REQUIRE_ALL_TIERS=1 (a tier must not skip in CI): {reason}"
