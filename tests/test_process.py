"""Process behaviour: pipes, files, signals and the exit summary, on the real CLI."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from tracer import tcpstates_argv
from traffic import free_port, refused

pytestmark = pytest.mark.kernel
SUMMARY = re.compile(r"^tcpstates: (\d+) events seen, (\d+) kept, written: (.*); (\d+) dropped, "
                     r"(\d+) kernel misses, 0 unaccounted$")   # the in-kernel cross-check


def _wait_ready(notify: socket.socket, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([notify], [], [], 0.1)
        if r and b"READY=1" in notify.recv(64):
            return
        assert proc.poll() is None, "tracer exited before ready"
    raise AssertionError("tracer not ready")


@pytest.fixture
def notify(tmp_path):
    path = str(tmp_path / "n.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    yield s, {**os.environ, "NOTIFY_SOCKET": path}
    s.close()


def test_pipe_to_head_exits_quietly(tmp_path, notify):
    sock, env = notify
    port = free_port()
    argv = " ".join(f"'{a}'" for a in tcpstates_argv("-D", str(port)))
    proc = subprocess.Popen(["bash", "-c", f"set -o pipefail; {argv} 2>{tmp_path}/err | head -3; "
                             f"echo \"${{PIPESTATUS[0]}}\" > {tmp_path}/rc"],
                            stdout=subprocess.PIPE, env=env)
    _wait_ready(sock, proc)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        refused(port)          # keep writing until tcpstates sees EPIPE
        time.sleep(0.02)
    out = proc.communicate(timeout=30)[0].decode()
    assert len(out.splitlines()) == 3 and out.startswith("SKADDR")
    assert (tmp_path / "rc").read_text().strip() == "0"
    assert (tmp_path / "err").read_text() == ""    # no traceback, no noise


def test_pipe_to_cat_is_flushed_while_running(notify):
    sock, env = notify
    port = free_port()
    proc = subprocess.Popen(tcpstates_argv("-s", "-D", str(port)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        _wait_ready(sock, proc)
        refused(port)
        got = b""
        deadline = time.monotonic() + 10
        while got.count(b"\n") < 3 and time.monotonic() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 0.5)
            if r:
                got += os.read(proc.stdout.fileno(), 65536)
        # the lines arrived while tcpstates still runs: no block buffering on pipes
        assert proc.poll() is None
        assert got.count(b"\n") == 3 and b",SYN_SENT,CLOSE," in got
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_drains_flushes_and_summarises(tracer, sig):
    port = free_port()
    t = tracer("-D", str(port))
    for _ in range(20):
        refused(port)
    rc, out, err = t.stop(sig)
    assert rc == 0
    rows = [l for l in out.splitlines()[1:]]
    assert len(rows) == 40      # every event of every connect reached the file
    (line,) = err.splitlines()
    m = SUMMARY.match(line)
    assert m, line
    seen, kept, written, dropped, misses = m.groups()
    assert (seen, kept, written, dropped, misses) == ("40", "40", "text 40", "0", "0")


def test_sigterm_during_a_storm_exits_within_two_seconds(tracer, tmp_path):
    port = free_port()
    t = tracer("--sink", "jsonl", "-o", f"sinks.jsonl.path={tmp_path / 'storm.jsonl'}")
    stop = time.monotonic() + 1.0
    storm = subprocess.Popen([sys.executable, "-c", STORM, str(port), "3"])
    while time.monotonic() < stop:
        time.sleep(0.05)
    sent = time.monotonic()
    t.proc.send_signal(signal.SIGTERM)
    rc = t.proc.wait(10)
    took = time.monotonic() - sent
    storm.kill()
    storm.wait()
    assert rc == 0
    assert took < 2.0, took
    lines = (tmp_path / "storm.jsonl").read_bytes().splitlines()
    assert len(lines) > 100     # the storm was traced, and the file ends on a whole record
    import orjson
    assert orjson.loads(lines[-1])["seq"] == len(lines)


STORM = """
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(4096)
n = 0
while time.monotonic() < end and n < 200000:
    c = socket.create_connection(("127.0.0.1", port)); a, _ = srv.accept(); c.close(); a.close(); n += 1
"""
