"""Issue 14: SIGTERM ends the tracer within 2 s, with its summary, in every
blocking state; one failing sink never takes another down; "written" counts
exactly what the destination holds. Real CLI in a subprocess, real pipes,
FIFOs and devices. One line per case in the tables below."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import termios
import threading
import time
from pathlib import Path

import orjson
import pytest
from replayrec import replay_record as _record, wait_for as _wait_for
from journald import stopped_journald
from pipes import full_pipe
from tracer import Tracer, run_cli, tcpstates_argv

F_GETPIPE_SZ = 1032




def _stop_within(proc: subprocess.Popen, stderr_path: Path, limit: float = 2.0) -> str:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(10)
    took = time.monotonic() - start
    err = stderr_path.read_text(errors="replace")
    assert took < limit, (took, err)
    assert rc == 0 and "Traceback" not in err and "internal error" not in err, (rc, err)
    assert "events seen" in err.splitlines()[-1], err
    return err




# -- SIGTERM in each blocking state ------------------------------------------------------------
def test_sigterm_while_stdout_is_a_full_pipe_nobody_reads(tmp_path):
    r_out, w_out = os.pipe()
    r_in, w_in = os.pipe()
    err = tmp_path / "err"
    with open(err, "wb") as e:
        proc = subprocess.Popen(tcpstates_argv("--replay", "-", "-s"), stdin=r_in, stdout=w_out, stderr=e)
    os.close(r_in)
    os.close(w_out)
    size = fcntl.fcntl(r_out, F_GETPIPE_SZ)
    data = b"".join(_record(i) for i in range(1, 3000))     # its CSV is ~2x what the pipe holds
    # fed from a thread: the tracer stops reading once its stdout is full
    threading.Thread(target=lambda: _write_quietly(w_in, data), daemon=True).start()

    def full() -> bool:
        n = bytearray(4)
        fcntl.ioctl(r_out, termios.FIONREAD, n)
        return int.from_bytes(n, "little") >= size - 4096
    _wait_for(full, "stdout pipe never filled")
    text = _stop_within(proc, err)
    assert "not written: csv" in text.splitlines()[-1]
    os.close(r_out)


def _write_quietly(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass       # the tracer stopped and went away
    finally:
        os.close(fd)


def test_sigterm_while_waiting_for_a_fifo_output_reader(tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    r_in, w_in = os.pipe()
    err = tmp_path / "err"
    with open(err, "wb") as e:
        proc = subprocess.Popen(tcpstates_argv("--replay", "-", "--sink", "jsonl", "-o",
                                               f"sinks.jsonl.path={fifo}"), stdin=r_in, stderr=e,
                                stdout=subprocess.DEVNULL)
    os.close(r_in)
    _wait_for(lambda: "waiting for a reader" in err.read_text(), "no waiting notice")
    _stop_within(proc, err)
    os.close(w_in)


@pytest.mark.parametrize("make", [
    lambda p: (os.mkfifo(p / "in.fifo"), p / "in.fifo")[1],          # a FIFO nobody writes
    lambda p: Path("/dev/zero"),                                      # endless NULs, no newline
    lambda p: Path("/dev/urandom"),                                   # endless garbage
    lambda p: (os.truncate(p / "big", 0) if (p / "big").touch() is None else 0, (p / "big"),
               os.truncate(p / "big", 88 << 20))[1],                  # an 88 MB corrupt file
], ids=["fifo", "dev-zero", "dev-urandom", "88MB-corrupt"])
def test_sigterm_while_replaying_endless_or_stuck_input(tmp_path, make):
    path = make(tmp_path)
    t = Tracer(["--replay", str(path), "-s"], workdir=tmp_path / "t", stdin=subprocess.DEVNULL)
    _stop_within(t.proc, t.stderr_path)
    t.notify.close()


def test_sigterm_while_stderr_is_a_full_pipe_nobody_reads(tmp_path):
    """Warnings and the summary never block on a stderr nobody reads: the
    tracer still stops within 2 s (what it could not say is dropped)."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    r_err, w_err, _ = full_pipe()
    proc = subprocess.Popen(tcpstates_argv("--replay", str(fifo), "-s"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=w_err)
    os.close(w_err)
    try:
        time.sleep(0.5)   # no readiness signal exists for "blocked opening the FIFO"; bounded
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
        assert time.monotonic() - start < 2.0 and rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(r_err)


def test_warnings_lost_to_a_full_stderr_are_counted_in_the_summary(tmp_path):
    """A warning that could not be written (stderr a full pipe nobody reads)
    is not silently gone: the exit summary, written once stderr has room,
    counts it."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    r_err, w_err, filled = full_pipe()
    proc = subprocess.Popen(tcpstates_argv("--replay", str(fifo), "--sink", "jsonl",
                                           "-o", f"sinks.jsonl.path={out}"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w_err)
    os.close(w_err)
    try:
        with open(fifo, "wb") as feed:   # opens once the tracer opened its end
            feed.write(b"not a record\n")
            feed.flush()
            # the skip warning is decided before the next record is written:
            # the good record in the output proves the warner gave up on it
            feed.write(_record(1))
            feed.flush()
            _wait_for(lambda: out.exists() and b"\"seq\":1," in out.read_bytes(), "good record written")
            drained = 0
            while drained < filled:   # room for the summary now
                drained += len(os.read(r_err, 65536))
        rc = proc.wait(20)
        with os.fdopen(r_err, "rb") as err_stream:
            r_err = -1
            err = err_stream.read().decode()
        assert rc == 0, err
        last = err.strip().splitlines()[-1]
        assert "1 unreadable records skipped" in last and "1 warnings not shown (stderr was a full pipe)" in last, err
    finally:
        if proc.poll() is None:
            proc.kill()
        if r_err >= 0:
            os.close(r_err)


# -- one failing sink, counted exactly ------------------------------------------------------------
def _trace(tmp_path: Path, n: int = 50, **kw) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_record(i, **kw) for i in range(1, n + 1)))
    return path


def _summary(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_text_to_dev_full_does_not_take_jsonl_down(tmp_path):
    out = tmp_path / "e.jsonl"
    r = run_cli("--replay", str(_trace(tmp_path)), "--sink", "text", "--sink", "jsonl",
                "-o", "sinks.text.path=/dev/full", "-o", f"sinks.jsonl.path={out}")
    err = r.stderr.decode()
    assert r.returncode == 0 and "internal error" not in err, err
    assert len(out.read_bytes().splitlines()) == 50
    assert "written: text 0, jsonl 50" in _summary(err) and "not written: text 50" in _summary(err)


def test_closed_stdout_is_one_sinks_failure(tmp_path):
    out = tmp_path / "e.jsonl"
    cmd = " ".join(tcpstates_argv("--replay", str(_trace(tmp_path)), "--sink", "text", "--sink", "jsonl",
                                  "-o", f"sinks.jsonl.path={out}"))
    r = subprocess.run(["bash", "-c", f"exec {cmd} >&-"], capture_output=False, stderr=subprocess.PIPE)
    err = r.stderr.decode()
    assert r.returncode == 0 and "internal error" not in err, err
    assert "standard output is closed" in err
    assert len(out.read_bytes().splitlines()) == 50
    assert "written: text 0, jsonl 50" in _summary(err)


def test_closed_stderr_warnings_are_not_fatal(tmp_path):
    out = tmp_path / "e.jsonl"
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"garbage\n" + _record(1))                 # the first warning: a skipped record
    cmd = " ".join(tcpstates_argv("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}"))
    r = subprocess.run(["bash", "-c", f"exec {cmd} 2>&-"])
    assert r.returncode == 0
    assert out.read_bytes().count(b'"type":"state_change"') == 1


def test_unencodable_record_costs_only_itself_and_leaves_a_seq_gap(tmp_path):
    # replay cannot produce one any more (fields are range-checked and orjson reads
    # big integers as floats), but an enricher can: a value orjson cannot encode
    from tcpstates.testing import make_event, run_pipeline
    out = tmp_path / "e.jsonl"
    events = [make_event(), make_event(extra={"big": 2**70}), make_event()]
    r = run_pipeline(f'[tcpstates]\nsinks = ["jsonl"]\n[sinks.jsonl]\npath = "{out}"\n', events,
                     entry_points=False)
    seqs = [orjson.loads(l)["seq"] for l in out.read_bytes().splitlines()]
    assert seqs == [1, 3]
    assert r.summary["written"] == {"jsonl": 2} and r.summary["lost_by_sink"] == {"jsonl": 1}


def test_replay_times_at_the_limits_never_overflow_the_encoder(tmp_path):
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(_record(1, time_ns=2**63 - 1, mono_ns=0) + _record(2, mono_ns=2**63 - 1)
                      + _record(3, time_ns=0, mono_ns=2**63 - 1) + _record(4, mono_ns=0))
    out = tmp_path / "e.jsonl"
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "--sink", "text", "-T",
                "-o", f"sinks.jsonl.path={out}", "-o", f"sinks.text.path={tmp_path / 'e.txt'}")
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "written: jsonl 4, text 4" in _summary(err), err


WRONG = [None, True, -1, 2**64, 2**70, 1.5, float("nan"), "", "\x1b[31m", [1], {"a": 1}, "٨٠"]
FIELDS = ["time_ns", "mono_ns", "skaddr", "family", "laddr", "lport", "raddr", "rport", "oldstate",
          "newstate", "span_us", "pid", "tid", "comm", "cgroup_id", "owner_pid", "owner_comm", "extra"]


def _hostile_records() -> bytes:
    lines = []
    for field in FIELDS:
        for value in WRONG:
            rec = orjson.loads(_record(1))
            rec[field] = value
            try:
                lines.append(orjson.dumps(rec).replace(b"NaN", b"nan"))
            except TypeError:      # 2^70 and NaN: orjson refuses, write them by hand
                text = orjson.dumps({**rec, field: 0}).decode()
                lines.append(text.replace(f'"{field}":0', f'"{field}":{value!r}'.replace("'", '"')).encode())
    return b"\n".join(lines) + b"\n"


def test_an_integer_past_64_bits_is_named_as_one(tmp_path):
    # the JSON reader turns it into a float: the message must not echo a float the file never held
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(_record(1).replace(b'"cgroup_id":', b'"cgroup_id":18446744073709551616,"x":'))
    err = run_cli("--replay", str(trace)).stderr.decode()
    assert ("field 'cgroup_id' must be an integer in 0..18446744073709551615, got an integer beyond "
            "64 bits (about 1.845e+19)") in err, err


@pytest.mark.parametrize("sinks", [["-s", "--owner"], ["-w", "--owner", "-T"], ["--sink", "jsonl"]])
def test_every_replay_field_with_every_wrong_value(tmp_path, sinks):
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(_hostile_records())
    r = run_cli("--replay", str(trace), *sinks)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert "\x1b" not in r.stdout.decode() and "\x1b" not in err


@pytest.mark.parametrize("speedups", ["", "1"], ids=["c", "python"])
@pytest.mark.parametrize("sinks", [["--sink", "jsonl"], ["--sink", "jsonl", "-s"], ["--sink", "jsonl", "--summary"],
                                   ["--sink", "jsonl", "--sink", "metrics", "-o", "sinks.metrics.listen=127.0.0.1:0"]])
def test_a_replayed_connection_field_is_an_ordinary_field(tmp_path, sinks, speedups):
    """Only the connection stage's own object makes a connection record: a
    state_change record with a field named "connection" (any type) is a
    state change like any other, in every sink and on both encoder paths."""
    values = ["x", 1, True, [1], {"a": 1}, None]
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(_record(i + 1, connection=v) for i, v in enumerate(values)))
    out = tmp_path / "e.jsonl"
    r = run_cli("--replay", str(trace), *sinks, "-o", f"sinks.jsonl.path={out}",
                env={"TCPSTATES_NO_SPEEDUPS": speedups})
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err and "failed" not in err, err
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [rec["type"] for rec in recs] == ["state_change"] * len(values)
    assert [rec["connection"] for rec in recs] == values
    assert f"jsonl {len(values)}" in _summary(err), err


def test_replay_family_list_is_skipped_not_an_internal_error(tmp_path):
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(_record(1, family=[1]) + _record(2))
    r = run_cli("--replay", str(trace), "-s")
    err = r.stderr.decode()
    assert r.returncode == 0 and "field 'family' must be ipv4 or ipv6" in err, err
    assert "1 unreadable records skipped" in _summary(err)


# -- reopen (SIGHUP) that fails, then works again -------------------------------------------------
def test_failed_reopen_is_counted_and_retried(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    out = d / "e.jsonl"
    r_in, w_in = os.pipe()
    t = Tracer(["--replay", "-", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}"],
               workdir=tmp_path / "t", stdin=r_in)
    os.close(r_in)
    os.write(w_in, _record(1))
    _wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") == 1, "first record")
    out.rename(tmp_path / "rotated.jsonl")
    d.rmdir()                                          # the directory is gone: reopen must fail
    t.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: "cannot open for appending" in t.stderr_path.read_text(), "reopen failure reported")
    os.write(w_in, _record(2) + _record(3))            # lost: nowhere to write
    _wait_for(lambda: "not written" in t.stderr_path.read_text() or
              t.stderr_path.read_text().count("cannot open") >= 1, "loss")
    time.sleep(0.3)
    d.mkdir()                                          # it comes back: the next write reopens
    os.write(w_in, _record(4))
    _wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") == 1, "record after recovery")
    os.close(w_in)
    rc = t.proc.wait(10)
    err = t.stderr_path.read_text()
    assert rc == 0, err
    assert (tmp_path / "rotated.jsonl").read_bytes().count(b"\n") == 1   # nothing appended to the old file
    assert [orjson.loads(l)["seq"] for l in out.read_bytes().splitlines()] == [4]
    assert "works again after losing 2 events" in err
    assert "written: jsonl 2" in _summary(err) and "not written: jsonl 2" in _summary(err)


# -- two sinks, one destination -------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["--sink", "text", "--sink", "jsonl"],                                          # both on stdout
    ["--sink", "text", "--sink", "jsonl", "-o", "sinks.text.path=SAME", "-o", "sinks.jsonl.path=SAME"],
    ["--sink", "csv", "--sink", "jsonl", "-o", "sinks.jsonl.path=STDOUT_FILE"],    # stdout is that file
])
def test_two_sinks_on_one_destination_are_refused(tmp_path, args):
    same, stdout_file = tmp_path / "same", tmp_path / "stdout"
    args = [a.replace("SAME", str(same)).replace("STDOUT_FILE", str(stdout_file)) for a in args]
    with open(stdout_file, "ab") as out:
        r = subprocess.run(tcpstates_argv("--replay", os.devnull, *args), stdout=out, stderr=subprocess.PIPE)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "another sink already writes there" in err, err


# -- journald: "written" is what journald got ------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("strict", [[], ["--strict"]])
def test_journal_without_socket_counts_nothing_written(tmp_path, strict):
    trace = _trace(tmp_path, 100)
    cmd = " ".join(tcpstates_argv("--replay", str(trace), "-Y", "--sink", "journal", *strict))
    # a private mount namespace where /run/systemd/journal is empty: no journald
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        f"mkdir -p /run/systemd/journal && mount -t tmpfs none /run/systemd/journal && {cmd}"],
                       capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert "Traceback" not in err and "internal error" not in err, err
    if strict:
        # every entry would be lost: --strict does not start the run
        assert r.returncode == 1 and err.count("\n") == 1 and "journald is not running" in err, err
    else:
        # the run goes on (journald may come), but its only sink delivered nothing: status 1
        assert r.returncode == 1, err
        assert "written: journal 0" in _summary(err) and "not written: journal 100" in _summary(err)
        assert "does not exist" in err
        assert "error: every sink failed (journal: delivered nothing, 0 of 100 events written)" in err


@pytest.mark.root
def test_stopped_journald_costs_only_the_journal_sink(tmp_path):
    """journald stopped (SIGSTOP): its socket queue fills and libsystemd's send
    blocks. The journal sink gives up on each batch after its stall_timeout,
    the jsonl sink still gets every event, and after SIGCONT journald holds
    exactly what the summary says was written to it."""
    n = 5000
    trace = _trace(tmp_path, n, comm="stalltest")
    out = tmp_path / "e.jsonl"
    with stopped_journald(tmp_path / "journald") as j:
        start = time.monotonic()
        r = subprocess.run(j.argv(tcpstates_argv("--replay", str(trace), "--sink", "journal",
                                                 "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
                                                 "-o", "sinks.journal.stall_timeout=0.3")),
                           capture_output=True, timeout=120)
        took = time.monotonic() - start
        err = r.stderr.decode()
        assert r.returncode == 0 and "Traceback" not in err, err
        assert len(out.read_bytes().splitlines()) == n, err
        summary = _summary(err)
        written = int(summary.split("written: journal ")[1].split(",")[0])
        assert 0 < written < n, summary
        assert f"not written: journal {n - written}" in summary, summary
        assert "stall_timeout" in err, err
        assert took < 60, took
        j.resume()
        j.sync()
        held = [e for e in j.read("TCP_CPU_COMM=stalltest")]
        assert len(held) == written, (len(held), summary)


@pytest.mark.root
def test_sigterm_while_journald_is_stopped(tmp_path):
    """Blocked in libsystemd's send to a stopped journald, with a stall_timeout
    far away: SIGTERM still ends the run within 2 s, with its summary."""
    trace = _trace(tmp_path, 2000)
    with stopped_journald(tmp_path / "journald") as j:
        t = Tracer(["--replay", str(trace), "--sink", "journal", "-o", "sinks.journal.stall_timeout=3600"],
                   workdir=tmp_path / "t", wrap=j.argv)
        # blocked for certain: the kernel says where the tracer's main thread sleeps
        pid = _descendant_python(t.proc.pid)
        _wait_for(lambda: Path(f"/proc/{pid}/wchan").read_text() == "unix_wait_for_peer", "blocked in send")
        err = _stop_within(t.proc, t.stderr_path)
        assert "not written: journal" in _summary(err), err
        t.notify.close()


def _descendant_python(pid: int) -> int:
    """nsenter execs or forks the tracer: the python process under `pid` (or it)."""
    for _ in range(200):
        if "python" in Path(f"/proc/{pid}/comm").read_text():
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            pid = int(children[0])
            continue
        time.sleep(0.01)
    raise AssertionError("no python process found under nsenter")


def _ro_tmpfs(p: Path) -> Path:
    (p / "ro").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(p / "ro")], check=True)
    return p / "ro" / "e.jsonl"


def _planted_link(p: Path) -> Path:
    """A link in a sticky world-writable directory, owned by another user: anyone
    could have planted it (the attack); /tmp stands for any such directory."""
    (p / "real").mkdir()
    link = Path("/tmp") / f"tcpstates-test-link-{os.getpid()}"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(p / "real")
    os.lchown(link, 65534, 65534)
    return link / "e.jsonl"


@pytest.mark.root
@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "gone" / "e.jsonl", "No such file or directory"),
    (_ro_tmpfs, "Read-only file system"),
    (_planted_link, "could be replaced by someone other than root"),
], ids=["deleted-directory", "read-only", "symlinked-parent"])
def test_unusable_output_locations_are_one_line_errors(tmp_path, make, needle):
    path = make(tmp_path)
    try:
        r = run_cli("--replay", os.devnull, "--sink", "jsonl", "-o", f"sinks.jsonl.path={path}")
        err = r.stderr.decode()
        assert r.returncode == 2 and err.count("\n") == 1 and needle in err, err
        assert not (tmp_path / "real" / "e.jsonl").exists(), "nothing written through the link"
    finally:
        if (tmp_path / "ro").is_dir():
            subprocess.run(["umount", str(tmp_path / "ro")], check=False)
        link = Path("/tmp") / f"tcpstates-test-link-{os.getpid()}"
        if link.is_symlink():
            link.unlink()


@pytest.mark.parametrize("flags", [["--owner"], ["--owner", "-s"], ["--owner", "-w"]])
def test_replayed_enricher_fields_of_any_type_cost_nothing(tmp_path, flags):
    """Fields a replayed file claims an enricher added (container_id, pod_uid,
    owner_pid ...) are shown as text whatever their type; no event is lost."""
    bad = [_record(1, container_id=5), _record(2, pod_uid=[1]), _record(3, owner_pid="x\n"),
           _record(4, k8s_pod={"a": 1}, k8s_namespace=7)]
    good = [_record(i) for i in range(5, 25)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(bad + good))
    r = run_cli("--replay", str(src), *flags)
    err = r.stderr.decode()
    assert r.returncode == 0 and "24 events seen" in err and "Traceback" not in err, err
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 1 + 24, lines[:3]
    assert not any("\x1b" in line for line in lines)


def test_replayed_addresses_must_be_addresses(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_record(1, laddr="1.2.3.4\n5") + _record(2))
    r = run_cli("--replay", str(src), "-s")
    err = r.stderr.decode()
    assert r.returncode == 0 and "1 unreadable records skipped" in err, err
    assert r.stdout.decode().count("\n") == 2


def test_replayed_connection_records_are_counted_as_skipped_not_dropped(tmp_path):
    conn = orjson.dumps({"type": "connection", "v": 1, "seq": 1}) + b"\n"
    src = tmp_path / "in.jsonl"
    src.write_bytes(conn + _record(2))
    r = run_cli("--replay", str(src), "-s")
    err = r.stderr.decode()
    assert r.returncode == 0 and "1 unreadable records skipped" in err and "connection record" in err, err
    strict = run_cli("--replay", str(src), "-s", "--strict")
    assert strict.returncode == 2 and b"connection record" in strict.stderr
