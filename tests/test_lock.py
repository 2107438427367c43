"""The switch lock across real processes: exclusion, timeout naming the holder, release on
the holder's death, re-entrancy within a process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleet.errors import LockTimeout
from fleet.lock import LockUnavailable, SwitchLock, default_lock_path

pytestmark = pytest.mark.unit

HOLDER = """
import sys
from fleet.lock import SwitchLock
lock = SwitchLock(sys.argv[1], timeout=10)
lock.acquire()
print("locked", flush=True)
sys.stdin.read()   # hold until the test closes stdin (or kills us)
lock.release()
print("released", flush=True)
"""

WORKER = """
import os, sys
from fleet.lock import SwitchLock
lock_path, counter, marker, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lock = SwitchLock(lock_path, timeout=30, poll_interval=0.001)
for _ in range(n):
    with lock:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another is inside
        value = int(open(counter).read())
        open(counter, "w").write(str(value + 1))
        os.close(fd)
        os.unlink(marker)
"""


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def holder(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "fleet.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    yield path, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_a_waiter_times_out_with_a_message_naming_the_holder(holder) -> None:  # type: ignore[no-untyped-def]
    path, proc = holder
    waits: list[str] = []
    lock = SwitchLock(path, timeout=0.3, on_wait=waits.append)
    with pytest.raises(LockTimeout) as exc:
        lock.acquire()
    msg = str(exc.value)
    assert f"pid {proc.pid}" in msg and str(path) in msg and "waited 0.3s" in msg
    assert waits and f"pid {proc.pid}" in waits[0]
    assert not lock.held


def test_the_lock_is_released_when_its_holder_dies(holder) -> None:  # type: ignore[no-untyped-def]
    path, proc = holder
    proc.kill()
    proc.wait(timeout=10)
    lock = SwitchLock(path, timeout=5)
    with lock:
        assert lock.held
        assert f"pid {os.getpid()}" in lock.holder()
    assert lock.holder() == ""  # cleared on release


def test_a_waiter_gets_the_lock_when_the_holder_releases(holder) -> None:  # type: ignore[no-untyped-def]
    path, proc = holder
    lock = SwitchLock(path, timeout=20)
    assert proc.stdin is not None
    proc.stdin.close()  # the holder releases and exits
    with lock:
        assert lock.held
    assert proc.wait(timeout=10) == 0


def test_two_processes_never_overlap_inside_the_lock(tmp_path: Path) -> None:
    counter, marker = tmp_path / "counter", tmp_path / "inside"
    counter.write_text("0")
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "l"), str(counter),
                               str(marker), str(n)], env=_env(), stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert counter.read_text() == str(2 * n)


def test_reentrant_in_one_thread_exclusive_between_threads(tmp_path: Path) -> None:
    lock = SwitchLock(tmp_path / "l", timeout=5)
    with lock:
        with lock:  # nested use (e.g. an API call inside a switch) does not deadlock
            assert lock.held
        assert lock.held
        got: list[bool] = []

        def other() -> None:
            try:
                lock.acquire(timeout=0.2)
                got.append(True)
                lock.release()
            except LockTimeout:
                got.append(False)

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
        assert got == [False]
    assert not lock.held


def test_default_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-shared-dir"
    assert default_lock_path({"FLEET_LOCK_FILE": "/x/l", "FLEET_LOCK_DIR": "/d"}) == Path("/x/l")
    assert default_lock_path({"FLEET_LOCK_DIR": "/d"}, uid=0) == Path("/d/switch.lock")
    # Root, or anyone once compose made the shared directory, uses the directory compose
    # mounts into its gateway.
    assert default_lock_path({}, shared_dir=missing, uid=0) == missing / "switch.lock"
    assert default_lock_path({}, shared_dir=tmp_path, uid=1000) == tmp_path / "switch.lock"
    assert default_lock_path({"XDG_RUNTIME_DIR": str(tmp_path)}, shared_dir=missing,
                             uid=1000) == tmp_path / "vllm-fleet.lock"
    assert default_lock_path({}, shared_dir=missing, uid=1000) == Path("/tmp/vllm-fleet-1000.lock")


def test_a_lock_file_it_may_not_write_is_still_a_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's lock file (root's compose gateway made it): taken read-only."""
    path = tmp_path / "switch.lock"
    path.write_text("pid 1: gateway\n")
    real_open = os.open

    def no_write(p: str | os.PathLike[str], flags: int, *a: int) -> int:
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", no_write)
    first = SwitchLock(path, timeout=0.2)
    with first:
        assert first.held
        script = ("import sys; from fleet.lock import SwitchLock, LockTimeout\n"
                  "try:\n SwitchLock(sys.argv[1], timeout=0.2).acquire()\nexcept LockTimeout:\n"
                  " sys.exit(3)")
        other = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                               timeout=60, check=False,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert other.returncode == 3, other.stderr
    assert not first.held
    assert path.read_text() == "pid 1: gateway\n"  # nothing written through a read-only fd


def test_a_lock_it_cannot_open_says_how_to_move_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(p: str | os.PathLike[str], flags: int, *a: int) -> int:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(LockTimeout, match="FLEET_LOCK_DIR") as info:
        SwitchLock(tmp_path / "switch.lock", timeout=0.2).acquire()
    assert isinstance(info.value, LockUnavailable)
    assert "Permission denied" in str(info.value)
