"""Registries for tests: the `write_registry` fixture and the Docker tier's simulator fleet.

- `write_registry(text, name="models.toml") -> Path` writes a registry file under the test's
  `tmp_path` (each call rewrites it: reload tests change the file the gateway reads).
- `SIM_FLEET`: the head of a registry of simulator containers on a one-CPU budget (`[host]`,
  `[defaults]` and the sleep-mode model `sim-a`); a `str.format` template with `{image}` and
  `{port_a}`, to which a test appends its own models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

WriteRegistry = Callable[..., Path]

SIM_FLEET = """
[host]
cpus = 1
gateway_cpus = 0

[defaults]
image = "{image}"
hf_cache = ""
ipc_host = false
shm_size = "64m"
health_timeout = 30
cpus = 1

[models.sim-a]
source = "sim/a"
port = {port_a}
sleep_mode = true
"""


@pytest.fixture
def write_registry(tmp_path: Path) -> WriteRegistry:
    def write(text: str, name: str = "models.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
