"""Issue 14 #6, what the fault matrix did not reach: writes to stderr itself.

The summary sink's report and live status line and the final error line were
plain blocking writes to stderr. With stderr a pipe nobody reads (or a
terminal whose output is stopped, Ctrl-S), the tracer hung in that write for
good and SIGTERM could not end it: the handler ran and the write went on
waiting. Every write to stderr now waits a bounded time. Real CLI in a
subprocess, real pipes and a real pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import subprocess
import time
import tty

import pytest
from pipes import full_pipe
from replayrec import replay_record, wait_for
from tracer import tcpstates_argv

STOP_LIMIT_S = 2.0   # issue 14: SIGTERM ends the tracer within 2 s, whatever the consumer does


def _full_pty() -> tuple[int, int]:
    """(master, slave) of a pseudo-terminal whose output buffer is full: nobody
    reads the master (a stopped or detached terminal)."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.set_blocking(slave, False)
    while _fill(slave):
        # the terminal layer moves what was written on to the master's buffer
        # in the background, which may free room: full only once nothing more fits
        time.sleep(0.05)
    os.set_blocking(slave, True)
    return master, slave


def _fill(fd: int) -> int:
    """Write into non-blocking `fd` to the last byte (a short status line must
    not fit); the bytes written."""
    filled = 0
    for size in (4096, 256, 16, 1):
        try:
            while True:
                filled += os.write(fd, b"x" * size)
        except BlockingIOError:
            pass
    return filled


def _stop_within_limit(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> float:
    start = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the tracer did not stop within 10 s of the signal (blocked on stderr)") from None
    took = time.monotonic() - start
    assert took < STOP_LIMIT_S, f"stopped only {took:.2f} s after the signal"
    return took


@pytest.mark.parametrize("stderr_kind", ["pipe", "terminal"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_summary_report_and_status_line_never_keep_a_stop_waiting(tmp_path, stderr_kind, sig):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    if stderr_kind == "pipe":
        keep, err_fd, _ = full_pipe()
    else:
        keep, err_fd = _full_pty()
    proc = subprocess.Popen(tcpstates_argv("--replay", str(fifo), "--summary", "--sink", "jsonl",
                                           "-o", f"sinks.jsonl.path={out}", "-o", "sinks.summary.status=on"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_fd)
    os.close(err_fd)
    try:
        with open(fifo, "wb") as feed:   # held open: the replay input never ends
            for seq in range(1, 4):
                feed.write(replay_record(seq))
                feed.flush()
                # each batch written means the status line was tried after it
                wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") == seq, f"record {seq} written")
            _stop_within_limit(proc, sig)
        assert proc.returncode == 0
        assert out.read_bytes().count(b'"type":"state_change"') == 3   # the output intact
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(keep)


@pytest.mark.parametrize("why", ["missing replay file", "bad record with --strict"])
def test_the_error_line_to_a_full_stderr_never_hangs_the_exit(tmp_path, why):
    """The run ends in an error (exit 2) while stderr is a pipe nobody reads:
    the error line is given up after a moment, the exit status stays."""
    trace = tmp_path / "in.jsonl"
    if why == "missing replay file":
        args = ["--replay", str(tmp_path / "nothing-here.jsonl")]
    else:
        trace.write_bytes(replay_record(1) + b"not a record\n")
        args = ["--replay", str(trace), "--strict"]
    r_err, w_err, _ = full_pipe()
    proc = subprocess.Popen(tcpstates_argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=w_err)
    os.close(w_err)
    try:
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the tracer hung writing its error line to a full stderr") from None
        assert rc == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r_err)


def test_a_slow_but_live_stderr_still_gets_the_whole_report(tmp_path):
    """Bounded, not hasty: a reader that takes the report bit by bit gets all of it."""
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(replay_record(i, lport=1000 + i, span_us=i * 997) for i in range(1, 200)))
    r_err, w_err, filled = full_pipe()
    proc = subprocess.Popen(tcpstates_argv("--replay", str(trace), "--summary", "--sink", "jsonl",
                                           "-o", f"sinks.jsonl.path={tmp_path / 'o.jsonl'}"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w_err)
    os.close(w_err)
    got = b""
    with os.fdopen(r_err, "rb", buffering=0) as err:
        fcntl.fcntl(err.fileno(), fcntl.F_SETFL, os.O_NONBLOCK)
        end = time.monotonic() + 20
        while True:
            try:
                chunk = err.read(4096)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                got += chunk
            assert time.monotonic() < end, "no end of stderr"
            time.sleep(0.05)   # a slow reader on purpose: 4 KiB per 50 ms
    assert proc.wait(10) == 0
    text = got[filled:].decode()
    assert "state = LISTEN (time spent in it)" in text and "LPORT   EVENTS" in text, text
    assert text.rstrip().splitlines()[-1].startswith("tcpstates: 199 events seen"), text
    assert "warnings not shown" not in text, text

