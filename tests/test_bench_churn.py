"""bench/churn.py (bench/run.py --container-churn): every cgroup it makes is
removed, also when the run ends with the load still running (an error, a
timeout, Ctrl-C). Real cgroup v2, a real process; no BPF."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from churn import Churn, cgroup2_mount  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or cgroup2_mount() is None,
                                reason="needs root and a cgroup v2 mount")


def _wait(cond, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def _cgroup(pid: int) -> str:
    return next(l[3:] for l in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if l.startswith("0::"))


def test_churn_stopped_while_the_load_still_runs_leaves_no_cgroup():
    """Review 10: stop() with the load alive (run_load's finally after a
    timeout or Ctrl-C) failed with EBUSY and left the slice and a scope."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        home = _cgroup(proc.pid)
        churn = Churn(proc.pid, 0.01)
        try:
            _wait(lambda: churn.created >= 3, "the load was never moved")
            assert _cgroup(proc.pid).startswith(f"/{churn.base.name}/docker-")
        finally:
            churn.stop()
        assert not churn.base.exists()
        assert _cgroup(proc.pid) == home        # back where it was, still running
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_churn_after_the_load_exited_removes_every_cgroup():
    proc = subprocess.Popen(["sleep", "0.3"])
    churn = Churn(proc.pid, 0.01)
    proc.wait()
    churn.stop()
    assert not churn.base.exists()
    assert churn.created == churn.removed and churn.created > 0


def test_churn_moves_the_load_workers_with_the_load():
    """Review of 0b7a5fb: the load generator's workers are processes; moving only
    its PID left every connection in the cgroup it was born in, while
    `cgroups_created` still counted up."""
    # a parent that forks a worker and waits for it, as bench/loadgen.py does
    proc = subprocess.Popen([sys.executable, "-c",
                             "import os, time\n"
                             "pid = os.fork()\n"
                             "if pid == 0:\n    time.sleep(60)\n    os._exit(0)\n"
                             "print(pid, flush=True)\nos.waitpid(pid, 0)\n"],
                            stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    try:
        home = _cgroup(worker)
        churn = Churn(proc.pid, 0.01)
        try:
            _wait(lambda: churn.created >= 3, "the load was never moved")
            seen = set()
            # the worker follows the load into every new scope
            _wait(lambda: (seen.add(_cgroup(worker)) or len(seen) >= 2)
                  and _cgroup(worker).startswith(f"/{churn.base.name}/docker-"),
                  "the worker stayed where it was born")
        finally:
            churn.stop()
        assert not churn.base.exists()
        assert _cgroup(worker) == home
    finally:
        os.kill(worker, 9)
        proc.wait()
