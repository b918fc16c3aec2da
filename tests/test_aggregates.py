"""In-kernel aggregates (issue 15): --summary and the metrics sink computed
from BPF-map histograms. The same real loopback traffic is counted both ways
— from the kernel's aggregates and from the records themselves (the run's
JSON Lines, replayed or recounted here) — and must agree exactly; alone,
summary and metrics receive no record at all while the histograms count."""

from __future__ import annotations

import collections
import json
import re
import socket
import time
import urllib.request

import pytest
from tracer import run_cli
from traffic import free_port, refused, session

from tcpstates.api import Aggregates, Histogram, RunContext
from tcpstates.events import STATE_NAMES
from tcpstates.plugins.summary.sink import SummaryOptions, SummarySink

SEEN = re.compile(r"tcpstates: (\d+) events seen, (\d+) kept")
AGGREGATED = re.compile(r"; (\d+) aggregated in kernel")


def _traffic(port: int) -> int:
    """3 full sessions and 1 refused connect: 3*5 + 2 client state changes (-D port)."""
    for _ in range(3):
        session(socket.AF_INET, port, hold=0.02, server_delay=0.0, listener_delay=0.0)
    refused(port)
    return 17


def _report(stderr: str) -> str:
    """The summary's histograms and port tables, without tcpstates: lines."""
    return "\n".join(l for l in stderr.splitlines() if not l.startswith("tcpstates:")).strip()


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _scrape_until(port: int, key: str, value: float, timeout: float = 10) -> dict[str, float]:
    """Scrape until `key` reaches `value` (the aggregates are read every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        m = _scrape(port)
        if m.get(key) == value:
            return m
        assert time.monotonic() < deadline, f"{key} never reached {value}: {m.get(key)}"
        time.sleep(0.1)


@pytest.mark.kernel
def test_summary_from_kernel_aggregates_equals_summary_from_the_records(tracer, tmp_path):
    port = free_port()
    out = tmp_path / "run.jsonl"
    t = tracer("--summary", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}", "-D", str(port))
    n = _traffic(port)
    rc, _, err = t.stop()
    assert rc == 0, err
    assert len(out.read_text().splitlines()) == n
    assert int(AGGREGATED.search(err).group(1)) == n          # counted in the kernel too
    replay = run_cli("--replay", str(out), "--summary", "-o", "sinks.summary.status=off")
    assert replay.returncode == 0, replay.stderr
    live, counted = _report(err), _report(replay.stderr.decode())
    assert "state = SYN_SENT" in live and f"{port}" in live
    assert live == counted


@pytest.mark.kernel
def test_summary_alone_receives_no_record(tracer):
    port = free_port()
    t = tracer("--sink", "summary", "-D", str(port))    # --summary alone adds it to the table
    n = _traffic(port)
    rc, out, err = t.stop()
    assert rc == 0, err
    seen, kept = map(int, SEEN.search(err).groups())
    assert (seen, kept) == (0, 0)                             # nothing reached user space
    assert "0 dropped, 0 kernel misses" in err and ", 0 unaccounted" in err
    assert int(AGGREGATED.search(err).group(1)) == n          # ...while the kernel counted all
    ports = re.search(r"RPORT\s+EVENTS\n(\d+)\s+(\d+)", err)
    assert ports and ports.groups() == (str(port), str(n))
    established = re.search(r"state = ESTABLISHED .*?\n(.*?)(\n\n|\nstate|\nLPORT|\nRPORT)", err, re.S)
    assert established and sum(int(x) for x in re.findall(r": (\d+)\s+\|", established.group(1))) == 3
    assert out == ""


def _expected_metrics(records: list[dict]) -> dict[str, float]:
    """The metric values the records imply, in the kernel's log2 buckets."""
    trans: collections.Counter[tuple[str, str]] = collections.Counter()
    hists: dict[str, list[int]] = {k: [0] * 56 for k in ("handshake", "lifetime", "close_wait")}
    est: dict[str, int] = {}
    for r in records:
        trans[(r["oldstate"], r["newstate"])] += 1
        span = r["span_us"]
        if r["newstate"] == "ESTABLISHED":
            est[r["skaddr"]] = r["mono_ns"]
            if r["oldstate"] == "SYN_SENT" and span is not None:
                hists["handshake"][span.bit_length()] += 1
        elif r["oldstate"] == "CLOSE_WAIT" and span is not None:
            hists["close_wait"][span.bit_length()] += 1
        if r["newstate"] == "CLOSE" and r["skaddr"] in est:
            hists["lifetime"][((r["mono_ns"] - est.pop(r["skaddr"])) // 1000).bit_length()] += 1
    out = {f'tcpstates_transitions_total{{new="{b}",old="{a}"}}': float(n) for (a, b), n in trans.items()}
    names = {"handshake": "tcpstates_handshake_seconds", "lifetime": "tcpstates_connection_lifetime_seconds",
             "close_wait": "tcpstates_close_wait_seconds"}
    for key, buckets in hists.items():
        running = 0
        for i in range(37):
            running += buckets[i]
            out[f'{names[key]}_bucket{{le="{Histogram.upper_bound_s(i)!r}"}}'] = float(running)
        out[f"{names[key]}_count"] = float(running)
    return out


@pytest.mark.kernel
def test_metrics_from_kernel_aggregates_equal_the_records(tracer, tmp_path):
    mport, port = free_port(), free_port()
    out = tmp_path / "run.jsonl"
    # the server side (-L): listener, 3 children through CLOSE_WAIT
    t = tracer("--sink", "metrics", "-o", f"sinks.metrics.listen=127.0.0.1:{mport}",
               "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}", "-L", str(port))
    for _ in range(3):          # each returns once its sockets have settled
        session(socket.AF_INET, port, hold=0.02, server_delay=0.01, listener_delay=0.0)

    def ours(m: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in m.items() if k.startswith((
            "tcpstates_transitions_total", "tcpstates_handshake", "tcpstates_connection_lifetime",
            "tcpstates_close_wait")) and not k.endswith(("_sum", "_created")) and 'le="+Inf"' not in k}
    # every transition has happened; the aggregates are read every 0.5 s, so
    # a scrape shows them all once two scrapes 0.6 s apart agree (bounded)
    _scrape_until(mport, "tcpstates_close_wait_seconds_count", 3)
    deadline = time.monotonic() + 10
    got = ours(_scrape(mport))
    while time.monotonic() < deadline:
        time.sleep(0.6)
        again = ours(_scrape(mport))
        if again == got:
            break
        got = again
    rc, _, err = t.stop()       # the records are complete once the tracer has stopped
    assert rc == 0, err
    expected = _expected_metrics([json.loads(line) for line in out.read_text().splitlines()])
    assert expected["tcpstates_close_wait_seconds_count"] == 3
    assert expected["tcpstates_connection_lifetime_seconds_count"] == 3
    assert got == expected


@pytest.mark.kernel
def test_metrics_alone_receive_no_record(tracer):
    mport, port = free_port(), free_port()
    t = tracer("--sink", "metrics", "-o", f"sinks.metrics.listen=127.0.0.1:{mport}", "-D", str(port))
    _traffic(port)
    m = _scrape_until(mport, 'tcpstates_transitions_total{new="SYN_SENT",old="CLOSE"}', 4)
    rc, _, err = t.stop()
    assert rc == 0, err
    assert SEEN.search(err).groups() == ("0", "0")
    assert m['tcpstates_transitions_total{new="ESTABLISHED",old="SYN_SENT"}'] == 3
    assert m["tcpstates_handshake_seconds_count"] == 3
    assert m["tcpstates_connection_lifetime_seconds_count"] == 3
    assert m['tcpstates_connection_lifetime_seconds_bucket{le="0.016384"}'] == 0   # held 20 ms
    assert m['tcpstates_connection_lifetime_seconds_bucket{le="0.262144"}'] == 3


@pytest.mark.kernel
def test_aggregates_off_counts_from_records(tracer):
    port = free_port()
    t = tracer("--summary", "-D", str(port), "-o", "sources.kernel.aggregates=off")
    n = _traffic(port)
    rc, _, err = t.stop()
    assert rc == 0, err
    assert SEEN.search(err).groups() == (str(n), str(n)) and not AGGREGATED.search(err)
    assert "state = SYN_SENT" in err


def test_summary_sink_takes_its_figures_from_aggregates():
    import io
    out = io.StringIO()
    sink = SummarySink(SummaryOptions(status="off"), RunContext(aggregates=True), stream=out)
    from tcpstates.testing import make_event
    sink.write([make_event(oldstate="ESTABLISHED", newstate="FIN_WAIT1", span_ns=5, sport=1)])  # ignored
    hist = Histogram([0] * 56)
    hist.buckets[17] = 2
    sink.write_aggregates(Aggregates(events=2, states={1: hist}, local_ports={80: 2}))
    sink.close()
    text = out.getvalue()
    assert f"state = {STATE_NAMES[1]}" in text and re.search(r"65536 -> 131071\s+: 2 ", text)
    assert re.search(r"^80\s+2$", text, re.M) and not re.search(r"^1\s+1$", text, re.M)


def test_events_needed_only_for_non_aggregate_sinks_enrichers_and_partial_filters():
    """The pipeline's generic decision, from class attributes and constraints only."""
    import types

    from tcpstates.api import Enricher, Filter, KernelConstraints, Sink
    from tcpstates.pipeline import ChainLink, Pipeline

    class Agg(Sink):
        consumes_aggregates = True

    class Plain(Sink):
        pass

    class Full(Filter):
        def kernel_constraints(self):
            return KernelConstraints(local_ports=frozenset({1}), complete=True)

    class Partial(Filter):
        def kernel_constraints(self):
            return KernelConstraints(min_span_ns=5)

    class Enr(Enricher):
        pass

    def pipe(sinks, chain):
        p = Pipeline.__new__(Pipeline)
        p.sinks = [types.SimpleNamespace(sink=cls(None, RunContext())) for cls in sinks]
        p.chain = [ChainLink(c.__name__, c(None, RunContext()), "skip", issubclass(c, Filter)) for c in chain]
        return p

    assert not pipe([Agg], []).events_needed()
    assert not pipe([Agg, Agg], [Full]).events_needed()
    assert pipe([Agg, Plain], []).events_needed()
    assert pipe([Agg], [Partial]).events_needed()
    assert pipe([Agg], [Full, Enr]).events_needed()
    # a filter the kernel decides only in part: the aggregates would count too much
    assert pipe([Agg], [Full]).aggregates_exact() and pipe([Agg], [Full, Enr]).aggregates_exact()
    assert not pipe([Agg], [Partial]).aggregates_exact()


@pytest.mark.kernel
def test_a_filter_not_fully_in_the_kernel_keeps_counting_from_records(tracer, tmp_path):
    """--summary with a user-space-only filter (process, a command-name glob
    nobody matches that is not a plain prefix: such globs are not decided in
    the kernel): the kernel's
    aggregates would count everything, so the summary counts the (filtered)
    events and shows nothing."""
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[chain]]\nuse = "process"\ncomm = ["*no-such"]\n')
    t = tracer("--config", str(cfg), "--sink", "summary", "-D", str(port))
    n = _traffic(port)
    rc, _, err = t.stop()
    assert rc == 0, err
    assert SEEN.search(err).groups() == (str(n), "0") and not AGGREGATED.search(err)
    assert "state = " not in err


def test_metrics_serve_log2_buckets_from_aggregates():
    from tcpstates.plugins.metrics.sink import MetricsOptions, MetricsSink
    sink = MetricsSink(MetricsOptions(listen="127.0.0.1:0"), RunContext(aggregates=True))
    sink.open()
    try:
        port = sink.server.server_address[1]
        sink.write([])                              # nothing counted per event
        hs = Histogram([0] * 56, sum_ns=3_000_000)
        hs.buckets[11] = 3                          # 1024..2047 µs
        sink.write_aggregates(Aggregates(events=5, transitions={(2, 1): 3, (7, 2): 2},
                                         extra={"handshake": hs}))
        m = _scrape(port)
    finally:
        sink.close()
    assert m['tcpstates_transitions_total{new="ESTABLISHED",old="SYN_SENT"}'] == 3
    assert m['tcpstates_handshake_seconds_bucket{le="0.001024"}'] == 0
    assert m['tcpstates_handshake_seconds_bucket{le="0.002048"}'] == 3
    assert m['tcpstates_handshake_seconds_bucket{le="+Inf"}'] == 3
    assert m["tcpstates_handshake_seconds_sum"] == 0.003
    assert m["tcpstates_close_wait_seconds_count"] == 0
