"""Ground truth: the kernel's own count of sock:inet_sock_set_state hits for a port.

A private ftrace instance (its own ring buffer: it neither sees nor disturbs
anyone else's tracing) records the event, filtered in the kernel to the
load's port. Nobody reads it during the run, so it costs the load almost
nothing; afterwards the per-CPU `entries:` counters give the exact number
recorded, and `overrun:` proves none was overwritten (the buffer is sized
for the run; an overrun is reported, never hidden).
"""

from __future__ import annotations

import os
from pathlib import Path

from portstate import wait_port_settled

TRACEFS = Path("/sys/kernel/tracing")
BYTES_PER_EVENT = 96       # generous: the raw record is 72 bytes plus headers


class TracepointCounter:
    def __init__(self, port: int, max_events: int) -> None:
        self.dir = TRACEFS / "instances" / f"tcpstates-bench-{os.getpid()}-{port}"
        self.dir.mkdir()
        self.event = self.dir / "events" / "sock" / "inet_sock_set_state"
        ncpu = os.cpu_count() or 1
        # every event may land on one CPU: size each CPU's buffer for all of them
        kb = max(1024, max_events * BYTES_PER_EVENT // 1024 + 1024)
        (self.dir / "buffer_size_kb").write_text(str(kb))
        (self.dir / "tracing_on").write_text("1")
        (self.event / "filter").write_text(f"sport == {port} || dport == {port}")
        (self.event / "enable").write_text("1")
        self.ncpu = ncpu
        self.port = port

    def _stat(self, key: str) -> int:
        total = 0
        for stats in (self.dir / "per_cpu").glob("cpu*/stats"):
            for line in stats.read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split(":")[1])
        return total

    def stop(self) -> tuple[int, int]:
        """(events recorded, events overwritten); stops recording once the
        port's last transitions have happened (see portstate.py)."""
        wait_port_settled(self.port)
        (self.event / "enable").write_text("0")
        return self._stat("entries"), self._stat("overrun")

    def close(self) -> None:
        (self.dir / "buffer_size_kb").write_text("7")
        self.dir.rmdir()
