"""The duration filter pushed into the kernel (issue 15): an upper bound
(`max_ms`) and a list of judged states (`states`) become a range per old state
in the kernel's span_range array, so events outside it never reach user space.
Unit tests of the constraints, their merging and the map contents; on the real
tracepoint, the output equals an unfiltered tracer's rows minus exactly what
the filter drops, and every event that reached user space was kept."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from traffic import client_closes_first, free_port, parse_csv

from tcpstates.api import KernelConstraints, RunContext
from tcpstates.events import STATE_NUMBERS
from tcpstates.plugins.filters.filters import SPAN_NS_MAX, DurationFilter, DurationOptions
from tcpstates.plugins.kernel import pushdown
from tcpstates.plugins.kernel.source import merge_constraints

ROOT = Path(__file__).resolve().parent.parent
EST, SYN_SENT = STATE_NUMBERS["ESTABLISHED"], STATE_NUMBERS["SYN_SENT"]


def _duration(**kw) -> DurationFilter:
    o = DurationOptions(**kw)
    o.validate()
    return DurationFilter(o, RunContext())


def test_a_lower_bound_alone_stays_a_constant():
    assert _duration(min_ms=2).kernel_constraints() == KernelConstraints(min_span_ns=2_000_000)
    assert _duration().kernel_constraints() is None


def test_an_upper_bound_or_a_state_list_is_a_range_per_old_state():
    c = _duration(min_ms=1, max_ms=5).kernel_constraints()
    assert c is not None and c.min_span_ns is None
    assert c.span_ranges == {s: (1_000_000, 5_000_000) for s in range(1, 13)}
    c = _duration(max_ms=5, states=["established", "SYN_SENT"]).kernel_constraints()
    assert c is not None and c.span_ranges == {EST: (0, 5_000_000), SYN_SENT: (0, 5_000_000)}
    c = _duration(min_ms=3, states=["ESTABLISHED"]).kernel_constraints()
    assert c is not None and c.span_ranges == {EST: (3_000_000, SPAN_NS_MAX)}


def test_ranges_of_several_filters_intersect_per_state():
    merged = merge_constraints([
        KernelConstraints(span_ranges={EST: (0, 100), SYN_SENT: (5, 50)}),
        KernelConstraints(span_ranges={EST: (10, 1000)}),
        KernelConstraints(min_span_ns=7)])
    assert merged.span_ranges == {EST: (10, 100), SYN_SENT: (5, 50)}
    assert merged.min_span_ns == 7


def test_span_plan_fills_every_state_and_folds_the_lower_bound_in():
    assert pushdown.span_plan(5, None) == pushdown.MapPlan()
    plan = pushdown.span_plan(7, {EST: (10, 100), SYN_SENT: (0, 50)})
    assert plan.cflags == ["-DTCPSTATES_FILTER_SPAN=1"]
    entries = {struct.unpack("=I", k)[0]: struct.unpack("=QQ", v) for k, v in plan.entries["span_range"]}
    assert sorted(entries) == list(range(16))
    assert entries[EST] == (10, 100)
    assert entries[SYN_SENT] == (7, 50)        # the every-state lower bound is tighter
    assert entries[STATE_NUMBERS["FIN_WAIT1"]] == (7, pushdown.SPAN_MAX)


# -- on the real kernel -----------------------------------------------------------------
HOLD_S = 0.3      # the long connections' time in ESTABLISHED, far above the bound
BOUND_MS = 150


def _connections(long_ones: int, short_ones: int) -> int:
    """Loopback connections on one port: some held ESTABLISHED for HOLD_S,
    the others closed at once; the client closes first."""
    port = free_port()
    client_closes_first(port, long_ones, hold=HOLD_S)
    client_closes_first(port, short_ones)
    return port


def _key(r: dict) -> tuple:
    return (r["LADDR"], r["LPORT"], r["RADDR"], r["RPORT"], r["OLDSTATE"], r["NEWSTATE"])


@pytest.mark.kernel
@pytest.mark.parametrize("buffer", ["ring", "perf"])
def test_an_upper_bound_per_state_is_decided_in_the_kernel(tracer, buffer):
    # two filters, so the kernel gets their intersection: ESTABLISHED at most
    # BOUND_MS, every state at most 10 s (drops nothing here); unknown spans
    # kept. A state filter that drops nothing of this traffic rides along: in
    # perf-buffer mode (kernels before 5.8) every in-kernel filter must compile
    chain = (f'chain=[{{use="duration", states=["ESTABLISHED"], max_ms={BOUND_MS}, unknown="keep"}}, '
             '{use="duration", max_ms=10000, unknown="keep"}, '
             '{use="state", transitions=["SYN_SENT->CLOSE"], exclude=true}]')
    reference = tracer("-s")          # unfiltered
    ours = tracer("-s", "-o", chain, "-o", f'sources.kernel.buffer="{buffer}"')
    port = _connections(long_ones=3, short_ones=3)
    rc, out, err = ours.stop()
    rc0, out0, err0 = reference.stop()
    assert rc == 0 and rc0 == 0, err + err0
    mine = [r for r in parse_csv(out) if port in (int(r["LPORT"]), int(r["RPORT"]))]
    ref = [r for r in parse_csv(out0) if port in (int(r["LPORT"]), int(r["RPORT"]))]
    long_est = [r for r in ref if r["OLDSTATE"] == "ESTABLISHED" and float(r["MS"]) > BOUND_MS]
    assert len(long_est) == 6, ref          # both ends of the 3 long connections
    assert all(float(r["MS"]) >= HOLD_S * 1000 * 0.9 for r in long_est)
    expected = sorted(_key(r) for r in ref if r not in long_est)
    assert sorted(_key(r) for r in mine) == expected
    assert not any(r["OLDSTATE"] == "ESTABLISHED" and float(r["MS"]) > BOUND_MS for r in mine)
    # nothing reached user space only to be dropped there: the kernel did it
    m = re.search(r"(\d+) events seen, (\d+) kept", err)
    assert m and m.group(1) == m.group(2) == str(len(parse_csv(out))), err


@pytest.mark.kernel
def test_a_lower_bound_and_a_state_filter_compile_in_perf_buffer_mode(tracer):
    # the -D constant path (a lower bound for every state) and the transition
    # map, without a ring buffer: this combination did not compile before
    chain = ('chain=[{use="duration", min_ms=0.000001, unknown="keep"}, '
             '{use="state", transitions=["SYN_SENT->CLOSE"], exclude=true}]')
    ours = tracer("-s", "-o", chain, "-o", 'sources.kernel.buffer="perf"')
    port = _connections(long_ones=0, short_ones=2)
    rc, out, err = ours.stop()
    assert rc == 0, err
    mine = [r for r in parse_csv(out) if port in (int(r["LPORT"]), int(r["RPORT"]))]
    # every known span is at least 1 ns: nothing of ours is dropped but the
    # sockets' first transitions, whose span is unknown and kept
    assert {(r["OLDSTATE"], r["NEWSTATE"]) for r in mine} >= {("ESTABLISHED", "FIN_WAIT1"),
                                                              ("ESTABLISHED", "CLOSE_WAIT")}
    assert len(mine) >= 2 * 8, out


@pytest.mark.kernel
@pytest.mark.parametrize("chain", [
    # keeps only refused connects: decided before a record is reserved
    '{use="state", transitions=["SYN_SENT->CLOSE"]}',
    # the sockets' first transitions (unknown span) by state, before reserving;
    # every other event by its known span: reserved, then discarded in the
    # kernel, leaving long runs of discarded records for the reader to skip
    '{use="state", transitions=["CLOSE->SYN_SENT", "LISTEN->SYN_RECV", "CLOSE->LISTEN"], exclude=true}, '
    '{use="duration", min_ms=0, max_ms=0.000001, unknown="keep"}'])
def test_a_storm_the_kernel_filters_away_ends_cleanly(tracer, chain):
    # this tracer died under a storm with "RecursionError" (one recursive read
    # per discarded ring record)
    t = tracer("-s", "-o", f"chain=[{chain}]", "-o", "sources.kernel.buffer_pages=64")
    port = free_port()
    load = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port),
                           "--connections", "6000", "--seconds", "60"], capture_output=True, text=True,
                          check=True)
    assert json.loads(load.stdout)["connections"] == 6000
    rc, out, err = t.stop()
    assert rc == 0, err
    mine = [r for r in parse_csv(out) if port in (int(r["LPORT"]), int(r["RPORT"]))]
    assert mine == []
    m = re.search(r"(\d+) events seen, (\d+) kept", err)
    assert m and m.group(1) == m.group(2), err
