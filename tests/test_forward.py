"""The forward sink against a Fluent Forward v1 receiver implementing the spec's
server side: acks, a receiver that restarts mid-stream, one that never acks."""

from __future__ import annotations

import socket
import time

import orjson
import pytest
from fluent_receiver import ForwardReceiver
from tracer import run_cli
from traffic import free_port, session

from tcpstates.plugins.forward.sink import parse_address


def _trace(tmp_path, n: int) -> str:
    lines = []
    for i in range(n):
        lines.append(orjson.dumps({
            "type": "state_change", "v": 1, "seq": i + 1, "time": "x", "time_ns": 1795766400_123456789 + i,
            "mono_ns": 10**9 + i, "host": "h", "skaddr": "ffff1", "family": "ipv4", "laddr": "10.0.0.1",
            "lport": 22, "raddr": "10.0.0.2", "rport": 50000 + i % 1000, "oldstate": "ESTABLISHED",
            "newstate": "FIN_WAIT1", "span_us": i, "pid": 1, "tid": 1, "comm": "sshd", "cgroup_id": 0}))
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("mode", ["forward", "packed"])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_every_event_arrives_acked_with_nanosecond_event_time(tmp_path, mode, transport):
    rx = ForwardReceiver(unix_path=str(tmp_path / "fluent.sock") if transport == "unix" else None)
    try:
        r = run_cli("--replay", _trace(tmp_path, 2500), "--sink", "forward", "--no-summary",
                    "-o", f"sinks.forward.address={rx.address}", "-o", f"sinks.forward.mode={mode}",
                    "-o", "sinks.forward.chunk_events=1000", "-o", "sinks.forward.tag=tcp.states")
        assert r.returncode == 0, r.stderr
        assert r.stderr == b""
    finally:
        rx.stop()
    assert rx.modes == {mode}
    assert len(rx.chunks) == 3                       # 1000 + 1000 + 500, each acked
    assert [rec["seq"] for rec in rx.records()] == list(range(1, 2501))
    for tag, t_ns, rec in rx.entries[:5] + rx.entries[-5:]:
        assert tag == "tcp.states"
        assert t_ns == rec["time_ns"]                # EventTime keeps the nanoseconds
    assert rx.entries[7][2]["span_us"] == 7 and rx.entries[7][2]["newstate"] == "FIN_WAIT1"


def test_receiver_restart_mid_stream_loses_nothing(tmp_path):
    rx = ForwardReceiver(drop_chunks=2, restart_after=0.5)
    try:
        r = run_cli("--replay", _trace(tmp_path, 3000), "--sink", "forward",
                    "-o", f"sinks.forward.address={rx.address}", "-o", "sinks.forward.chunk_events=500",
                    "-o", "sinks.forward.retry_min=0.05", "-o", "sinks.forward.exit_timeout=20")
        assert r.returncode == 0, r.stderr
    finally:
        rx.stop()
    seqs = [rec["seq"] for rec in rx.records()]
    assert set(seqs) == set(range(1, 3001))          # at least once: nothing missing
    assert rx.connections >= 3
    err = r.stderr.decode()
    assert "retrying with backoff" in err and "not acknowledged" not in err


def test_receiver_that_never_acks_bounded_buffer_counted_drops(tmp_path):
    rx = ForwardReceiver(ack=False)
    try:
        start = time.monotonic()
        r = run_cli("--replay", _trace(tmp_path, 500), "--sink", "forward", "--sink", "csv",
                    "-o", f"sinks.forward.address={rx.address}", "-o", "sinks.forward.chunk_events=50",
                    "-o", "sinks.forward.buffer_events=100", "-o", "sinks.forward.ack_timeout=0.3",
                    "-o", "sinks.forward.exit_timeout=1")
        took = time.monotonic() - start
    finally:
        rx.stop()
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert "buffer of 100 events full" in err
    assert "400 events dropped because the buffer was full" in err
    assert "not acknowledged" in err
    assert len(r.stdout.splitlines()) == 501           # the csv sink got everything meanwhile
    assert took < 15


def test_receiver_down_at_start_then_up(tmp_path):
    port = free_port()
    import subprocess

    from tracer import tcpstates_argv
    proc = subprocess.Popen(tcpstates_argv("--replay", _trace(tmp_path, 100), "--sink", "forward",
                                           "-o", f"sinks.forward.address=127.0.0.1:{port}",
                                           "-o", "sinks.forward.retry_min=0.05", "-o", "sinks.forward.retry_max=0.2",
                                           "-o", "sinks.forward.exit_timeout=15"),
                            stderr=subprocess.PIPE)
    time.sleep(0.5)    # the point of the test: the receiver is absent for a while
    rx = ForwardReceiver(port=port)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        rx.stop()
    assert proc.returncode == 0, err
    assert sorted(r["seq"] for r in rx.records()) == list(range(1, 101))


@pytest.mark.kernel
def test_real_kernel_events_forwarded(tracer):
    rx = ForwardReceiver()
    port = free_port()
    try:
        t = tracer("--sink", "forward", "-L", str(port), "-o", f"sinks.forward.address={rx.address}")
        session(socket.AF_INET, port, hold=0.01, server_delay=0.0)
        rc, _, err = t.stop()
    finally:
        rx.stop()
    assert rc == 0, err
    recs = rx.records()
    assert len(recs) == 7 and {r["lport"] for r in recs} == {port}
    for _, t_ns, r in rx.entries:
        assert t_ns == r["time_ns"]


@pytest.mark.parametrize("text,ok", [("127.0.0.1:24224", True), ("[::1]:24224", True),
                                     ("unix:///run/fb.sock", True), ("unix:relative", False),
                                     ("nohost", False), ("h:0", False), ("h:99999", False)])
def test_address_parsing(text, ok):
    if ok:
        parse_address(text)
    else:
        with pytest.raises(ValueError):
            parse_address(text)
