"""The vLLM simulator as a real process on a real port, for tests and benchmarks.

    server = start_sim(served_names=("tiny",), ttft_ms=0, itl_ms=0)   # waits for /health
    ...
    server.stop()

Fixtures: `sim_factory` (function-scoped; call it like `start_sim`, every server it started is
stopped at teardown) and `sim` (one default simulator serving "tiny").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest

from support.ports import free_port

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_PATH = "/models/sim-tiny"


@dataclass
class SimServer:
    """A running simulator process."""

    base_url: str
    port: int
    process: subprocess.Popen[bytes]
    served_names: tuple[str, ...]
    model: str
    max_model_len: int
    _log: IO[bytes] = field(repr=False)

    @property
    def name(self) -> str:
        """The first served name (the one requests without `model` get)."""
        return self.served_names[0]

    def url(self, path: str) -> str:
        return self.base_url + path

    def logs(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def wait_healthy(self, timeout: float = 15.0) -> None:
        wait_healthy(self, timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """Terminate (SIGTERM, then SIGKILL after `timeout`) and wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        code = self.process.returncode
        if not self._log.closed:
            self._log.close()
        return code


def wait_healthy(server: SimServer, timeout: float = 15.0) -> None:
    """Poll `/health` until 200; fail with the process's output on timeout or early exit."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=httpx.Timeout(2.0)) as client:
        while time.monotonic() < deadline:
            code = server.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"simulator exited with {code} before becoming healthy:\n{server.logs()}")
            try:
                r = client.get(server.url("/health"))
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.02)
    raise TimeoutError(
        f"simulator on port {server.port} not healthy after {timeout} s ({last}):\n"
        f"{server.logs()}")


def start_sim(
    *,
    served_names: Sequence[str] = ("tiny",),
    model: str = DEFAULT_MODEL_PATH,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    load_seconds: float = 0.0,
    ttft_ms: float = 0,
    itl_ms: float = 0,
    max_model_len: int = 2048,
    port: int | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
    timeout: float = 15.0,
    python: str | None = None,
) -> SimServer:
    """Start `python -m vllm_sim` on a free port; wait for /health unless `wait=False`.

    `args` are extra vLLM flags; `env` extra environment (e.g. VLLM_SIM_* knobs,
    VLLM_SERVER_DEV_MODE); the keyword knobs set VLLM_SIM_LOAD_SECONDS / _TTFT_MS / _ITL_MS.
    `python` is the interpreter (default: $VLLM_SIM_PYTHON, else this one), e.g. a venv
    with nothing but uvicorn to check the simulator needs nothing more.
    """
    port = port if port is not None else free_port(host)
    python = python or os.environ.get("VLLM_SIM_PYTHON") or sys.executable
    cmd = [python, "-m", "vllm_sim", "--model", model, "--served-model-name",
           *served_names, "--host", host, "--port", str(port),
           "--max-model-len", str(max_model_len), *args]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SIM_")}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    child_env["VLLM_SIM_LOAD_SECONDS"] = str(load_seconds)
    child_env["VLLM_SIM_TTFT_MS"] = str(ttft_ms)
    child_env["VLLM_SIM_ITL_MS"] = str(itl_ms)
    child_env.update(env or {})
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                               stdin=subprocess.DEVNULL)
    server = SimServer(base_url=f"http://{host}:{port}", port=port, process=process,
                       served_names=tuple(served_names), model=model,
                       max_model_len=max_model_len, _log=log)
    if wait:
        try:
            wait_healthy(server, timeout)
        except BaseException:
            server.stop()
            raise
    return server


SimFactory = Callable[..., SimServer]


@pytest.fixture
def sim_factory() -> Iterator[SimFactory]:
    """`sim_factory(**start_sim_kwargs) -> SimServer`; all of them stopped at teardown."""
    started: list[SimServer] = []

    def factory(**kwargs: object) -> SimServer:
        server = start_sim(**kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def sim(sim_factory: SimFactory) -> SimServer:
    """A simulator serving "tiny" with no delays."""
    return sim_factory()
