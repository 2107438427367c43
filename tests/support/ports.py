"""Free TCP ports on loopback for tests (the kernel's pick; free when asked, not reserved)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listened on at `host` when asked."""
    (port,) = free_ports(1, host)
    return port


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports, all free at `host` at once when asked."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def consecutive_free_ports(n: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port p such that p .. p+n-1 were all free at `host` when asked (replicas of one
    model take consecutive ports)."""
    for _ in range(attempts):
        base = free_port(host)
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found in {attempts} attempts")
