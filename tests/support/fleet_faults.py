"""Helpers for the fleet's Docker tier: a Docker socket a test can cut, and a runner
for the `fleet` CLI scoped to one test.

    with DockerSocketProxy(directory) as proxy:        # unix://<directory>/docker.sock
        run = FleetRunner(session, tmp_path, registry_text, docker_host=proxy.url)
        proxy.cut_on(b"/containers/json")              # the next container listing cuts it
        proxy.cut(); proxy.restore()                   # the daemon goes away / comes back
        proxy.hang_on(b"/containers/json")             # that request is never answered

The proxy forwards bytes between its own Unix socket and the real daemon's, so the real
dockerd (shared with other work) is never stopped. `cut()` makes the daemon vanish as a
stopped dockerd does: the socket file goes away and every open connection is closed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from support.docker_fixtures import TEST_LABEL, DockerSession, docker_cli

REPO_ROOT = Path(__file__).resolve().parents[2]
CASE_LABEL = "io.vllm-fleet.test-case"
_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ")


def upstream_docker_socket(environ: dict[str, str] | None = None) -> str:
    """The real daemon's socket path: $DOCKER_HOST if it is a unix:// URL, else the default."""
    host = (os.environ if environ is None else environ).get("DOCKER_HOST", "")
    return host.removeprefix("unix://") if host.startswith("unix://") else "/var/run/docker.sock"


class DockerSocketProxy:
    """A Unix-socket forwarder in front of the Docker daemon that a test controls."""

    def __init__(self, directory: Path, upstream: str | None = None) -> None:
        self.path = directory / "docker.sock"
        self.upstream = upstream or upstream_docker_socket()
        self.requests: list[str] = []  # request lines seen, in order
        self.cut_event = threading.Event()  # set when the proxy is cut
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._cut_marker: bytes | None = None
        self._hang_marker: bytes | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (again) on `path`."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(64)
        with self._lock:
            self._listener = listener
            self.cut_event.clear()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    restore = start

    def cut(self) -> None:
        """The daemon goes away: no socket file, every open connection closed."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self._cut_marker = None
            self._hang_marker = None
        if listener is not None:
            listener.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        for conn in conns:
            _close(conn)
        self.cut_event.set()

    def cut_on(self, marker: bytes) -> None:
        """Cut the proxy when a request containing `marker` arrives (before forwarding it)."""
        with self._lock:
            self._cut_marker = marker

    def hang_on(self, marker: bytes) -> None:
        """Hold every request containing `marker`: never forwarded, never answered."""
        with self._lock:
            self._hang_marker = marker

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> DockerSocketProxy:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- forwarding -----------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream)
            except OSError:
                _close(client)
                _close(upstream)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        held = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and data.startswith(_METHODS):
                    line = data.split(b"\r\n", 1)[0]
                    with self._lock:
                        self.requests.append(line.decode("latin-1"))
                        cut = self._cut_marker is not None and self._cut_marker in line
                        hang = self._hang_marker is not None and self._hang_marker in line
                    if cut:
                        self.cut()
                        return
                    held = held or hang
                if not held:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if not held:
                _close(src)
                _close(dst)
                with self._lock:
                    self._conns.discard(src)
                    self._conns.discard(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FleetRunner:
    """Runs `python -m fleet` in one test's scope: its registry, labels (the session's run id
    and a per-test case id), container name prefix, lock file and Docker host."""

    def __init__(self, session: DockerSession, directory: Path, registry_text: str,
                 docker_host: str | None = None) -> None:
        self.case = uuid.uuid4().hex[:6]
        self.prefix = f"vft-{session.run_id}-{self.case}"
        self.registry = directory / "models.toml"
        self.registry.write_text(registry_text)
        self.labels = {TEST_LABEL: session.run_id, CASE_LABEL: self.case}
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "FLEET_REGISTRY": str(self.registry),
            "FLEET_NAME_PREFIX": self.prefix,
            "FLEET_EXTRA_LABELS": ",".join(f"{k}={v}" for k, v in self.labels.items()),
            "FLEET_LOCK_FILE": str(directory / "fleet.lock"),
            "FLEET_STOP_TIMEOUT": "10",
        }
        self.env.pop("FLEET_DOCKER_HOST", None)
        if docker_host is not None:
            self.env["DOCKER_HOST"] = docker_host

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fleet", *args]

    def popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd(*args), env={**self.env, **env}, cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __call__(self, *args: str, timeout: float = 120.0,
                 **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **env}, cwd=REPO_ROOT, check=False)

    def ok(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        r = self(*args, timeout=timeout)
        assert r.returncode == 0, f"fleet {' '.join(args)} exited {r.returncode}:\n{r.stderr}"
        return r

    def status(self) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in json.loads(self.ok("status", "--json").stdout)}

    def status_rows(self) -> list[dict[str, Any]]:
        """`fleet status --json`: one row per replica."""
        return list(json.loads(self.ok("status", "--json").stdout))

    def states(self) -> dict[str, str]:
        return {name: row["state"] for name, row in self.status().items()}

    def container(self, model: str) -> str:
        """The container name the fleet gives replica 0 of `model`."""
        return f"{self.prefix}-{model}"

    def containers(self) -> list[str]:
        out = docker_cli("ps", "-a", "--filter", f"label={CASE_LABEL}={self.case}",
                         "--format", "{{.Names}}").stdout
        return sorted(out.split())
