"""Review2 finding 4: a reader that stops reading (stdout into a pipe nobody
reads, a paused pager) fails that sink's writes after `stall_timeout`; the
other sinks keep receiving, the stalled sink's events are counted as not
written, and it is retried with the next batch. Real CLI, real pipes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from replayrec import replay_record as _record, wait_for as _wait_for, line_count as _lines
from pipes import full_pipe
from summary import parse_summary
from tracer import run_cli, tcpstates_argv








def _drain(fd: int, into: bytearray) -> None:
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        into += chunk


def test_stdout_nobody_reads_does_not_stall_the_file_sink(tmp_path):
    out = tmp_path / "e.jsonl"
    r_out, w_out = os.pipe()
    r_in, w_in = os.pipe()
    err_path = tmp_path / "err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(tcpstates_argv("--replay", "-", "--sink", "text", "--sink", "jsonl",
                                               "-o", f"sinks.jsonl.path={out}",
                                               "-o", "sinks.text.stall_timeout=0.3"),
                                stdin=r_in, stdout=w_out, stderr=err)
    os.close(r_in)
    os.close(w_out)
    try:
        first = b"".join(_record(i) for i in range(1, 3001))    # its table is far more than a pipe holds
        feeder = threading.Thread(target=os.write, args=(w_in, first), daemon=True)
        feeder.start()
        # nobody reads stdout, yet the file gets every event while the run goes on
        _wait_for(lambda: _lines(out) == 3000, "the jsonl file stalled behind stdout", timeout=30)
        assert proc.poll() is None
        feeder.join(10)
        # the reader comes back: the next batch goes to stdout again
        got = bytearray()
        reader = threading.Thread(target=_drain, args=(r_out, got), daemon=True)
        reader.start()
        os.write(w_in, b"".join(_record(i) for i in range(3001, 3011)))
        _wait_for(lambda: _lines(out) == 3010, "second batch")
        os.close(w_in)
        w_in = -1
        rc = proc.wait(20)
        reader.join(10)
    finally:
        if w_in >= 0:
            os.close(w_in)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        os.close(r_out)
    err = err_path.read_text()
    assert rc == 0, err
    assert err.count("stall_timeout") == 1, err                  # one warning for the episode
    summary = err.splitlines()[-1]
    assert "written: text" in summary and "jsonl 3010" in summary, summary
    text_written = int(summary.split("written: text ")[1].split(",")[0].split(";")[0])
    lost = int(summary.split("not written: text ")[1].split(",")[0].split(";")[0])
    assert text_written + lost == 3010 and lost > 0, summary
    rows = bytes(got).decode().splitlines()
    assert rows[0].startswith("SKADDR") or len(rows) == text_written
    data_rows = [r for r in rows if not r.startswith("SKADDR")]
    assert len(data_rows) == text_written                         # counts = what the reader got
    assert all(len(r.split()) == len(data_rows[0].split()) for r in data_rows)   # no torn line
    assert data_rows[-1].split()[2] == "x"


def test_stall_timeout_is_schema_bounded():
    r = run_cli("--replay", os.devnull, "-o", "sinks.text.stall_timeout=0")
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "stall_timeout" in err, err


def test_a_reader_that_stays_stopped_costs_one_stall_timeout_not_one_per_batch(tmp_path):
    """20 batches while stdout's reader stays stopped, stall_timeout 2 s: the
    first batch waits 2 s, the next ones only probe, so the file sink gets
    all 2,000 events in about 2 s, not 40 (a live source would otherwise
    fill the kernel buffer and drop events for every sink)."""
    out = tmp_path / "e.jsonl"
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(_record(i) for i in range(1, 2001)))
    r_out, w_out, _ = full_pipe()                  # full before the first row
    err_path = tmp_path / "err"
    try:
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(tcpstates_argv("--replay", str(trace), "--sink", "text", "--sink", "jsonl",
                                                   "-o", f"sinks.jsonl.path={out}",
                                                   "-o", "sinks.text.stall_timeout=2",
                                                   "-o", "sources.replay.batch_size=100"),
                                    stdin=subprocess.DEVNULL, stdout=w_out, stderr=err)
        os.close(w_out)
        w_out = -1
        _wait_for(lambda: _lines(out) == 2000, "the file sink waited stall_timeout per batch", timeout=15)
        rc = proc.wait(20)
    finally:
        if w_out >= 0:
            os.close(w_out)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r_out)
    err = err_path.read_text()
    assert rc == 0, err
    assert "not written: text 2000" in err.splitlines()[-1], err


def test_a_table_whose_reader_left_counts_the_rest_as_not_written(tmp_path):
    """The text reader leaves (closes the pipe) mid-run; the table is closed
    quietly and the jsonl file goes on. For every sink, written + not written
    = kept, and "written: text" is exactly the rows the pipe accepted before
    it closed: the reader takes everything in the pipe before it leaves."""
    out = tmp_path / "e.jsonl"
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(_record(i) for i in range(1, 3001)))
    r_out, w_out = os.pipe()
    err_path = tmp_path / "err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(tcpstates_argv("--replay", str(trace), "--sink", "text", "--sink", "jsonl",
                                               "-o", f"sinks.jsonl.path={out}", "-o", "sources.replay.batch_size=100"),
                                stdin=subprocess.DEVNULL, stdout=w_out, stderr=err)
    os.close(w_out)
    got = b""
    try:
        with os.fdopen(r_out, "rb", buffering=0) as reader:
            while got.count(b"\n") < 150:
                chunk = reader.read(4096)
                assert chunk, "the table ended early"
                got += chunk
            # stop the writer (waitpid says when every thread is stopped: no write
            # is under way), take what the pipe holds, then leave: nothing the
            # pipe accepted is lost unread, so the count can be held to it exactly
            os.kill(proc.pid, signal.SIGSTOP)
            assert os.WIFSTOPPED(os.waitpid(proc.pid, os.WUNTRACED)[1])
            os.set_blocking(reader.fileno(), False)
            while True:
                try:
                    chunk = reader.read(65536)
                except BlockingIOError:
                    chunk = None
                if not chunk:                     # empty (None) or the writer gone (b"")
                    break
                got += chunk
        # the reader has left (pipe closed): the tracer goes on with jsonl
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    rc = proc.wait(30)
    err = err_path.read_text()
    assert rc == 0, err
    assert _lines(out) == 3000, err
    summary = parse_summary(err)
    assert summary.written["jsonl"] == 3000 and "jsonl" not in summary.not_written, err
    assert summary.written["text"] + summary.not_written["text"] == 3000, err
    # what the pipe accepted is what the reader got: the rows (the header is
    # no event), whole ones only (a row cut by the reader leaving is not written)
    rows = got.split(b"\n")[1:-1]
    assert got.startswith(b"SKADDR") and summary.written["text"] == len(rows), (summary, len(rows))
    assert all(len(r.split()) == len(rows[0].split()) for r in rows)


def test_reader_gone_while_the_pipe_has_no_room_for_a_line_is_seen_at_once(tmp_path):
    """`tcpstates | head -3`, when head leaves with the pipe so full that the
    next row does not fit: nothing is written (rows are never split), so no
    write says EPIPE — the tracer must still see the reader gone at once and
    exit quietly, not wait out its stall_timeout (30 s here) and complain."""
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(_record(i) for i in range(1, 201)))
    r_out, w_out, _ = full_pipe(room=40)           # room for 40 bytes: less than a row
    pipe = os.readlink(f"/proc/self/fd/{w_out}")
    proc = subprocess.Popen(tcpstates_argv("--replay", str(trace), "-o", "sinks.text.stall_timeout=30"),
                            stdin=subprocess.DEVNULL, stdout=w_out, stderr=subprocess.PIPE)
    os.close(w_out)
    try:
        # ready: the tracer holds its own write description of the pipe (it
        # writes through that one), and its header cannot fit
        def private_copy() -> bool:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            return sum(_link(proc.pid, fd) == pipe for fd in fds) >= 2
        _wait_for(private_copy, "the tracer never opened its stdout")
        os.close(r_out)                               # the reader leaves
        r_out = -1
        _, err = proc.communicate(timeout=5)          # not 30 s
    finally:
        if r_out >= 0:
            os.close(r_out)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and err == b"", err


def _link(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def test_a_line_cut_by_a_stall_and_never_finished_is_not_counted_as_written(tmp_path):
    """A stall cuts a line (the reader freed one page, then stopped again) and the
    run ends before its rest can follow: that line is torn in the FIFO for good,
    so "written: jsonl" is the whole lines the reader gets, not one more."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)      # lets the sink open it
    err_path = tmp_path / "err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(tcpstates_argv("--replay", "-", "--sink", "jsonl", "-o", f"sinks.jsonl.path={fifo}",
                                               "-o", "sinks.jsonl.stall_timeout=0.3",
                                               "-o", "sources.replay.batch_size=100"),
                                stdin=subprocess.PIPE, stderr=err)
    try:
        proc.stdin.write(b"".join(_record(i) for i in range(1, 301)))   # more than the FIFO holds
        proc.stdin.flush()
        _wait_for(lambda: "stall_timeout" in err_path.read_text(), "the sink never stalled")
        got = bytearray(os.read(reader, 4096))          # one page free: the next write cuts a line
        proc.stdin.write(b"".join(_record(i) for i in range(301, 401)))
        proc.stdin.close()                              # ...and the run ends before its rest can go
        rc = proc.wait(20)
        while chunk := os.read(reader, 65536):          # the writer is gone: reads end at EOF
            got += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(reader)
    err = err_path.read_text()
    assert rc == 0, err
    # the scenario happened: the FIFO ends in the head of a line
    assert not got.endswith(b"\n"), "no line was cut: the test proves nothing"
    summary = parse_summary(err)
    assert summary.written == {"jsonl": got.count(b"\n")}, err
    assert summary.written["jsonl"] + summary.not_written["jsonl"] == 400, err


def test_a_line_cut_by_a_stall_whose_reader_then_leaves_is_not_counted_as_written(tmp_path):
    """Review 10: a stall cuts a line (counted as written, its rest pending),
    then the reader leaves: the next write's flush of the rest fails with
    EPIPE. The rest was dropped there, so close() had nothing to count as
    unfinished: one line more counted than the reader got whole."""
    from tcpstates.errors import written_before
    from tcpstates.outputs import LineOutput, OutputStalled

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    out = LineOutput(str(fifo), stall_timeout=0.2)
    out.open()
    line = b"x" * 99 + b"\n"
    counted = 0
    got = bytearray()
    try:
        with pytest.raises(OutputStalled) as full:
            for _ in range(100000):                 # bounded: the FIFO holds far fewer
                out.write(line * 10)
                counted += 10
        counted += written_before(full.value, 10)
        got += os.read(reader, 4096)                # one page free: the next write cuts a line
        with pytest.raises(OutputStalled) as cut:
            out.write(line * 50)
        counted += written_before(cut.value, 50)
        while True:                                 # the reader takes everything, then leaves
            try:
                chunk = os.read(reader, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        os.close(reader)
    assert not got.endswith(b"\n"), "no line was cut: the test proves nothing"
    with pytest.raises(BrokenPipeError) as gone:
        out.write(line * 3)
    counted += written_before(gone.value, 3)
    out.close()
    counted -= out.unfinished
    assert counted == got.count(b"\n")
