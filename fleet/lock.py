"""The host-wide switch lock: one fleet decision-and-action at a time per host.

A switch observes the fleet, plans and acts; two switches interleaving those steps could both
decide that the GPU is free and over-commit it. Every mutating operation of `fleet.lifecycle`
therefore holds this lock from observation through action.

The lock is an `fcntl.flock` on a small file. The kernel releases it when the holder exits,
however it exits, so a crashed `fleet` never leaves a stale lock behind. The holder writes its
pid and command line into the file, so a waiter that times out can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from fleet.errors import LockTimeout

LOCK_ENV = "FLEET_LOCK_FILE"
DEFAULT_LOCK_TIMEOUT = 600.0


def default_lock_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$FLEET_LOCK_FILE`, else `$XDG_RUNTIME_DIR/vllm-fleet.lock`, else
    `/tmp/vllm-fleet-<uid>.lock`."""
    env = os.environ if environ is None else environ
    explicit = env.get(LOCK_ENV)
    if explicit:
        return Path(explicit)
    runtime_dir = env.get("XDG_RUNTIME_DIR")
    if runtime_dir and Path(runtime_dir).is_dir():
        return Path(runtime_dir) / "vllm-fleet.lock"
    return Path(f"/tmp/vllm-fleet-{os.getuid()}.lock")


def _describe_self() -> str:
    cmd = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))
    return f"pid {os.getpid()}: {cmd or 'python'}"


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
            os.ftruncate(fd, 0)
            os.pwrite(fd, (self._describe() + "\n").encode(), 0)
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
