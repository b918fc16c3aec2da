"""The container enricher on a pure cgroup v2 host (no v1 hierarchy at all).

Such a host cannot be made here: this test host is hybrid (v1 controllers plus
v2 at /sys/fs/cgroup/unified), and a process cannot leave the v1 hierarchies.
So the files that tell the enricher what kind of host it is on — /proc/self/cgroup,
/proc/self/mounts, and each owner's /proc/PID/stat and /proc/PID/cgroup — are
written out here as a pure v2 host writes them (a procfs of our own making, the
enricher's `proc` option). The cgroups whose ids the kernel would capture are
real: made and removed under this host's v2 mount, resolved by the kernel.

On a pure v2 host the owner's cgroup id, captured in the kernel in the owner's
own context, is the whole truth: when it resolves it answers, when its cgroup
is gone nothing else is asked (the owner's /proc/PID now describes whatever
process holds the PID, or a cgroup it moved to since). Only an owner without an
id (known from /proc at start) is looked up in /proc/PID/cgroup."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cgroupfs import CgroupMaker, unique

from tcpstates.api import RunContext
from tcpstates.events import Event
from tcpstates.plugins.container.cgroups import cgroup2_root, host_is_v1_or_hybrid
from tcpstates.plugins.container.enricher import ContainerEnricher, ContainerOptions

pytestmark = pytest.mark.root

PID = 4242
IN_PROC = "a" * 64            # the container /proc/PID/cgroup names
# as Debian 12 / Fedora / Ubuntu >= 21.10 with systemd's unified hierarchy write them
SELF_CGROUP = "0::/user.slice/user-0.slice/session-1.scope\n"
MOUNTS = ("sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
          "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
          "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0\n"
          "none /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n")


def _pure_v2_proc(root: Path) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(SELF_CGROUP)
    (proc / "self" / "mounts").write_text(MOUNTS)
    d = proc / str(PID)
    d.mkdir()
    # stat: start time (field 22) 5 ticks after boot; comm with a space and a ')'
    (d / "stat").write_text(f"{PID} (my (srv) x) S " + " ".join(["0"] * 18 + ["5"] + ["0"] * 10) + "\n")
    (d / "cgroup").write_text(f"0::/system.slice/docker-{IN_PROC}.scope\n")     # one line: v2 only
    return proc


def _event(**owner) -> Event:
    # the event's time: now (after the owner's start), on CLOCK_MONOTONIC as the kernel's
    return Event(ts_ns=time.monotonic_ns(), skaddr=1, span_ns=None, pid=1, tid=1, comm="swapper", family=2,
                 saddr="127.0.0.1", sport=1, daddr="127.0.0.1", dport=2, oldstate=1, newstate=8,
                 cgroup_id=0, extra=dict(owner))


@pytest.fixture
def cgroups():
    maker = CgroupMaker()
    yield maker
    maker.cleanup()


def test_pure_v2_host_texts_are_read_as_such(tmp_path):
    proc = _pure_v2_proc(tmp_path)
    assert cgroup2_root(str(proc / "self" / "mounts")) == Path("/sys/fs/cgroup")
    assert host_is_v1_or_hybrid(str(proc / "self" / "cgroup")) is False
    enricher = ContainerEnricher(ContainerOptions(proc=str(proc), names=False, docker_socket=""), RunContext())
    assert enricher.hybrid is False                      # hybrid = "auto" decided it from the texts


def test_pure_v2_host_the_kernel_cgroup_id_is_the_whole_truth(tmp_path, cgroups):
    proc = _pure_v2_proc(tmp_path)
    live_cid = unique()
    live = cgroups.make(f"system.slice/docker-{live_cid}.scope")
    gone = cgroups.make(f"system.slice/docker-{unique()}.scope")
    live_id, gone_id = os.stat(live).st_ino, os.stat(gone).st_ino
    gone.rmdir()

    def enrich(hybrid: str, **owner) -> dict:
        e = _event(**owner)
        enricher = ContainerEnricher(ContainerOptions(proc=str(proc), names=False, docker_socket="",
                                                      hybrid=hybrid), RunContext())
        enricher.enrich_batch([e])
        return e.extra

    # known from /proc at start (no id captured): /proc/PID/cgroup's one v2 line tells
    got = enrich("auto", owner_pid=PID, owner_start=5, owner_source="proc")
    assert got.get("container_id") == IN_PROC and got["container_runtime"] == "docker", got
    # ... but not a process that started at another time (the PID was reused)
    got = enrich("auto", owner_pid=PID, owner_start=6, owner_source="proc")
    assert "container_id" not in got, got
    # the kernel's id resolves: it answers, whatever /proc/PID says now
    got = enrich("auto", owner_pid=PID, owner_start=5, owner_cgroup_id=live_id, owner_source="io")
    assert got.get("container_id") == live_cid, got
    # the id's cgroup is gone: unknown — /proc/PID is not asked on a v2-only host ...
    got = enrich("auto", owner_pid=PID, owner_start=5, owner_cgroup_id=gone_id, owner_source="io")
    assert "container_id" not in got and "cgroup" not in got, got
    # ... where a hybrid host (v1 containers hide behind the v2 id) would ask it
    got = enrich("yes", owner_pid=PID, owner_start=5, owner_cgroup_id=gone_id, owner_source="io")
    assert got.get("container_id") == IN_PROC, got
