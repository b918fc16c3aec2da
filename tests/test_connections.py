"""Connection records (--connections): the real CLI on the real tracepoint,
N loopback connections of known shape → exactly N records per socket, with
the right ending, endpoints and state times; plus the record layout and the
offline formats."""

from __future__ import annotations

import errno
import json
import re
import socket
import struct
from pathlib import Path

import jsonschema
import pytest
from metricspage import metrics_page
from traffic import free_port, refused, session

from tcpstates.api import RunContext
from tcpstates.events import CONNECTION, Connection, Event
from tcpstates.plugins.bcc_table.connections import ConnectionFormatter
from tcpstates.plugins.kernel.conndecoder import CONN_RING_RECORD_SIZE, CONN_SIZE, CONN_STRUCT, decode_conn_block
from tcpstates.plugins.kernel.decoder import Decoder
from tcpstates.plugins.kernel.probe import build_cflags
from tcpstates.records import Rfc3339, event_record

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "event.schema.json").read_text())


def reset_connection(port: int) -> int:
    """A connection the client aborts with SO_LINGER 0 (a RST); returns the client port."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", port))
        srv.listen(4)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = srv.accept()
        cport = client.getsockname()[1]
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        # the RST closes the accepted socket; reading tells us it arrived
        with pytest.raises(ConnectionResetError):
            accepted.recv(16)
        accepted.close()
    return cport


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.kernel
def test_connection_records_one_per_connection_with_ending_endpoints_and_state_times(tracer):
    normal_port, refused_port, reset_port = free_port(), free_port(), free_port()
    t = tracer("--connections", "--sink", "jsonl")
    normal = [session(socket.AF_INET, normal_port, hold=0.03, server_delay=0.01, listener_delay=0)
              for _ in range(3)]
    for _ in range(2):
        refused(refused_port)
    resets = [reset_connection(reset_port) for _ in range(2)]
    rc, out, err = t.stop()
    assert rc == 0, err
    recs = _records(out)
    for r in recs:
        jsonschema.validate(r, SCHEMA)
    assert {r["type"] for r in recs} == {"connection"}, "no per-state-change record in this mode"
    ours = [r for r in recs if {r["lport"], r["rport"]} & {normal_port, refused_port, reset_port}]
    by_kind: dict[tuple[str, str], list[dict]] = {}
    for r in ours:
        side = "server" if r["lport"] in (normal_port, reset_port) else "client"
        by_kind.setdefault((r["ending"], side), []).append(r)
    assert sorted((k, len(v)) for k, v in by_kind.items()) == sorted([
        (("normal", "client"), 3), (("normal", "server"), 3), (("refused", "client"), 2),
        (("reset", "client"), 2), (("reset", "server"), 2)])
    # endpoints: the client's ephemeral port and the server's port, both sides
    assert sorted(r["lport"] for r in by_kind[("normal", "client")]) == sorted(normal)
    assert sorted(r["rport"] for r in by_kind[("normal", "server")]) == sorted(normal)
    assert sorted(r["lport"] for r in by_kind[("reset", "client")]) == sorted(resets)
    assert all(r["rport"] == refused_port and r["lport"] > 0 for r in by_kind[("refused", "client")])
    for r in ours:
        assert r["complete"] and r["laddr"] == r["raddr"] == "127.0.0.1"
        # every state time adds up to the lifetime (each is truncated to whole µs)
        total = sum(r["states_us"].values())
        assert r["duration_us"] - len(r["states_us"]) <= total <= r["duration_us"], r
        assert r["start_time_ns"] < r["time_ns"]
    for r in by_kind[("normal", "client")]:
        assert r["first_state"] == "CLOSE" and r["last_state"] in ("FIN_WAIT2", "TIME_WAIT")
        assert set(r["states_us"]) >= {"SYN_SENT", "ESTABLISHED", "FIN_WAIT1"}
        assert 30_000 <= r["states_us"]["ESTABLISHED"] < 500_000   # the client's hold
    for r in by_kind[("normal", "server")]:
        assert r["first_state"] == "LISTEN" and set(r["states_us"]) >= {"SYN_RECV", "ESTABLISHED",
                                                                        "CLOSE_WAIT"}
        assert 10_000 <= r["states_us"]["CLOSE_WAIT"] < 500_000    # the server's delay
    for r in by_kind[("refused", "client")]:
        assert list(r["states_us"]) == ["SYN_SENT"] and r["last_state"] == "SYN_SENT"
        assert r["error"] == "ECONNREFUSED", r
    for r in by_kind[("reset", "client")] + by_kind[("reset", "server")]:
        assert r["last_state"] == "ESTABLISHED"
    assert "0 dropped, 0 kernel misses" in err


@pytest.mark.kernel
def test_connection_table_and_csv_on_the_real_kernel(tracer):
    port = free_port()
    t = tracer("--connections", "-s")
    cport = session(socket.AF_INET, port, hold=0.02, server_delay=0, listener_delay=0)
    rc, out, err = t.stop()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,RADDR,RPORT,END,ERROR,FIRST,COMPLETE,LIFE_MS,")
    head = lines[0].split(",")
    rows = [dict(zip(head, line.split(","))) for line in lines[1:]]
    ours = [r for r in rows if port in (int(r["LPORT"]), int(r["RPORT"]))]
    assert sorted((int(r["LPORT"]), r["END"], r["ERROR"], r["FIRST"]) for r in ours) == sorted(
        [(cport, "normal", "", "CLOSE"), (port, "normal", "", "LISTEN")])
    for r in ours:
        states = sum(float(r[c]) for c in head if c.endswith("_MS") and c != "LIFE_MS" and r[c])
        assert abs(states - float(r["LIFE_MS"])) < 0.02


@pytest.mark.kernel
def test_connection_mode_is_one_program_that_compiles_with_owner_and_perf_buffer(tracer):
    port = free_port()
    t = tracer("--connections", "--owner", "-s", "-o", "sources.kernel.buffer=perf")
    session(socket.AF_INET, port, hold=0.01, server_delay=0, listener_delay=0)
    rc, out, err = t.stop()
    assert rc == 0, err
    head = out.splitlines()[0].split(",")
    rows = [dict(zip(head, line.split(","))) for line in out.splitlines()[1:]]
    ours = [r for r in rows if port in (int(r["LPORT"]), int(r["RPORT"]))]
    assert len(ours) == 2
    import os
    assert all(r["O-PID"] == str(os.getpid()) for r in ours), ours   # this test process owns both


# the record's C layout against CONN_STRUCT: tests/test_kernel_units.py


def _conn_bytes(states: dict[int, int], first: int = 7, complete: int = 1, old: int = 5,
                closed: int = 1, error: int | None = 0, unsent: bool = False,
                aborted: bool = False) -> bytes:
    ns = [states.get(i, 0) for i in range(16)]
    return CONN_STRUCT.pack(10_000_000, 0xffff1, states.get(old, 0), 9, 42, 43, 40000, 80, socket.AF_INET,
                            old, 7, socket.inet_aton("127.0.0.1") + bytes(12),
                            socket.inet_aton("10.0.0.2") + bytes(12), b"cu,rl\n", bytes(40),
                            10_000_000 - sum(ns), 10_000_000, *ns, first, complete, closed,
                            (error is not None) | (2 * unsent) | (4 * aborted), error or 0)


def test_decoder_builds_connection_events_and_stops_at_a_foreign_record():
    rec = _conn_bytes({2: 50_000, 1: 9_000_000, 4: 1_000, 5: 949_000})
    block = struct.pack("<II", CONN_SIZE, 0) + rec + struct.pack("<II", 12, 0) + bytes(CONN_SIZE)
    events, used = decode_conn_block(Decoder(), block)
    assert used == CONN_RING_RECORD_SIZE
    (e,) = events
    c = e.extra[CONNECTION]
    assert (e.saddr, e.sport, e.daddr, e.dport, e.comm) == ("127.0.0.1", 40000, "10.0.0.2", 80, "cu,rl\\x0a")
    assert c.state_ns == {1: 9_000_000, 2: 50_000, 4: 1_000, 5: 949_000}
    assert (c.duration_ns, c.ending, c.complete, c.first_state, c.last_state) == (10_000_000, "normal", True, 7, 5)
    assert c.closed and c.last_ns == 10_000_000


def test_decoder_builds_an_unclosed_connection_with_no_end():
    rec = _conn_bytes({2: 50_000, 1: 9_000_000}, old=4, closed=0)
    (e,), _ = decode_conn_block(Decoder(), struct.pack("<II", CONN_SIZE, 0) + rec)
    c = e.extra[CONNECTION]
    assert (c.closed, c.end_ns, c.duration_ns, c.ending, c.last_state) == (False, None, None, "unknown", 4)


@pytest.mark.parametrize("last,ending", [(2, "failed"), (1, "reset"), (8, "reset"), (3, "reset"),
                                         (4, "reset"), (5, "normal"), (9, "normal"), (11, "normal")])
def test_connection_ending_by_last_state_when_the_error_is_unknown(last, ending):
    assert Connection(0, 1, {}, 7, last, True).ending == ending


@pytest.mark.parametrize("last,error,ending", [
    (2, errno.ECONNREFUSED, "refused"), (2, errno.ETIMEDOUT, "timeout"), (2, errno.EHOSTUNREACH, "unreachable"),
    (2, errno.ENETUNREACH, "unreachable"), (2, 0, "abandoned"), (2, errno.EIO, "failed"),
    (1, errno.ECONNRESET, "reset"), (1, errno.ETIMEDOUT, "timeout"), (1, errno.EHOSTUNREACH, "unreachable"),
    (1, 0, "reset"), (8, errno.EPIPE, "reset"), (4, errno.ETIMEDOUT, "timeout"),
    # ECONNREFUSED ends only a connect; an ICMP error in an orderly close is one
    # IP_RECVERR left unread, not what ended it
    (1, errno.ECONNREFUSED, "reset"), (5, errno.EHOSTUNREACH, "normal"), (9, errno.ECONNREFUSED, "normal"),
    (9, errno.ETIMEDOUT, "timeout"), (5, errno.ECONNRESET, "reset"), (5, 0, "normal")])
def test_connection_ending_by_the_sockets_error(last, error, ending):
    c = Connection(0, 1, {}, 7, last, True, error=error)
    assert c.ending == ending
    assert c.error_name == (errno.errorcode[error] if error else None)


def test_decoder_reads_the_error_and_whether_it_was_read():
    for error, want in ((errno.ETIMEDOUT, errno.ETIMEDOUT), (0, 0), (None, None)):
        rec = _conn_bytes({2: 3_000_000}, old=2, error=error)
        for use_c in (True, False):
            (e,), _ = decode_conn_block(Decoder(use_c=use_c), struct.pack("<II", CONN_SIZE, 0) + rec)
            assert e.extra[CONNECTION].error == want, (use_c, error)


def test_a_connect_that_sent_nothing_failed_in_connect_rather_than_being_abandoned():
    """SYN_SENT->CLOSE with no error: abandoned when its SYN left, failed when
    nothing was ever sent (the kernel's own failure inside connect(), e.g. no
    free local port; its errno went to the caller, never to sk_err). Only
    with the error read does the flag count (flags 2 alone: not read)."""
    assert Connection(0, 1, {}, 0, 2, True, error=0).ending == "abandoned"
    assert Connection(0, 1, {}, 0, 2, True, error=0, unsent=True).ending == "failed"
    # an error names the cause either way; nothing sent changes no other state
    assert Connection(0, 1, {}, 0, 2, True, error=errno.ECONNREFUSED, unsent=True).ending == "refused"
    assert Connection(0, 1, {}, 0, 1, True, error=0, unsent=True).ending == "reset"
    for flags_unsent, error, want in ((True, 0, (0, True)), (False, 0, (0, False)),
                                      (True, None, (None, False))):
        rec = _conn_bytes({2: 30_000}, old=2, error=error, unsent=flags_unsent)
        for use_c in (True, False):
            (e,), _ = decode_conn_block(Decoder(use_c=use_c), struct.pack("<II", CONN_SIZE, 0) + rec)
            c = e.extra[CONNECTION]
            assert (c.error, c.unsent) == want, (use_c, flags_unsent, error)
            assert c.ending == ("failed" if want == (0, True) else "abandoned" if want[0] == 0 else "failed")


def test_an_abort_in_fin_wait2_is_a_reset_and_only_with_the_flags_read():
    """FIN_WAIT2->CLOSE: normal (the peer's FIN, or the socket's close handing
    it to a FIN_WAIT2 timewait) unless the kernel saw neither (aborted: its
    own side sent a RST); the flag counts only with the error read (flags 4
    alone: not read), and in no other state."""
    assert Connection(0, 1, {}, 0, 5, True, error=0, aborted=True).ending == "reset"
    assert Connection(0, 1, {}, 0, 5, True, error=0).ending == "normal"
    assert Connection(0, 1, {}, 0, 9, True, error=0, aborted=True).ending == "normal"
    # a RST received names itself by its error, aborted or not
    assert Connection(0, 1, {}, 0, 5, True, error=errno.ECONNRESET).ending == "reset"
    for aborted, error, want in ((True, 0, (0, True, "reset")), (False, 0, (0, False, "normal")),
                                 (True, None, (None, False, "normal"))):
        rec = _conn_bytes({5: 30_000}, old=5, error=error, aborted=aborted)
        for use_c in (True, False):
            (e,), _ = decode_conn_block(Decoder(use_c=use_c), struct.pack("<II", CONN_SIZE, 0) + rec)
            c = e.extra[CONNECTION]
            assert (c.error, c.aborted, c.ending) == want, (use_c, aborted, error)


def _event() -> Event:
    conn = Connection(start_ns=1_000_000, end_ns=101_000_000, state_ns={2: 1_000_000, 1: 100_000_000},
                      first_state=7, last_state=1, complete=True)
    return Event(101_000_000, 0xabc, 100_000_000, 7, 8, "x,y", socket.AF_INET, "127.0.0.1", 4000,
                 "127.0.0.2", 80, 1, 7, 3, {CONNECTION: conn, "owner_pid": 12, "owner_comm": "srv",
                                            "owner_start": 5, "owner_cgroup_id": 3, "owner_source": "syscall"})


def test_connection_json_record_matches_the_schema():
    rec = json.loads(json.dumps(event_record(_event(), 1, 1_700_000_000_101_000_000, "h", Rfc3339())))
    jsonschema.validate(rec, SCHEMA)
    assert rec["type"] == "connection" and rec["ending"] == "reset" and rec["duration_us"] == 100_000
    assert rec["states_us"] == {"ESTABLISHED": 100_000, "SYN_SENT": 1000} and rec["owner_pid"] == 12
    assert rec["start_time_ns"] == 1_700_000_000_001_000_000 and "connection" not in rec


def test_connection_text_and_csv_rows():
    ctx = RunContext()
    text = ConnectionFormatter(csv=False, wide=False, time_col=False, timestamp_col=False, wall_ns=ctx.wall_ns)
    (line,) = text.lines([_event()])
    assert line.split()[-3:] == ["100.000", "SYN_SENT=1.000", "ESTABLISHED=100.000"]
    assert " reset " in line
    csv = ConnectionFormatter(csv=True, wide=False, time_col=False, timestamp_col=False, wall_ns=ctx.wall_ns)
    head = csv.header().split(",")
    row = csv.lines([_event()])[0]
    assert row.split(",")[2:3] == ['"x'], "a comm with a comma is quoted"
    values = dict(zip(head, row.replace('"x,y"', "xy").split(",")))
    assert values["END"] == "reset" and values["ESTABLISHED_MS"] == "100.000" and values["CLOSE_WAIT_MS"] == ""
    assert values["LIFE_MS"] == "100.000" and values["FIRST"] == "CLOSE" and values["COMPLETE"] == "1"


def test_build_cflags_connections_leaves_transition_and_span_filters_to_user_space():
    flags = build_cflags(Path("/x"), max_sockets=1024, ring_pages=8, buffer="ring", filter_lport=False,
                         filter_dport=False, family=None, no_wakeup=True, filter_transition=True,
                         min_span_ns=5, connections=True)
    assert "-DTCPSTATES_CONNECTIONS=1" in flags
    assert not any("FILTER_TRANSITION" in f or "MIN_SPAN" in f for f in flags)




def test_summary_and_metrics_take_their_numbers_from_connection_records(capsys):
    import io

    from tcpstates.plugins.summary.sink import SummaryOptions, SummarySink
    ctx = RunContext(records="connection")
    out = io.StringIO()
    summary = SummarySink(SummaryOptions(status="off"), ctx, stream=out)
    summary.write([_event()])
    summary.close()
    text = out.getvalue()
    assert "state = ESTABLISHED (time spent in it)" in text and "state = SYN_SENT" in text
    assert "LPORT   CONNECTIONS" in text and "4000    1" in text
    body = metrics_page([_event()], ctx)
    assert 'tcpstates_connections_total{ending="reset"} 1.0' in body
    assert "tcpstates_handshake_seconds_count 1.0" in body
    assert "tcpstates_connection_lifetime_seconds_sum 0.099" in body
    assert "tcpstates_close_wait_seconds_count 0.0" in body


def test_connection_rows_escape_the_process_name():
    """A thread name is anyone's (prctl): in the connection table too it can
    neither forge a line nor leave half an escape in its column."""
    ctx = RunContext()
    e = _event()
    e.comm = "ab" + "\x1b" * 5 + "\nFAKE"
    for wide in (False, True):
        text = ConnectionFormatter(csv=False, wide=wide, time_col=False, timestamp_col=False, wall_ns=ctx.wall_ns)
        (line,) = text.lines([e])
        assert "\x1b" not in line and "\n" not in line and "ab\\x1b" in line, line
        assert re.search(r"\\x(?![0-9a-f]{2})", line) is None, line
    csv = ConnectionFormatter(csv=True, wide=False, time_col=False, timestamp_col=False, wall_ns=ctx.wall_ns)
    (row,) = csv.lines([e])
    assert "\n" not in row and "\\x0aFAKE" in row
