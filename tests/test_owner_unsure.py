"""A kernel owner record marked "maybe gone" (TCPSTATES_OWNER_UNSURE): user
space names the owner only if that very process is alive now, checked on real
processes in this machine's /proc (a live one, and a zombie)."""

from __future__ import annotations

import os

import pytest

from tcpstates.api import RunContext
from tcpstates.events import Event
from tcpstates.plugins.owner.enricher import (
    C_OBSERVE_AVAILABLE,
    KERNEL_OWNER,
    RAW_OWNER,
    UNSURE,
    OwnerEnricher,
    OwnerOptions,
)
from tcpstates.plugins.owner.sockowners import NS_PER_TICK


def _start_ticks(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])


def _label(raw: bytes, use_c: bool) -> dict:
    enricher = OwnerEnricher(OwnerOptions(scan_existing=False), RunContext())
    enricher.use_c = use_c
    e = Event(ts_ns=1, skaddr=0xff01, span_ns=None, pid=1, tid=1, comm="c", family=2, saddr="127.0.0.1",
              sport=18080, daddr="127.0.0.1", dport=5555, oldstate=1, newstate=8, cgroup_id=0,
              extra={KERNEL_OWNER: raw})
    enricher.observe_batch([e])
    return e.extra


LOOPS = [False] + ([True] if C_OBSERVE_AVAILABLE else [])


@pytest.mark.parametrize("use_c", LOOPS, ids=lambda c: "c" if c else "python")
def test_a_live_unsure_owner_is_named(use_c):
    me = os.getpid()
    raw = RAW_OWNER.pack(_start_ticks(me) * NS_PER_TICK, 1, me, 3 | UNSURE, b"me")
    extra = _label(raw, use_c)
    assert extra["owner_pid"] == me and extra["owner_source"] == "io", extra


@pytest.mark.parametrize("use_c", LOOPS, ids=lambda c: "c" if c else "python")
def test_an_unsure_owner_that_is_a_zombie_is_unknown(use_c):
    # a zombie (exited, not reaped) still has /proc/PID/stat with its start
    # time; it has exited, so naming it would be confidently wrong
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)     # exited, left unreaped
        ticks = _start_ticks(pid)
        raw = RAW_OWNER.pack(ticks * NS_PER_TICK, 1, pid, 3 | UNSURE, b"gone")
        extra = _label(raw, use_c)
        assert extra["owner_pid"] is None and extra["owner_source"] == "unknown", (pid, extra)
    finally:
        os.waitpid(pid, 0)
