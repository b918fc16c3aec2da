"""Connection records whose ->CLOSE the kernel never ran the program for
(`closed: false`, `ending: "unknown"`): the real CLI on the real tracepoint,
plus the offline formats and the benchmark's accounting of them.

The kernel very rarely does not run the program for a tracepoint hit (counted
as "unaccounted" by the independent tracepoint count); when that hit is a
connection's ->CLOSE, its entry stays in the kernel's map until a new socket
starts at the same address. That loss cannot be had on demand, so the kernel
tests use the one fake that cannot exist otherwise: the test-only compile
switch -DTCPSTATES_TEST_SKIP_CLOSE_PORT (environment variable
TCPSTATES_TEST_SKIP_CLOSE_PORT, read only by plugins/kernel/probe.py), which
makes the program vanish, uncounted, for the ->CLOSE of connections on one
port, exactly as a lost hit does. Everything else is real: loopback
connections, the kernel freeing those sockets and reusing their memory for
later sockets, the ftrace count reporting the lost hits.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from metricspage import metrics_page
from summary import parse_summary
from traffic import client_closes_first, free_port

from tcpstates.api import RunContext
from tcpstates.events import CONNECTION, Connection, Event
from tcpstates.plugins.bcc_table.connections import ConnectionFormatter
from tcpstates.records import Rfc3339, event_record

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "event.schema.json").read_text())
sys.path.insert(0, str(ROOT / "bench"))
from run import conn_unaccounted, count_unclosed  # noqa: E402

SKIPPED = 3            # connections whose two ->CLOSE (client, server) are lost


def _complete_records(path: Path) -> list[dict]:
    """The whole lines the tracer has written so far (it may be mid-line)."""
    data = path.read_bytes()
    return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines() if line.strip()]


def _about(recs: list[dict], port: int) -> list[dict]:
    return [r for r in recs if r.get("type") == "connection" and port in (r["lport"], r["rport"])]


@pytest.mark.kernel
@pytest.mark.parametrize("buffer", ["ring", "perf"])
def test_a_connection_whose_close_was_lost_is_recorded_once_as_unclosed(tracer, buffer):
    for _attempt in range(3):
        skip_port, churn_port = free_port(), free_port()
        t = tracer("--connections", "--sink", "jsonl", "-o", f"sources.kernel.buffer={buffer}",
                   env={"TCPSTATES_TEST_SKIP_CLOSE_PORT": str(skip_port)})
        clients = client_closes_first(skip_port, SKIPPED)
        # the six sockets are freed; later sockets (listeners and connections)
        # get their memory back from the kernel, each reuse by a new socket makes
        # the left entry's record. Bounded in count and time.
        churned, deadline = 0, time.monotonic() + 30
        while churned < 5000 and time.monotonic() < deadline:
            churned += len(client_closes_first(churn_port, 25))
            if sum(not r["closed"] for r in _about(_complete_records(t.stdout_path), skip_port)) >= 2 * SKIPPED:
                break
        rc, out, err = t.stop()
        assert rc == 0, err
        # the fault injection is never silent
        assert "test switches are set (TCPSTATES_TEST_SKIP_CLOSE_PORT)" in err, err
        summary = parse_summary(err)
        dropped, misses, unaccounted = summary.dropped, summary.kernel_misses, summary.unaccounted
        if dropped == misses == 0 and unaccounted == 2 * SKIPPED:
            break
        # The kernel itself, rarely, skipped the program for another hit (the
        # loss this test imitates), counted host-wide: this run cannot be held
        # to exact counts. Traffic again.
    # the summary: exactly the six lost state changes (unaccounted) and the
    # records made for them, named apart
    assert (dropped, misses, unaccounted) == (0, 0, 2 * SKIPPED), err
    assert f"; {2 * SKIPPED} connections with close unseen" in err, err
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    for r in recs:
        jsonschema.validate(r, SCHEMA)
    lost = _about(recs, skip_port)
    # exactly one record per lost close, each marked, none of them passed off as closed
    assert all(not r["closed"] and r["ending"] == "unknown" for r in lost), lost
    assert sorted(r["lport"] for r in lost if r["rport"] == skip_port) == sorted(clients), (lost, churned)
    assert sorted(r["rport"] for r in lost if r["lport"] == skip_port) == sorted(clients), (lost, churned)
    assert len(lost) == 2 * SKIPPED
    for r in lost:
        # what is known: start, the spans of the states it left, its last state
        # and when it entered it; not when it closed (no duration, no time in the last state)
        assert r["duration_us"] is None and r["complete"] and r["laddr"] == r["raddr"] == "127.0.0.1"
        assert r["start_time_ns"] <= r["last_change_time_ns"] <= r["time_ns"]
        assert r["start_mono_ns"] <= r["last_change_mono_ns"] <= r["mono_ns"]
        assert r["last_state"] not in r["states_us"]
        assert r["owner_source"] == "unknown" and r["owner_pid"] is None
    client_side = [r for r in lost if r["rport"] == skip_port]
    server_side = [r for r in lost if r["lport"] == skip_port]
    for r in client_side:
        assert r["first_state"] == "CLOSE" and r["last_state"] == "FIN_WAIT2", r
        assert set(r["states_us"]) == {"SYN_SENT", "ESTABLISHED", "FIN_WAIT1"}, r
    for r in server_side:
        assert r["first_state"] == "LISTEN" and r["last_state"] == "LAST_ACK", r
        assert set(r["states_us"]) == {"SYN_RECV", "ESTABLISHED", "CLOSE_WAIT"}, r
    # the connections whose close was seen: closed normally, each exactly once
    churn = _about(recs, churn_port)
    odd = [r for r in churn if not (r["closed"] and r["ending"] == "normal" and r["duration_us"] is not None)]
    assert not odd, (odd, err)
    assert len(churn) == 2 * churned
    assert "last_change_time" not in churn[0]
    # the benchmark's check: every connection's record printed or explained,
    # an unclosed record never counted a second time as missing
    path = t.stdout_path
    printed = sum(1 for r in recs if r.get("type") == "connection" and {r["lport"], r["rport"]}
                  & {skip_port, churn_port})
    assert count_unclosed(path, skip_port) == 2 * SKIPPED and count_unclosed(path, churn_port) == 0
    expected = 2 * (SKIPPED + churned)
    assert expected - printed - dropped == 0
    assert conn_unaccounted(expected - printed - dropped, misses + unaccounted, 2 * SKIPPED) == 0


def test_bench_does_not_count_a_lost_close_twice():
    # 6 closes lost, all 6 printed as unclosed records, 2 other records missing:
    # the 6 lost changes explain the 6 unclosed records, not the 2
    assert conn_unaccounted(2, 6, 6) == 2
    assert conn_unaccounted(2, 8, 6) == 0
    assert conn_unaccounted(0, 6, 6) == 0
    assert conn_unaccounted(-1, 0, 0) == -1
    assert conn_unaccounted(3, 1) == 2


def test_count_unclosed_reads_every_format(tmp_path):
    f = tmp_path / "out"
    f.write_bytes(b'{"type":"connection","closed":false,"lport":4000,"rport":80,"x":1}\n'
                  b'{"type":"connection","closed":true,"lport":4001,"rport":80,"x":1}\n'
                  b"ffff1 7 curl 127.0.0.1 4002 127.0.0.1 80 unknown ? SYN_SENT=0.010\n"
                  b"ffff1,7,curl,4,127.0.0.1,4003,127.0.0.1,80,unknown,CLOSE,1,,0.010\n"
                  b"ffff1,7,curl,4,127.0.0.1,4004,127.0.0.1,81,unknown,CLOSE,1,,0.010\n")
    assert count_unclosed(f, 80) == 3


def _unclosed_event() -> Event:
    conn = Connection(start_ns=1_000_000, end_ns=None, state_ns={2: 1_000_000, 1: 50_000_000},
                      first_state=7, last_state=4, complete=True, closed=False, last_ns=60_000_000)
    # the record's time: when the close was found missing
    return Event(101_000_000, 0xabc, None, 7, 8, "curl", socket.AF_INET, "127.0.0.1", 4000,
                 "127.0.0.2", 80, 4, 7, 3, {CONNECTION: conn})


def test_unclosed_json_record_says_what_is_known_and_no_more():
    rec = json.loads(json.dumps(event_record(_unclosed_event(), 1, 1_700_000_000_101_000_000, "h", Rfc3339())))
    jsonschema.validate(rec, SCHEMA)
    assert rec["closed"] is False and rec["ending"] == "unknown" and rec["duration_us"] is None
    assert rec["last_state"] == "FIN_WAIT1" and rec["states_us"] == {"SYN_SENT": 1000, "ESTABLISHED": 50_000}
    assert rec["start_time_ns"] == 1_700_000_000_001_000_000
    assert rec["last_change_time_ns"] == 1_700_000_000_060_000_000
    assert rec["last_change_mono_ns"] == 60_000_000
    assert rec["last_change_time"] == "2023-11-14T22:13:20.060000000Z"
    assert rec["time_ns"] == 1_700_000_000_101_000_000


def test_unclosed_connection_text_and_csv_rows():
    ctx = RunContext()
    text = ConnectionFormatter(csv=False, wide=False, time_col=False, timestamp_col=False, wall_ns=ctx.wall_ns)
    (line,) = text.lines([_unclosed_event()])
    assert line.split()[-4:] == ["unknown", "?", "SYN_SENT=1.000", "ESTABLISHED=50.000"], line
    csv = ConnectionFormatter(csv=True, wide=False, time_col=False, timestamp_col=False, wall_ns=ctx.wall_ns)
    values = dict(zip(csv.header().split(","), csv.lines([_unclosed_event()])[0].split(",")))
    assert values["END"] == "unknown" and values["LIFE_MS"] == "" and values["FIN_WAIT1_MS"] == ""
    assert values["ESTABLISHED_MS"] == "50.000" and values["COMPLETE"] == "1"


def test_unclosed_connection_journal_fields():
    from tcpstates.plugins.journal.sink import JournalOptions, JournalSink
    ctx = RunContext()
    ctx.clock_offset_ns = 1_700_000_000_000_000_000
    sink = JournalSink(JournalOptions(), ctx)
    fields = sink._fields(_unclosed_event())
    assert "TCP_ENDING=unknown" in fields and "TCP_CLOSED=0" in fields and "PRIORITY=4" in fields
    assert not any(f.startswith("TCP_DURATION_US=") for f in fields), "unknown stays absent"
    assert "TCP_LAST_CHANGE_TIME_USEC=1700000000060000" in fields
    assert "TCP_START_TIME_USEC=1700000000001000" in fields
    (msg,) = [f for f in fields if f.startswith("MESSAGE=")]
    assert "connection unknown, close not seen, last seen in FIN_WAIT1" in msg, msg


def test_metrics_count_unclosed_connections_by_ending_without_a_lifetime():
    body = metrics_page([_unclosed_event()], RunContext(records="connection"))
    assert 'tcpstates_connections_total{ending="unknown"} 1.0' in body
    assert "tcpstates_connection_lifetime_seconds_count 0.0" in body
    assert "tcpstates_handshake_seconds_count 1.0" in body
