"""The journal sink against a real systemd-journald started by the tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from journald import PrivateJournald
from traffic import free_port, refused, session

from tcpstates.plugins.journal.sink import MESSAGE_ID_STATE_CHANGE, journal_field_name

pytestmark = pytest.mark.kernel


@pytest.fixture
def journald(tmp_path):
    j = PrivateJournald(tmp_path / "journald").start()
    yield j
    j.stop()


def test_dash_Y_journals_ipv4_and_ipv6_and_keeps_stdout(tracer, journald):
    port4, port6 = free_port(), free_port(socket.AF_INET6)
    t = tracer("-Y", "-D", f"{port4},{port6}", wrap=journald.argv)
    before = time.time_ns()
    refused(port4)
    session(socket.AF_INET6, port6, hold=0.02, server_delay=0.0)
    rc, out, err = t.stop()
    assert rc == 0, err
    # stdout is the plain bcc table, unchanged by -Y
    lines = out.splitlines()
    assert lines[0].startswith("SKADDR") and len(lines) == 1 + 2 + 5
    journald.sync()
    entries = journald.read("SYSLOG_IDENTIFIER=tcpstates")
    assert len(entries) == 7
    failed = [e for e in entries if e["TCP_OLD_STATE"] == "SYN_SENT" and e["TCP_NEW_STATE"] == "CLOSE"]
    (f,) = failed
    assert f["PRIORITY"] == "4"            # a failed connect is louder
    assert f["MESSAGE_ID"] == MESSAGE_ID_STATE_CHANGE
    assert f["OBJECT_IPV4_DESTINATION_ADDRESS"] == "127.0.0.1"
    assert f["OBJECT_TCP_DESTINATION_PORT"] == str(port4)
    assert f["TCP_REMOTE_PORT"] == str(port4) and f["TCP_FAMILY"] == "ipv4"
    assert f["MESSAGE"].endswith(f"127.0.0.1 {port4} SYN_SENT → CLOSE")
    assert int(f["TCP_SPAN_US"]) >= 0 and f["OBJECT_TCP_SPAN_TIME"] == f["TCP_SPAN_US"]
    assert before // 1000 - 5000 <= int(f["TCP_EVENT_TIME_USEC"]) <= time.time_ns() // 1000
    v6 = [e for e in entries if e.get("TCP_FAMILY") == "ipv6"]
    assert len(v6) == 5 and all(e["PRIORITY"] == "5" for e in v6)
    assert all(e["OBJECT_IPV6_DESTINATION_ADDRESS"] == "::1" for e in v6)
    for e in entries:
        assert not any(k.startswith("CODE_") for k in e), "CODE_* would point into the sink"
        assert "_SOURCE_REALTIME_TIMESTAMP" not in e or e["_SOURCE_REALTIME_TIMESTAMP"] != e.get("TCP_EVENT_TIME_USEC")
    syn = [e for e in entries if e["TCP_NEW_STATE"] == "SYN_SENT" and e["TCP_FAMILY"] == "ipv4"]
    assert "TCP_SPAN_US" not in syn[0]     # unknown time in CLOSE is absent, not 0
    assert syn[0]["OBJECT_TCP_SPAN_TIME"] == "0"   # bcc's field keeps bcc's 0


def _stderr_closed(wrap):
    """`tcpstates ... 2>&-` inside the journal's namespace: no descriptor 2 at start."""
    return lambda argv: wrap(["bash", "-c", 'exec "$@" 2>&-', "bash", *argv])


def test_dash_Y_with_stderr_closed_journals_every_event_and_ends_cleanly(tracer, journald):
    """`tcpstates -Y 2>&-` (a shell or service manager that closed it): Python
    starts with sys.stderr None, so the summary and any warning have nowhere to
    go and must not cost the run (status 0, not an internal error); nothing may
    reach the journal but the events (stdio.guard() puts /dev/null under fd 2
    before the journal's socket is opened): the table is printed, every event
    journalled once, nothing else journalled."""
    port = free_port()
    t = tracer("-Y", "-D", str(port), wrap=_stderr_closed(journald.argv))
    refused(port)
    refused(port)
    rc, out, err = t.stop()
    assert rc == 0 and err == "", (rc, err)      # nothing reached the file stderr would have been
    lines = out.splitlines()
    assert lines[0].startswith("SKADDR") and len(lines) == 1 + 4, out
    journald.sync()
    everything = journald.read()
    ours = [e for e in everything if e.get("SYSLOG_IDENTIFIER") == "tcpstates"]
    assert len(ours) == 4 and all(e["TCP_REMOTE_PORT"] == str(port) for e in ours), ours
    pids = {e["_PID"] for e in ours}
    assert [e for e in everything if e.get("_PID") in pids and e not in ours] == []   # no stray lines
    assert [(e["TCP_OLD_STATE"], e["TCP_NEW_STATE"]) for e in ours] == [("CLOSE", "SYN_SENT"),
                                                                       ("SYN_SENT", "CLOSE")] * 2


def test_missing_journal_socket_is_said_once(tracer, tmp_path):
    port = free_port()
    # a private /run without a journal socket, whatever the host runs
    wrap = lambda argv: ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                         'mount -t tmpfs tmpfs /run && exec "$@"', "sh", *argv]
    t = tracer("--sink", "journal", "--sink", "csv", "-D", str(port), wrap=wrap)
    for _ in range(5):
        refused(port)
    rc, out, err = t.stop()
    assert rc == 0
    warnings = [l for l in err.splitlines() if "does not exist" in l]
    assert len(warnings) == 1 and "/run/systemd/journal/socket" in warnings[0]
    assert len(out.splitlines()) == 11   # the other sink got everything


def test_missing_systemd_python_exits_2_with_what_to_install(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = ("import sys; sys.modules['systemd'] = None\n"   # as if systemd-python were absent
            "from tcpstates.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "--replay", str(empty), "--sink", "journal"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "python3-systemd" in r.stderr and "Traceback" not in r.stderr


def test_journal_field_names_are_validated():
    assert journal_field_name("owner_pid") == "TCP_OWNER_PID"
    assert journal_field_name("container.id") == "TCP_CONTAINER_ID"
    assert journal_field_name("x" * 80) is None


def test_list_bool_and_mapping_fields_are_journal_text_not_python_repr(journald, tmp_path):
    # a connection queued on a pre-fork server's listener: owner "shared", the
    # holders in owner_candidates (a list); a third-party enricher's bool and
    # mapping ride along. Replayed, so the fields are exactly these.
    rec = {"type": "state_change", "v": 1, "seq": 1, "time": "2026-12-02T10:00:00.000000000Z",
           "time_ns": 1_796_205_600_000_000_000, "mono_ns": 5_000_000_000, "host": "h",
           "skaddr": "ffff888100000040", "family": "ipv4", "laddr": "127.0.0.1", "lport": 8080,
           "raddr": "127.0.0.1", "rport": 40000, "oldstate": "LISTEN", "newstate": "SYN_RECV",
           "span_us": None, "pid": 0, "tid": 0, "comm": "swapper/0", "cgroup_id": 1,
           "owner_pid": None, "owner_comm": None, "owner_source": "shared",
           "owner_candidates": [101, 202, 303], "x_flag": True, "x_map": {"a": 1}}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    r = subprocess.run(journald.argv([sys.executable, "-m", "tcpstates", "--replay", str(path),
                                      "--sink", "journal"]),
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    journald.sync()
    (entry,) = journald.read("SYSLOG_IDENTIFIER=tcpstates")
    assert entry["TCP_OWNER_CANDIDATES"] == "101 202 303"
    assert entry["TCP_OWNER_SOURCE"] == "shared" and "TCP_OWNER_PID" not in entry
    assert entry["TCP_X_FLAG"] == "1"
    assert json.loads(entry["TCP_X_MAP"]) == {"a": 1}


def test_values_json_cannot_hold_leave_that_field_out_not_the_entry(journald, tmp_path):
    # replayed fields nested deeper than orjson writes (it reads 1024 levels,
    # writes 254) and a list nested past Python's recursion limit: before, the
    # sink raised on them and lost the rest of the batch (a sink failure)
    base = {"type": "state_change", "v": 1, "time": "2026-12-02T10:00:00.000000000Z",
            "host": "h", "skaddr": "ffff888100000040", "family": "ipv4", "laddr": "127.0.0.1",
            "lport": 8080, "raddr": "127.0.0.1", "rport": 40000, "oldstate": "SYN_SENT",
            "newstate": "ESTABLISHED", "span_us": 5, "pid": 7, "tid": 7, "comm": "c", "cgroup_id": 1}
    lines = []
    for seq in (1, 2, 3):
        rec = dict(base, seq=seq, time_ns=1_796_205_600_000_000_000 + seq, mono_ns=5_000_000_000 + seq,
                   x_ok=f"kept{seq}")
        text = json.dumps(rec)[:-1]
        if seq == 2:
            text += ', "x_deep_map": ' + '{"a": ' * 300 + "1" + "}" * 300
            text += ', "x_deep_list": ' + "[" * 1000 + "]" * 1000
            text += ', "x_nested": [[1, 2], {"k": [3]}], "x_flags": [true, false]'
        lines.append(text + "}\n")
    path = tmp_path / "deep.jsonl"
    path.write_text("".join(lines))
    r = subprocess.run(journald.argv([sys.executable, "-m", "tcpstates", "--replay", str(path),
                                      "--sink", "journal"]),
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    journald.sync()
    entries = sorted(journald.read("SYSLOG_IDENTIFIER=tcpstates"), key=lambda e: e["TCP_X_OK"])
    assert [e["TCP_X_OK"] for e in entries] == ["kept1", "kept2", "kept3"]
    second = entries[1]
    assert "TCP_X_DEEP_MAP" not in second and "TCP_X_DEEP_LIST" not in second
    assert second["TCP_X_NESTED"] == '[[1,2],{"k":[3]}]' and second["TCP_X_FLAGS"] == "1 0"
    warned = [l for l in r.stderr.splitlines() if "could not be made journal text" in l]
    assert len(warned) == 2 and "'x_deep_map'" in warned[0] + warned[1], r.stderr


def test_journal_value_of_what_a_third_party_enricher_may_add():
    from tcpstates.plugins.journal.sink import journal_value
    assert journal_value({7: 1, "a": {2: [True]}}) == '{"7":1,"a":{"2":[true]}}'   # state-number keys
    assert journal_value([1, None, "x y"]) == '[1,null,"x y"]'      # not one token each: JSON
    assert journal_value([412, 413, "a"]) == "412 413 a"
    assert journal_value(["", 1]) == '["",1]'
    assert journal_value({3, 1}) == "1 3"
    assert journal_value((True, 0)) == "1 0"
    assert journal_value({"s": {3}}) == '{"s":"{3}"}'     # orjson's default: str()
    with pytest.raises(TypeError):
        journal_value({"big": 1 << 70})     # the sink leaves such a field out


SEND_ONE = """
import sys
from tcpstates.api import RunContext
from tcpstates.events import Event
from tcpstates.plugins.journal.sink import JournalOptions, JournalSink
sink = JournalSink(JournalOptions(identifier="surrogate-test"), RunContext())
sink.open()
extra = {"x_name": "caf\\udce9", "x_names": ["ok", "\\ud800"], "x_plain": "été"}
print(sink.write([Event(1, 2, 3, 4, 5, "c", 2, "127.0.0.1", 1, "127.0.0.1", 2, 1, 7, 0, extra)]))
sink.close()
"""


def test_a_lone_surrogate_in_an_enricher_field_is_escaped_not_a_failed_batch(journald):
    # a third-party enricher's str with a lone surrogate (os.fsdecode of a
    # non-UTF-8 name): libsystemd's sendv raised UnicodeEncodeError before, the
    # sink failed and lost the batch. No replayed record can carry one (orjson
    # refuses them), hence a sink built in a process of its own, on a real journald.
    r = subprocess.run(journald.argv([sys.executable, "-c", SEND_ONE]), capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    journald.sync()
    (entry,) = journald.read("SYSLOG_IDENTIFIER=surrogate-test")
    assert entry["TCP_X_NAME"] == "caf\\xe9"          # the byte that was not UTF-8, as escape_text says it
    assert entry["TCP_X_NAMES"] == "ok \\ud800"
    assert entry["TCP_X_PLAIN"] == "été"              # valid non-ASCII text unchanged
