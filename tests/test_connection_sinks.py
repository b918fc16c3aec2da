"""Connection records (--connections) through the journal and forward sinks:
the real tracepoint, N loopback connections on our own port, a private real
journald and the real Fluent Bit. Each destination must hold exactly the N
records the JSON Lines sink of the same run wrote, field for field."""

from __future__ import annotations

import ctypes
import json
import threading
from pathlib import Path

import jsonschema
import pytest
from fbcase import needs_fluent_bit
from fluent_receiver import ForwardReceiver
from fluentbit import forward_output, wait_until
from journald import PrivateJournald
from summary import parse_summary
from traffic import client_closes_first, free_port, refused, wait_port_settled

from tcpstates.plugins.journal.sink import MESSAGE_ID_CONNECTION

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "event.schema.json").read_text())
N = 60
REFUSED = 3
# a process name anyone can set (prctl): a newline and an ESC must not forge
# or colour a journal line
COMM = b"tcps\nc\x1bnn"
COMM_ESCAPED = "tcps\\x0ac\\x1bnn"


def _set_comm(name: bytes) -> None:
    PR_SET_NAME = 15
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) == 0, ctypes.get_errno()


def _connections(port: int, refused_port: int) -> set[int]:
    """N normal connections to `port` (the client closes first) and REFUSED
    refused ones to `refused_port`, all made by a thread named COMM; returns
    the clients' ports of the normal ones."""
    cports: set[int] = set()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _set_comm(COMM)
            cports.update(client_closes_first(port, N))
            for _ in range(REFUSED):
                refused(refused_port)
        except BaseException as exc:   # re-raised in the test's thread
            failure.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive() and not failure, failure
    # the last FINs and ACKs may still be in the softirq: the socket table says when done
    assert not wait_port_settled(port), "the connections never settled"
    return cports


def _jsonl(out: str) -> list[dict]:
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    for r in recs:
        jsonschema.validate(r, SCHEMA)
    return recs


def _connection_keys() -> set[str]:
    defs = SCHEMA["$defs"]
    return set(defs["common"]["required"]) | set(defs["connection"]["required"])


def _check_jsonl(recs: list[dict], port: int, refused_port: int,
                 cports: set[int]) -> dict[tuple[int, int, int], dict]:
    """The JSON Lines records of the run: exactly our connections, one each;
    keyed by (local port, remote port, µs of the record's time): the kernel may
    give a refused connect the local port of an earlier connection to another
    port, or of an earlier refused one."""
    assert {r["type"] for r in recs} == {"connection"}, recs
    normal = [r for r in recs if r["rport"] == port]
    failed = [r for r in recs if r["rport"] == refused_port]
    assert len(normal) + len(failed) == len(recs) == N + REFUSED
    assert {r["lport"] for r in normal} == cports and len(normal) == N
    assert {r["ending"] for r in normal} == {"normal"} and {r["ending"] for r in failed} == {"refused"}
    assert [r["seq"] for r in recs] == list(range(1, N + REFUSED + 1))
    return {_key(r["lport"], r["rport"], r["time_ns"] // 1000): r for r in recs}


def _key(lport: int | str, rport: int | str, time_us: int | str) -> tuple[int, int, int]:
    return int(lport), int(rport), int(time_us)


@pytest.fixture
def journald(tmp_path):
    j = PrivateJournald(tmp_path / "journald").start()
    yield j
    j.stop()


def _journal_entry_matches(e: dict, r: dict) -> None:
    """One journal entry holds the values of the JSON Lines record, as documented
    in docs/events.md ("The journal gets ...")."""
    assert e["MESSAGE_ID"] == MESSAGE_ID_CONNECTION
    assert e["PRIORITY"] == ("5" if r["ending"] == "normal" else "4")
    assert e["SYSLOG_IDENTIFIER"] == "tcpstates"
    expect = {
        "TCP_EVENT_TIME": r["time"], "TCP_EVENT_TIME_USEC": str(r["time_ns"] // 1000),
        "TCP_START_TIME_USEC": str(r["start_time_ns"] // 1000), "TCP_DURATION_US": str(r["duration_us"]),
        "TCP_ENDING": r["ending"], "TCP_COMPLETE": str(int(r["complete"])),
        "TCP_FIRST_STATE": r["first_state"], "TCP_LAST_STATE": r["last_state"],
        "TCP_SKADDR": r["skaddr"], "TCP_FAMILY": r["family"],
        "TCP_LOCAL_ADDRESS": r["laddr"], "TCP_LOCAL_PORT": str(r["lport"]),
        "TCP_REMOTE_ADDRESS": r["raddr"], "TCP_REMOTE_PORT": str(r["rport"]),
        "TCP_CPU_PID": str(r["pid"]), "TCP_CPU_TID": str(r["tid"]), "TCP_CGROUP_ID": str(r["cgroup_id"]),
    }
    assert {k: e.get(k) for k in expect} == expect
    assert e.get("TCP_ERROR") == r["error"]       # absent when the record's is null
    # one TCP_<STATE>_US per state passed, nothing else
    states = {k[4:-3]: int(v) for k, v in e.items()
              if k.startswith("TCP_") and k.endswith("_US") and k[4:-3] in _STATE_NAMES}
    assert states == r["states_us"]
    assert not any(k.startswith(("OBJECT_", "CODE_")) for k in e), "bcc has no connection fields"
    # the structured field keeps the name as decoded (escaped once by the decoder)
    assert e["TCP_CPU_COMM"] == r["comm"]
    states_text = " ".join(f"{s}={us}us" for s, us in sorted(r["states_us"].items(),
                                                                  key=lambda kv: _STATE_NAMES.index(kv[0])))
    why = f" ({r['error']})" if r["error"] else ""
    assert e["MESSAGE"] == (f"{r['comm']} {r['laddr']} {r['lport']} → {r['raddr']} {r['rport']} "
                            f"connection {r['ending']}{why}, {r['duration_us']}us: {states_text}")


# kernel order (include/net/tcp_states.h): the order the journal's MESSAGE lists them in
_STATE_NAMES = ["", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
                "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"]


def test_connection_records_in_the_journal_equal_the_json_lines_of_the_same_run(tracer, journald):
    port, refused_port = free_port(), free_port()
    t = tracer("--connections", "--sink", "jsonl", "--sink", "journal", "-D", f"{port},{refused_port}",
               wrap=journald.argv)
    cports = _connections(port, refused_port)
    rc, out, err = t.stop()
    assert rc == 0, err
    summary = parse_summary(err)
    assert summary.written == {"jsonl": N + REFUSED, "journal": N + REFUSED}, err
    assert summary.not_written == {} and summary.dropped == summary.kernel_misses == 0, err
    by_port = _check_jsonl(_jsonl(out), port, refused_port, cports)
    journald.sync()
    entries = journald.read("SYSLOG_IDENTIFIER=tcpstates")
    assert len(entries) == N + REFUSED, [e.get("MESSAGE") for e in entries]
    keys = {_key(e["TCP_LOCAL_PORT"], e["TCP_REMOTE_PORT"], e["TCP_EVENT_TIME_USEC"]) for e in entries}
    assert keys == set(by_port), "each record once, no entry twice"
    for e in entries:
        _journal_entry_matches(e, by_port[_key(e["TCP_LOCAL_PORT"], e["TCP_REMOTE_PORT"], e["TCP_EVENT_TIME_USEC"])])
    # the name anyone can set: raw control characters never reach MESSAGE
    normal = [e for e in entries if e["TCP_REMOTE_PORT"] == str(port)]
    assert all(e["MESSAGE"].startswith(COMM_ESCAPED + " ") for e in normal), normal[0]["MESSAGE"]
    assert not any(c in e["MESSAGE"] for e in entries for c in "\n\x1b")


@pytest.fixture
def receiver():
    rx = ForwardReceiver()
    yield rx
    rx.stop()


@needs_fluent_bit
def test_connection_records_through_real_fluent_bit_equal_the_json_lines(tracer, fluent_bit, receiver):
    port, refused_port, fb_port = free_port(), free_port(), free_port()
    fb = fluent_bit(f"[INPUT]\n    Name forward\n    Listen 127.0.0.1\n    Port {fb_port}\n"
                    + forward_output(receiver.address), wait_for=("127.0.0.1", fb_port))
    t = tracer("--connections", "--sink", "jsonl", "--sink", "forward", "-D", f"{port},{refused_port}",
               "-o", f"sinks.forward.address=127.0.0.1:{fb_port}", "-o", "sinks.forward.exit_timeout=30")
    cports = _connections(port, refused_port)
    rc, out, err = t.stop()
    assert rc == 0, err
    summary = parse_summary(err)
    assert summary.written == {"jsonl": N + REFUSED, "forward": N + REFUSED}, err
    assert f"forward: {N + REFUSED} queued, {N + REFUSED} acknowledged, 0 lost" in err, err
    by_port = _check_jsonl(_jsonl(out), port, refused_port, cports)
    wait_until(lambda: len(receiver.records()) >= N + REFUSED, 30, f"{N + REFUSED} records out of Fluent Bit")
    fb.stop()    # flushes anything still queued: a duplicate would show now
    entries = receiver.entries
    assert len(entries) == N + REFUSED
    assert {tag for tag, _, _ in entries} == {"tcpstates"}
    assert sorted(r["seq"] for _, _, r in entries) == list(range(1, N + REFUSED + 1)), "no loss, no duplicate"
    keys = _connection_keys()
    for _, t_ns, r in entries:
        jsonschema.validate(r, SCHEMA)
        assert r["type"] == "connection" and keys <= set(r), keys - set(r)
        assert t_ns == r["time_ns"], "EventTime keeps the close's nanoseconds"
        # field for field (names, values and types) what the JSON Lines sink wrote
        assert r == by_port[_key(r["lport"], r["rport"], r["time_ns"] // 1000)]
