"""Operations: the Prometheus metrics sink scraped during real traffic, the
--summary histograms (exit and SIGUSR1), and the status line rules."""

from __future__ import annotations

import io
import re
import signal
import socket
import time
import urllib.request

import pytest
from traffic import free_port, refused, session

from tcpstates.api import RunContext
from tcpstates.plugins.summary.sink import SummaryOptions, SummarySink, log2_histogram
from tcpstates.testing import make_event


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.kernel
def test_metrics_scraped_during_real_traffic(tracer):
    mport, port = free_port(), free_port()
    # counted from the records (the fixed BUCKETS); the kernel's aggregates
    # (log2 buckets) are tested in test_aggregates.py
    t = tracer("--sink", "metrics", "-o", f"sinks.metrics.listen=127.0.0.1:{mport}", "-D", f"{port}",
               "-o", "sources.kernel.aggregates=off")
    for _ in range(3):
        session(socket.AF_INET, port, hold=0.05, server_delay=0.0, listener_delay=0.0)
    refused(port)
    time.sleep(0.3)                               # one reader poll
    m = _scrape(mport)
    t.stop()
    assert m['tcpstates_transitions_total{new="SYN_SENT",old="CLOSE"}'] == 4
    assert m['tcpstates_transitions_total{new="ESTABLISHED",old="SYN_SENT"}'] == 3
    assert m['tcpstates_transitions_total{new="CLOSE",old="SYN_SENT"}'] == 1
    assert m["tcpstates_handshake_seconds_count"] == 3
    assert m['tcpstates_handshake_seconds_bucket{le="0.01"}'] == 3        # loopback: fast
    assert m["tcpstates_connection_lifetime_seconds_count"] == 3          # client sockets (-D)
    assert m['tcpstates_connection_lifetime_seconds_bucket{le="0.025"}'] == 0
    assert m['tcpstates_connection_lifetime_seconds_bucket{le="0.25"}'] == 3   # held 50 ms


def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    from tracer import run_cli
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        empty = tmp_path / "e.jsonl"
        empty.write_text("")
        r = run_cli("--replay", str(empty), "--sink", "metrics", "-o", f"sinks.metrics.listen=127.0.0.1:{port}")
    assert r.returncode == 2 and b"cannot listen" in r.stderr and b"Traceback" not in r.stderr


def test_log2_histogram_matches_bcc_layout():
    lines = log2_histogram({1: 2, 3: 8})
    assert lines[0] == "     usecs               : count     distribution"
    assert lines[1] == "         0 -> 0          : 0        |                                        |"
    assert lines[2] == "         1 -> 1          : 2        |**********                              |"
    assert lines[4] == "         4 -> 7          : 8        |****************************************|"


def test_summary_sink_histograms_and_ports():
    out = io.StringIO()
    sink = SummarySink(SummaryOptions(status="off"), RunContext(), stream=out)
    sink.write([make_event(oldstate="ESTABLISHED", newstate="FIN_WAIT1", span_ns=100_000_000, sport=80),
                make_event(oldstate="ESTABLISHED", newstate="FIN_WAIT1", span_ns=3_000, sport=80),
                make_event(oldstate="SYN_SENT", newstate="ESTABLISHED", span_ns=50_000, dport=443)])
    sink.close()
    text = out.getvalue()
    assert "state = ESTABLISHED (time spent in it)" in text and "state = SYN_SENT" in text
    assert re.search(r"65536 -> 131071\s+: 1 ", text)                  # 100 ms = 100000 µs
    assert re.search(r"^80\s+2$", text, re.M) and re.search(r"^443\s+1$", text, re.M)


@pytest.mark.kernel
def test_summary_at_exit_and_on_sigusr1(tracer):
    port = free_port()
    t = tracer("-s", "--summary", "-D", str(port))
    for _ in range(3):
        refused(port)
    time.sleep(0.3)
    t.proc.send_signal(signal.SIGUSR1)
    end = time.monotonic() + 10
    while "state = SYN_SENT" not in t.stderr_path.read_text():
        assert time.monotonic() < end, "no summary on SIGUSR1"
        time.sleep(0.05)
    rc, out, err = t.stop()
    assert rc == 0
    assert err.count("state = SYN_SENT") == 2              # SIGUSR1 and exit
    assert f"{port}" in err and "\x1b[K" not in err        # no status line: stderr is a file
    assert len(out.splitlines()) == 7                      # stdout unchanged by --summary


def test_status_line_on_a_terminal_and_not_when_piped(tmp_path):
    import os
    import pty
    import subprocess

    from tracer import tcpstates_argv

    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b"".join(
        b'{"type":"state_change","v":1,"seq":%d,"time":"t","time_ns":1795766400000000000,"mono_ns":%d,'
        b'"host":"h","skaddr":"ff","family":"ipv4","laddr":"10.0.0.1","lport":22,"raddr":"10.0.0.2",'
        b'"rport":5000,"oldstate":"ESTABLISHED","newstate":"FIN_WAIT1","span_us":7,"pid":1,"tid":1,'
        b'"comm":"sshd","cgroup_id":0}\n' % (i + 1, 10**9 + i) for i in range(50)))
    master, slave = pty.openpty()
    with open(tmp_path / "out.csv", "wb") as out:
        proc = subprocess.Popen(tcpstates_argv("--replay", str(trace), "-s", "--summary"),
                                stdout=out, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:              # EIO: the other side closed
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(10)
    os.close(master)
    text = seen.decode()
    assert "\x1b[Ktcpstates: 50 events" in text            # the live line...
    after_last_erase = text.rsplit("\r\x1b[K", 1)[1]
    assert text.count("\r\x1b[K") >= 2 and "events, " not in after_last_erase   # ...erased at the end
    assert "state = ESTABLISHED" in text
    piped = subprocess.run(tcpstates_argv("--replay", str(trace), "-s", "--summary"), capture_output=True)
    assert b"\x1b[K" not in piped.stderr and b"state = ESTABLISHED" in piped.stderr


def test_metrics_endpoint_serves_a_bounded_number_of_clients():
    """50 clients that connect and send nothing start at most 2 × max_clients
    threads, and a scrape succeeds while they are all still connected (the
    stalled clients give way to it)."""
    import threading
    import urllib.request

    from tcpstates.plugins.metrics.sink import MetricsOptions, MetricsSink
    sink = MetricsSink(MetricsOptions(listen="127.0.0.1:0", max_clients=4), RunContext())
    # port 0: ask the kernel for a free port, then read it back
    sink.open()
    port = sink.server.server_address[1]
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        deadline = time.monotonic() + 30   # generous: the accept loop may be starved of CPU
        while sink.server.refused < 46 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.server.refused >= 46
        assert threading.active_count() - before <= 8
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b"tcpstates_transitions_total" in body or b"tcpstates_lost_events" in body
    finally:
        for s in idle:
            s.close()
    sink.close()


def test_metrics_scrapes_are_not_starved_by_trickling_clients():
    """Clients that send a byte of their request now and then (a local
    slowloris) are cut off after the request-head deadline, whatever they
    send, and never keep a scraper out: every scrape among them succeeds."""
    import urllib.request

    from tcpstates.plugins.metrics.server import HEAD_TIMEOUT
    from tcpstates.plugins.metrics.sink import MetricsOptions, MetricsSink
    sink = MetricsSink(MetricsOptions(listen="127.0.0.1:0", max_clients=4), RunContext())
    sink.open()
    port = sink.server.server_address[1]
    slow: list[socket.socket] = []
    cut_after: list[float] = []
    try:
        def trickle_all() -> None:
            for s in list(slow):
                try:
                    s.send(b"G")
                except OSError:
                    slow.remove(s)
                    s.close()
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            slow.append(s)
        ok = 0
        for _ in range(5):
            trickle_all()
            while len(slow) < 8:             # the attacker keeps its connections up
                s = socket.create_connection(("127.0.0.1", port))
                s.setblocking(False)
                slow.append(s)
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            ok += b"# HELP" in body
        assert ok == 5
        # alone, a trickler is closed by the server within the deadline (+ the check interval)
        for s in slow:
            s.close()
        slow.clear()
        lone = socket.create_connection(("127.0.0.1", port))
        slow.append(lone)
        lone.settimeout(0.2)
        opened = time.monotonic()
        while time.monotonic() - opened < HEAD_TIMEOUT + 5:
            try:
                lone.send(b"G")
                if lone.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        cut_after.append(time.monotonic() - opened)
        assert cut_after[0] < HEAD_TIMEOUT + 5, cut_after
    finally:
        for s in slow:
            s.close()
        sink.close()
