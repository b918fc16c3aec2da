"""Container churn under the load: the load generator (its worker processes
with it) is moved into a fresh docker-style cgroup every `period` seconds and
the one it left is removed.

So every few hundred connections the load's events carry a cgroup id the
tracer's container enricher has never seen, and the cgroups of earlier events
are gone by the time they are looked up — what a node that starts and stops
containers all the time does to the tracer. Used by `bench/run.py
--container-churn` for the untraced run and every traced one alike.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        f = line.split()
        if len(f) > 2 and f[2] == "cgroup2":
            return Path(f[1])
    return None


def _cgroup_of(root: Path, pid: int) -> Path | None:
    """The cgroup v2 directory of process `pid` (None if it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].lstrip("/")
    except OSError:
        pass
    return None


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first (the load generator forks one
    process per worker: a container's processes move together)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:          # exited meanwhile: nothing under it to move
            pass
    return out


def move_tree(cgroup: Path, pid: int) -> bool:
    """Moves `pid` and its descendants into `cgroup`; False once `pid` is gone.
    A descendant that exited between the listing and the move is skipped; one
    forked after the listing is born where its parent is and moves next time."""
    procs = cgroup / "cgroup.procs"
    for i, p in enumerate(process_tree(pid)):
        try:
            procs.write_text(str(p))
        except OSError:
            if i == 0:           # the load itself has exited
                return False
    return True


class Churn:
    """Moves process `pid` and its descendants between fresh scopes under its
    own slice until stop(); every cgroup it made is removed (also on error)."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        root = cgroup2_mount()
        if root is None:
            raise RuntimeError("no cgroup v2 mount: --container-churn needs one")
        # where the process was: it goes back there at stop() if it is still
        # alive (an error, a timeout, Ctrl-C), or its scope could not be removed
        self.home = _cgroup_of(root, pid)
        self.base = root / f"tcpstates-bench-churn-{os.getpid()}.slice"
        self.base.mkdir(exist_ok=True)
        self.pid, self.period = pid, period
        self.created = self.removed = 0
        self._stop = threading.Event()
        self._current: Path | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            scope = self.base / f"docker-{os.urandom(32).hex()}.scope"
            scope.mkdir()
            self.created += 1
            if not move_tree(scope, self.pid):      # the load has exited
                scope.rmdir()
                self.removed += 1
                return
            self._retire(self._current)
            self._current = scope
            self._stop.wait(self.period)

    def _retire(self, scope: Path | None) -> None:
        if scope is not None:
            try:
                scope.rmdir()
                self.removed += 1
            except OSError:
                pass

    def stop(self) -> None:
        """Its last cgroup and the slice go; a process still running (the run
        failed or was interrupted) is first moved back where it came from."""
        self._stop.set()
        self._thread.join()
        if self.home is not None:
            move_tree(self.home, self.pid)      # exited (ESRCH): nothing to move
        # a killed load's workers die a moment after it (their parent-death
        # signal is delivered asynchronously): their scope empties shortly
        deadline = time.monotonic() + 5
        while True:
            self._retire(self._current)
            for leftover in self.base.iterdir():
                if leftover.is_dir():
                    self._retire(leftover)
            try:
                self.base.rmdir()
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    # not raised: stop() runs in a finally, and the run's own
                    # error is the one to see
                    print(f"bench: could not remove {self.base} ({e.strerror}); "
                          f"remove it once its processes have exited", file=sys.stderr)
                    return
                time.sleep(0.05)
