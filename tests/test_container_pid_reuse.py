"""A PID reused by a new process in another container (issue 12: the container
and owner_comm of the *old* process were carried over), on the real kernel.

A process in container A connects and exits; the kernel hands its PID to a
new process (ns_last_pid), which moves into container B and connects. The
tracer is stopped (SIGSTOP) meanwhile, so every event is processed after the
reuse: the adversarial order, where a cache keyed by PID, or a /proc/PID read
for the old process's events, would find the new one. The cgroups are real,
made as the runtimes make them (tests/helpers/cgroupfs.py), the runtimes'
metadata files laid out in tmp (tests/helpers/containerroots.py):

* v2: docker scopes; the container comes from the owner's cgroup id the
  kernel captured;
* hybrid (v1 hierarchies, this host has them): the v2 line of both names only
  containerd.service, the containers are v1 cgroups, read from /proc/PID/cgroup
  under the process's identity (PID and start time).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from cgroupfs import CgroupMaker, unique, v1_roots
from containerroots import Roots
from traffic import free_port

pytestmark = pytest.mark.kernel

# exits at once unless it got PID argv[3] (0: any); else moves into every
# cgroup.procs given, makes two refused connects, says "done <start ticks>",
# and, told to stay, waits for a line on stdin (so /proc/PID still exists)
WORKLOAD = r"""
import os, socket, sys
procs, port, target, stay = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "stay"
if target and os.getpid() != target:
    print("miss", flush=True)
    sys.exit(0)
for p in procs:
    open(p, "w").write("0")
for _ in range(2):
    c = socket.socket()
    try:
        c.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        pass
    c.close()
stat = open("/proc/self/stat").read()
print("done", stat[stat.rfind(")") + 2:].split()[19], flush=True)
if stay:
    sys.stdin.readline()
"""


@pytest.fixture
def cgroups():
    maker = CgroupMaker()
    yield maker
    maker.cleanup()


def _start(dirs: list[Path], port: int, target: int, stay: bool) -> tuple[subprocess.Popen, list[str]]:
    p = subprocess.Popen([sys.executable, "-c", WORKLOAD, ",".join(str(d / "cgroup.procs") for d in dirs),
                          str(port), str(target), "stay" if stay else "go"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().split()


def _reuse(dirs: list[Path], port: int, pid: int) -> tuple[subprocess.Popen, int]:
    """A process with PID `pid` in `dirs` (asked of the kernel through
    ns_last_pid; other processes may take it first: retried), and its start."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p, said = _start(dirs, port, pid, stay=True)
        if said and said[0] == "done":
            return p, int(said[1])
        p.wait(10)
    pytest.fail("could not get the PID reused (other processes kept taking it)")


@pytest.mark.parametrize("layout", ["v2", "hybrid"])
def test_reused_pid_in_another_container_gets_its_own_container(tracer, tmp_path, cgroups, layout):
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("/proc/sys/kernel/ns_last_pid is not writable: PID reuse cannot be arranged")
    old_id, new_id = unique(), unique()
    roots = Roots(tmp_path)
    roots.docker_ctr(old_id, name="/old-ctr", image="old:1")
    roots.docker_ctr(new_id, name="/new-ctr", image="new:2")
    if layout == "v2":
        old_dirs = [cgroups.make(f"system.slice/docker-{old_id}.scope")]
        new_dirs = [cgroups.make(f"system.slice/docker-{new_id}.scope")]
    else:
        if not v1_roots():
            pytest.skip("host has no cgroup v1 hierarchies: tests/test_cgroups.py covers hybrid /proc texts")
        shim = cgroups.make(f"tcps-{old_id[:8]}.slice/containerd.service")     # runc < 1.1: v1 only
        old_dirs = [shim, *cgroups.make_v1(f"docker/{old_id}")]
        new_dirs = [shim, *cgroups.make_v1(f"docker/{new_id}")]
    port = free_port()
    out = tmp_path / "e.jsonl"
    t = tracer("--sink", "jsonl", "-D", str(port), "-o", f"sinks.jsonl.path={out}", "-o", roots.chain())
    new = None
    os.kill(t.proc.pid, signal.SIGSTOP)
    try:
        old, said = _start(old_dirs, port, 0, stay=False)
        assert said[0] == "done", said
        old_start = int(said[1])
        assert old.wait(10) == 0
        new, new_start = _reuse(new_dirs, port, old.pid)
    finally:
        os.kill(t.proc.pid, signal.SIGCONT)
    try:
        rc, _, err = t.stop()                # drains while the new process still lives
    finally:
        if new is not None:
            new.stdin.close()
            new.wait(10)
    assert rc == 0, err
    assert new_start != old_start, "one identity: the reuse came within a clock tick"
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert all(r["owner_pid"] == old.pid for r in recs), recs
    mine = [r for r in recs if r["owner_start"] == new_start]
    theirs = [r for r in recs if r["owner_start"] == old_start]
    assert len(mine) == 4 and len(theirs) == 4, recs
    # the new process's events: its container, by id and by name, never the old one's
    for r in mine:
        assert (r.get("container_id"), r.get("container_name"), r.get("container_image")) == \
            (new_id, "new-ctr", "new:2"), r
    # the old process's: its own container (its cgroup id still resolves) or, where
    # only its /proc/PID could tell (hybrid) and that is another process now, none
    for r in theirs:
        if layout == "v2":
            assert (r.get("container_id"), r.get("container_name")) == (old_id, "old-ctr"), r
        else:
            assert "container_id" not in r and r.get("systemd_unit") == "containerd.service", r
