"""The container enricher's batch loop (memos per batch, inlined for speed)
gives every event exactly what enrich() gives it alone.

A procfs of our own making stands in for /proc here: a real host cannot hold
processes in arbitrary runtimes' cgroups, nor a PID that is reused between
two events (the real-cgroup tests are in test_containers.py)."""

from __future__ import annotations

import random
from pathlib import Path

from tcpstates.api import RunContext
from tcpstates.events import Event
from tcpstates.plugins.container.enricher import ContainerEnricher, ContainerOptions

CGROUPS = [
    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789"
    ".slice/cri-containerd-" + "a" * 64 + ".scope\n",
    "0::/system.slice/docker-" + "b" * 64 + ".scope\n",
    "0::/system.slice/nginx.service\n",
    "12:pids:/docker/" + "c" * 64 + "\n0::/system.slice/containerd.service\n",
    "0::/user.slice/user-1000.slice/session-3.scope\n",
]


def _proc(root: Path, pid: int, start_ticks: int, cgroup: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start_ticks)] + ["0"] * 10
    (d / "stat").write_text(f"{pid} (x) " + " ".join(fields) + "\n")
    (d / "cgroup").write_text(cgroup)


def _enricher(proc: Path) -> ContainerEnricher:
    return ContainerEnricher(ContainerOptions(proc=str(proc), hybrid="yes", names=False, docker_socket=""),
                             RunContext())


def _events(n: int, seed: int) -> list[Event]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        pid = rnd.choice([101, 102, 103, 104, 105, 999, None])
        extra: dict = rnd.choice([
            {"owner_pid": pid, "owner_cgroup_id": 0}, {"owner_pid": pid}, {},
            {"owner_pid": True}, {"owner_pid": 101.0}, {"owner_pid": "101"},
        ])
        out.append(Event(ts_ns=10**9 + i * 1000, skaddr=i, span_ns=None, pid=rnd.choice([101, 104, 7]), tid=1,
                         comm="x", family=2, saddr="127.0.0.1", sport=1, daddr="127.0.0.1", dport=2,
                         oldstate=1, newstate=4, cgroup_id=0, extra=extra))
    return out


def test_batch_loop_equals_one_event_at_a_time(tmp_path):
    proc = tmp_path / "proc"
    for k, pid in enumerate((101, 102, 103, 104, 105)):
        _proc(proc, pid, 5, CGROUPS[k])
    (proc / "self").mkdir()
    (proc / "self" / "cgroup").write_text("0::/\n")
    batch, alone = _events(600, 1), _events(600, 1)
    _enricher(proc).enrich_batch(batch)
    single = _enricher(proc)
    for e in alone:
        single.enrich(e)
    assert [e.extra for e in batch] == [e.extra for e in alone]
    assert sum("container_id" in e.extra for e in batch) > 40           # containers were found
    assert any(e.extra.get("systemd_unit") == "nginx.service" for e in batch)


def test_a_pid_reused_within_a_batch_is_not_carried_over(tmp_path):
    """PID 101 is a docker container's process for the early events; then it
    is gone and the PID belongs to a process started after the later event's
    time: that event must not borrow the first process's container."""
    proc = tmp_path / "proc"
    _proc(proc, 101, 5, CGROUPS[1])
    (proc / "self").mkdir()
    (proc / "self" / "cgroup").write_text("0::/\n")
    enricher = _enricher(proc)
    early = _events(3, 2)
    for e in early:
        e.extra = {"owner_pid": 101}
    enricher.enrich_batch(early)
    assert all(e.extra.get("container_id") == "b" * 64 for e in early)
    # the PID reused by a process that started long after the event
    _proc(proc, 101, 10**12, CGROUPS[2])
    late = _events(2, 3)
    for e in late:
        e.extra = {"owner_pid": 101}
    enricher.enrich_batch(late)
    assert all("container_id" not in e.extra for e in late), [e.extra for e in late]


def test_a_pid_reused_before_the_event_is_not_the_owner_the_event_names(tmp_path):
    """The event names owner 101 with start time 3 (an owner the kernel still
    remembers, e.g. one that exited while a child kept the socket); PID 101 now
    belongs to a process that started at tick 5, before the event: another
    process, whose container the event must not get — alone or in a batch."""
    proc = tmp_path / "proc"
    _proc(proc, 101, 5, CGROUPS[1])
    (proc / "self").mkdir()
    (proc / "self" / "cgroup").write_text("0::/\n")
    enricher = _enricher(proc)
    stale, alone = _events(3, 4), _events(1, 4)[0]
    for e in [*stale, alone]:
        e.extra = {"owner_pid": 101, "owner_start": 3, "owner_cgroup_id": 0}
    enricher.enrich_batch(stale)
    enricher.enrich(alone)
    assert all("container_id" not in e.extra for e in [*stale, alone]), [e.extra for e in stale]
    # the same PID with its own start time is that process
    right = _events(2, 5)
    for e in right:
        e.extra = {"owner_pid": 101, "owner_start": 5, "owner_cgroup_id": 0}
    enricher.enrich_batch(right)
    assert all(e.extra.get("container_id") == "b" * 64 for e in right)


def test_an_identity_the_kernel_names_is_read_once_and_outlives_its_process(tmp_path, monkeypatch):
    """With the owner's start time from the kernel, (PID, start) is the process:
    read from /proc once, then known without a read per batch — and still
    known after the process exits or its PID is reused, for the events that
    name it. An event that names another start time, or none, asks /proc."""
    from tcpstates.plugins.container import enricher as module
    reads: list[int] = []
    real = module.read_process
    monkeypatch.setattr(module, "read_process", lambda pid, proc: (reads.append(pid), real(pid, proc))[1])
    proc = tmp_path / "proc"
    _proc(proc, 101, 5, CGROUPS[1])
    (proc / "self").mkdir()
    (proc / "self" / "cgroup").write_text("0::/\n")
    enricher = _enricher(proc)

    def batch(extra: dict, seed: int) -> list[Event]:
        events = _events(3, seed)
        for e in events:
            e.extra = dict(extra)
        enricher.enrich_batch(events)
        return events

    named = {"owner_pid": 101, "owner_start": 5, "owner_cgroup_id": 0}
    assert all(e.extra.get("container_id") == "b" * 64 for e in batch(named, 6))
    assert reads == [101]
    assert all(e.extra.get("container_id") == "b" * 64 for e in batch(named, 7))
    assert reads == [101]                                     # no read for the second batch
    _proc(proc, 101, 9, CGROUPS[2])                           # exited; the PID reused since
    assert all(e.extra.get("container_id") == "b" * 64 for e in batch(named, 8))
    assert all(e.extra.get("systemd_unit") == "nginx.service"
               for e in batch({"owner_pid": 101, "owner_start": 9, "owner_cgroup_id": 0}, 9))
    assert all("container_id" not in e.extra and e.extra.get("systemd_unit") == "nginx.service"
               for e in batch({"owner_pid": 101, "owner_cgroup_id": 0}, 10))    # no start: /proc says
    assert reads == [101, 101, 101]
    late = {"owner_pid": 101, "owner_start": 10**12, "owner_cgroup_id": 0}    # started after the events
    batch(late, 11)
    enricher.by_identity.put((101, 10**12), enricher.by_identity[(101, 5)])
    assert all("container_id" not in e.extra for e in batch(late, 12))
