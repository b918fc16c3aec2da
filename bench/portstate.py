"""The load's ports: a free one to listen on, and when its sockets are done
changing state (the load's true end).

Used by the benchmark (its ground-truth counter is stopped once the port has
settled) and by the tests (before they stop the tracer).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

# /proc/net/tcp{,6} state codes: a TIME_WAIT socket makes no more state
# changes, a listener none until its holder closes it
_SETTLED = ("06", "0A")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _unprivileged_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def free_port(family: int = socket.AF_INET) -> int:
    """A port nobody uses now, outside the kernel's ephemeral range: a
    client's local port can then never equal a port a test listens on, so
    records filtered by the test's ports are about its own connections only
    (a client of one listener given the port of another would be counted
    twice)."""
    addr = "127.0.0.1" if family == socket.AF_INET else "::1"
    low, high = _ephemeral_range()
    # above the well-known services first; a wide range (`1024 65535` is a
    # common tuning) leaves none there: then below 10000, as low as the kernel
    # lets us bind (it refuses a range starting below ip_unprivileged_port_start,
    # so no port under that is ever ephemeral; binding one needs root)
    lowest = 512 if os.geteuid() == 0 else _unprivileged_start()
    candidates = ([p for p in range(10000, 65536) if not low <= p <= high]
                  or [p for p in range(lowest, 10000) if not low <= p <= high])
    if not candidates:
        raise RuntimeError(f"every port from {lowest} up is in the ephemeral range {low}-{high}: "
                           f"no port to listen on that a client cannot be given (run as root)")
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found outside the ephemeral range {low}-{high} in 200 tries")


def tcp_rows(net: str = "/proc/net") -> Iterator[list[str]]:
    """The fields of every TCP socket row of a namespace's tcp and tcp6 tables
    (`net`: /proc/net for this process's namespace, /proc/1/net for the
    host's); a table that cannot be read gives none."""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{net}/{name}") as f:
                next(f, None)
                rows = [line.split() for line in f]
        except OSError:
            continue
        yield from rows


def row_ports(fields: list[str]) -> tuple[int, int]:
    """(local port, remote port) of a tcp_rows() row."""
    return int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)


def wait_port_settled(port: int, timeout: float = 10.0) -> list[str]:
    """Return once no socket on `port` can still change state by itself (only
    TIME_WAIT and LISTEN entries left in /proc/net/tcp and tcp6); returns the sockets
    still busy when `timeout` ran out (empty: settled).

    A loopback close hands its FIN or ACK to the softirq, which may run later
    in ksoftirqd: when the load's last call returns, the last connection's
    final transitions may not have happened yet. The kernel's socket table is
    the readiness signal; the wait is bounded."""
    deadline = time.monotonic() + timeout
    while True:
        busy = [" ".join(f) for f in tcp_rows() if f[3] not in _SETTLED and port in row_ports(f)]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.001)   # polling the socket table: there is no notification for it
