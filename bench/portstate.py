"""When a port's sockets are done changing state: the load's true end.

Used by the benchmark before it stops its ground-truth counter, and by the
tests before they stop the tracer.
"""

from __future__ import annotations

import time

# /proc/net/tcp{,6} state codes: a TIME_WAIT socket makes no more state
# changes, a listener none until its holder closes it
_SETTLED = ("06", "0A")


def wait_port_settled(port: int, timeout: float = 10.0) -> list[str]:
    """Return once no socket on `port` can still change state by itself (only
    TIME_WAIT and LISTEN entries left in /proc/net/tcp and tcp6); returns the sockets
    still busy when `timeout` ran out (empty: settled).

    A loopback close hands its FIN or ACK to the softirq, which may run later
    in ksoftirqd: when the load's last call returns, the last connection's
    final transitions may not have happened yet. The kernel's socket table is
    the readiness signal; the wait is bounded."""
    hexport = f"{port:04X}"
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, state = fields[1], fields[2], fields[3]
                    if state not in _SETTLED and hexport in (local.rsplit(":", 1)[1], remote.rsplit(":", 1)[1]):
                        busy.append(line.strip())
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.001)   # polling the socket table: there is no notification for it
