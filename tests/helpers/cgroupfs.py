"""Real cgroups for tests, made the way each runtime makes them, always removed.

`CgroupMaker.make(rel, v1=...)` creates `rel` under the cgroup v2 mount (and,
where the host has them, under v1 hierarchies); `cleanup()` moves every
process left back to the root and removes the directories deepest first —
it runs from a fixture finaliser, so a failing test cleans up too.
`run_in()` runs a process that moves itself into given cgroups and connects.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tcpstates.plugins.container.cgroups import cgroup2_root

V1_HIERARCHIES = ("systemd", "pids", "memory")


def v1_roots() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    return [base / h for h in V1_HIERARCHIES if (base / h / "cgroup.procs").exists()
            and (base / h) != cgroup2_root()]


class CgroupMaker:
    def __init__(self) -> None:
        root = cgroup2_root()
        if root is None:
            raise AssertionError("no cgroup v2 mount (expected /sys/fs/cgroup or /sys/fs/cgroup/unified)")
        self.v2 = root
        self.created: list[tuple[Path, Path]] = []       # (hierarchy root, created dir)

    def _mk(self, root: Path, rel: str) -> Path:
        path = root
        for part in [p for p in rel.split("/") if p]:
            path = path / part
            if not path.exists():
                path.mkdir()
                self.created.append((root, path))
        return path

    def make(self, rel: str) -> Path:
        """The v2 cgroup `rel` (parents as needed)."""
        return self._mk(self.v2, rel)

    def make_v1(self, rel: str) -> list[Path]:
        """`rel` in every v1 hierarchy this host has (hybrid / v1 hosts only)."""
        return [self._mk(root, rel) for root in v1_roots()]

    def cleanup(self) -> None:
        for root, path in reversed(self.created):
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        (root / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass          # exited meanwhile
                path.rmdir()
            except OSError:
                pass
        self.created.clear()


def unique() -> str:
    return os.urandom(32).hex()


# moves itself into every cgroup.procs given, connects COUNT times (refused), then
# waits for a line on stdin when told to stay (so /proc/PID still exists)
WORKLOAD = r"""
import socket, sys
procs, port, count, stay = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "stay"
for p in procs:
    if p:
        open(p, "w").write("0")
for i in range(count):
    c = socket.socket()
    try:
        c.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        pass
    c.close()
print("done", flush=True)
if stay:
    sys.stdin.readline()
"""


def run_in(dirs: list[Path], port: int, count: int = 2, stay: bool = False) -> subprocess.Popen:
    """WORKLOAD in the cgroups `dirs`, `count` refused connects to `port`;
    returned once they are made (staying, when told, until stdin gets a line)."""
    p = subprocess.Popen([sys.executable, "-c", WORKLOAD, ",".join(str(d / "cgroup.procs") for d in dirs),
                          str(port), str(count), "stay" if stay else "go"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "done"
    return p
