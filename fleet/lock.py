"""The host-wide switch lock: one fleet decision-and-action at a time per host.

A switch observes the fleet, plans and acts; two switches interleaving those steps could both
decide that the GPU is free and over-commit it. Every mutating operation of `fleet.lifecycle`
therefore holds this lock from observation through action.

The lock is an `fcntl.flock` on a small file. The kernel releases it when the holder exits,
however it exits, so a crashed `fleet` never leaves a stale lock behind. The holder writes its
pid and command line into the file, so a waiter that times out can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from fleet.errors import LockTimeout

LOCK_ENV = "FLEET_LOCK_FILE"
LOCK_DIR_ENV = "FLEET_LOCK_DIR"
LOCK_NAME = "switch.lock"
SHARED_LOCK_DIR = Path("/run/vllm-fleet")
DEFAULT_LOCK_TIMEOUT = 600.0


class LockUnavailable(LockTimeout):
    """The lock file cannot be opened at all (its directory belongs to another user). A
    LockTimeout, so every caller that reports a lock it could not get reports this too."""

    def __init__(self, path: Path, reason: str) -> None:
        RuntimeError.__init__(
            self,
            f"cannot open the switch lock {path} ({reason}). Set {LOCK_DIR_ENV} to a directory "
            f"you may write, and the same {LOCK_DIR_ENV} for `docker compose up` (it mounts that "
            f"directory into the gateway), or run as the user that owns {path.parent}.")
        self.path = path
        self.timeout = 0.0
        self.holder = ""


def default_lock_path(environ: Mapping[str, str] | None = None, *,
                      shared_dir: Path = SHARED_LOCK_DIR, uid: int | None = None) -> Path:
    """Where the switch lock lives, first match wins:

    1. `$FLEET_LOCK_FILE`;
    2. `$FLEET_LOCK_DIR/switch.lock`;
    3. `/run/vllm-fleet/switch.lock` for root, or when that directory exists: the directory
       compose mounts into its gateway (`${FLEET_LOCK_DIR:-/run/vllm-fleet}`), so the host's
       `fleet` and the compose gateway's activations serialize on the same lock;
    4. `$XDG_RUNTIME_DIR/vllm-fleet.lock`, else `/tmp/vllm-fleet-<uid>.lock`.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(LOCK_ENV)
    if explicit:
        return Path(explicit)
    lock_dir = env.get(LOCK_DIR_ENV)
    if lock_dir:
        return Path(lock_dir) / LOCK_NAME
    user = os.getuid() if uid is None else uid
    if user == 0 or shared_dir.is_dir():
        return shared_dir / LOCK_NAME
    runtime_dir = env.get("XDG_RUNTIME_DIR")
    if runtime_dir and Path(runtime_dir).is_dir():
        return Path(runtime_dir) / "vllm-fleet.lock"
    return Path(f"/tmp/vllm-fleet-{user}.lock")


def _describe_self() -> str:
    """`pid N on HOST: COMMAND`. The host name tells a holder in a container (the compose
    gateway, whose pid means nothing on the host) from a process of this machine."""
    first = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if first is not None and first.name == "__main__.py":
        program = f"python -m {first.parent.name}"   # `python -m gateway`, `python -m fleet`
    else:
        program = first.name if first is not None else "python"
    cmd = " ".join([program, *sys.argv[1:]])
    return f"pid {os.getpid()} on {socket.gethostname()}: {cmd}"


class SwitchLock:
    """A re-entrant (per process), cross-process exclusive lock with a timeout.

    Use as a context manager: `with lock: ...`. Nested use in the same process (any thread
    that already holds it) does not deadlock; other threads of the process wait like other
    processes do.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_LOCK_TIMEOUT,
        poll_interval: float = 0.05,
        describe: Callable[[], str] = _describe_self,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else default_lock_path()
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._describe = describe
        self._on_wait = on_wait
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """What the current holder wrote into the lock file ('' if nothing readable)."""
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""

    def acquire(self, timeout: float | None = None) -> None:
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if not self._thread_lock.acquire(timeout=max(limit, 0.0)):
            raise LockTimeout(self.path, limit, "another thread of this process")
        if self._depth > 0:
            self._depth += 1
            return
        try:
            self._acquire_file(deadline, limit)
        except BaseException:
            self._thread_lock.release()
            raise
        self._depth = 1

    def _acquire_file(self, deadline: float, limit: float) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise LockUnavailable(self.path, exc.strerror or str(exc)) from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as exc:
            # Another user's lock file (e.g. root's gateway made it): flock needs no write
            # access, so take it read-only; the holder line is then not written.
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                raise LockUnavailable(self.path, exc.strerror or str(exc)) from None
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(self.path, limit, self.holder()) from None
                    if not told and self._on_wait is not None:
                        holder = self.holder() or "another process"
                        self._on_wait(f"waiting for the switch lock held by {holder}")
                        told = True
                    time.sleep(self.poll_interval)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (self._describe() + "\n").encode(), 0)
            except OSError:
                pass  # opened read-only: the lock holds, the holder line is not written
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._depth <= 0:
            raise RuntimeError("SwitchLock.release() without acquire()")
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                with contextlib.suppress(OSError):  # read-only
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._thread_lock.release()

    def __enter__(self) -> SwitchLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
