"""Issue 14, what the fault matrix (test_fault_matrix.py) does not cover: warnings
lost to a full or closed stderr, hostile replay records, a failed reopen, two
sinks on one destination, journald missing or stopped. Real CLI in a
subprocess, real pipes, FIFOs and devices."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from replayrec import replay_record as _record, wait_for as _wait_for
from journald import stopped_journald
from pipes import full_pipe
from tracer import Tracer, run_cli, tcpstates_argv


# -- stderr full or closed --------------------------------------------------------------------------
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
    # records 2 and 3 would be 2^64 ns after the epoch on the recording's clock
    # (its first record: time_ns 2^63-1 at mono_ns 0): skipped and counted, not
    # written with a time_ns no schema reader (nor replay itself) accepts
    assert "written: jsonl 2, text 2" in _summary(err) and "2 unreadable records skipped" in _summary(err), err
    assert err.count("skipped record: field 'mono_ns'") == 2, err
    _assert_schema_valid(out)


def test_replayed_times_before_the_epoch_are_skipped_not_written_negative(tmp_path):
    """The first record's clock (time_ns 0 at mono_ns 2^63-1) puts mono_ns 0 at
    -2^63 ns: once written as "time_ns": -9223372036854775807, 1677-09-21."""
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(_record(1, time_ns=0, mono_ns=2**63 - 1) + _record(2, mono_ns=0)
                      + _record(3, mono_ns=2**63 - 1))
    out = tmp_path / "e.jsonl"
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
    err = r.stderr.decode()
    assert r.returncode == 0 and "in.jsonl:2: skipped record: field 'mono_ns' 0" in err, err
    assert "written: jsonl 2" in _summary(err), err
    _assert_schema_valid(out)
    assert [orjson.loads(line)["time_ns"] for line in out.read_bytes().splitlines()
            if b'"state_change"' in line] == [0, 0]
    # and what was written replays again, every record
    again = run_cli("--replay", str(out), "--sink", "jsonl", "-o", f"sinks.jsonl.path={tmp_path / 'again.jsonl'}")
    assert again.returncode == 0 and "skipped" not in again.stderr.decode(), again.stderr


def _assert_schema_valid(path: Path) -> None:
    import jsonschema
    schema = orjson.loads((Path(__file__).resolve().parent.parent / "docs" / "event.schema.json").read_bytes())
    for line in path.read_bytes().splitlines():
        jsonschema.validate(orjson.loads(line), schema)


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
# a socket file left by a journald that is gone: it exists, nothing listens
STALE_SOCKET = ("python3 -c 'import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
                "s.bind(\"/run/systemd/journal/socket\"); s.close()' && ")


@pytest.mark.root
@pytest.mark.parametrize("stale", [False, True], ids=["no-socket", "stale-socket"])
@pytest.mark.parametrize("strict", [[], ["--strict"]])
def test_journal_without_socket_counts_nothing_written(tmp_path, strict, stale):
    trace = _trace(tmp_path, 100)
    cmd = " ".join(tcpstates_argv("--replay", str(trace), "-Y", "--sink", "journal", *strict))
    # a private mount namespace where /run/systemd/journal is empty (or holds a
    # stale socket file): no journald
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        "mkdir -p /run/systemd/journal && mount -t tmpfs none /run/systemd/journal && "
                        + (STALE_SOCKET if stale else "") + cmd],
                       capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert "Traceback" not in err and "internal error" not in err, err
    said = "nothing listens on it" if stale else "does not exist"
    if strict:
        # every entry would be lost: --strict does not start the run
        assert r.returncode == 1 and err.count("\n") == 1 and "journald is not running" in err, err
        assert said in err, err
    else:
        # the run goes on (journald may come), but its only sink delivered nothing: status 1
        assert r.returncode == 1, err
        assert "written: journal 0" in _summary(err) and "not written: journal 100" in _summary(err)
        assert said in err
        assert "error: every sink failed (journal: " in err and "0 of 100 events written)" in err


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


@pytest.mark.root
def test_a_full_disk_part_way_keeps_the_whole_lines_that_fit(tmp_path):
    """docs/security.md: a write the disk refuses part-way is taken back to the
    last whole line. It was taken back to the start of the batch: a batch
    bigger than the free space lost every line that fit (written 0, file empty)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "e.jsonl"
        trace = _trace(tmp_path, n=2000)          # ~600 KB of JSON Lines, one batch
        r = run_cli("--replay", str(trace), "--sink", "jsonl", "--sink", "csv",
                    "-o", f"sinks.jsonl.path={out}", "-o", f"sinks.csv.path={tmp_path / 'all.csv'}")
        err = r.stderr.decode()
        assert r.returncode == 0 and "No space left on device" in err, err
        data = out.read_bytes()
        assert data.endswith(b"\n")                # no torn line
        lines = [orjson.loads(line) for line in data.splitlines()]
        assert len(lines) > 100                    # 64 KiB of whole lines, not nothing
        assert [rec["seq"] for rec in lines] == list(range(1, len(lines) + 1))
        summary = _summary(err)
        assert f"written: jsonl {len(lines)}, csv 2000" in summary, summary   # counts what the file holds
        assert f"not written: jsonl {2000 - len(lines)}" in summary, summary
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_the_exit_summary_of_many_sinks_is_never_cut(tmp_path):
    """The summary went through the warnings' 1,000-character cap (meant for
    hostile values): with 40 sinks it ended "0 droppe... (18 more characters)",
    its loss counts cut off."""
    names = [f"audit_sink_number_{i:02d}" for i in range(40)]
    cfg = tmp_path / "many.toml"
    cfg.write_text("[tcpstates]\nsinks = [" + ", ".join(f'"{n}"' for n in names) + "]\n" + "".join(
        f'[sinks.{n}]\ntype = "jsonl"\npath = "{tmp_path / n}.jsonl"\n' for n in names))
    r = run_cli("--config", str(cfg), "--replay", str(_trace(tmp_path, n=3)))
    summary = _summary(r.stderr.decode())
    assert r.returncode == 0 and len(summary) > 1000, summary
    assert summary.endswith("; 0 dropped, 0 kernel misses"), summary[-200:]
    assert all(f"{n} 3" in summary for n in names), summary


def test_replayed_state_numbers_cannot_grow_the_summary_without_end(tmp_path):
    """A state is any ASCII number below 2^31 in a replayed file: one histogram
    per distinct number (and a report line block each) grew without bound."""
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(_record(i, oldstate=str(1000 + i), newstate="CLOSE") for i in range(1, 3001)))
    r = run_cli("--replay", str(trace), "--sink", "summary")
    err = r.stderr.decode()
    assert r.returncode == 0, err[-500:]
    assert sum(line.startswith("state = ") for line in err.splitlines()) == 65, err[:300]   # 64 + "other"
    assert "state = other (time spent in it)" in err
    assert "3000 events seen" in _summary(err)


def test_replayed_state_numbers_cannot_grow_the_metrics_page_without_end():
    """The metrics sink made a transitions series per distinct (old, new) pair:
    100,000 replayed pairs were a 13 MB page and 120 MB of memory."""
    from metricspage import metrics_page
    from tcpstates.api import RunContext
    from tcpstates.testing import make_event
    batch = [make_event(oldstate=1000 + i, newstate=7) for i in range(3000)]
    page = metrics_page(batch, RunContext())
    series = [line for line in page.splitlines() if line.startswith("tcpstates_transitions_total{")]
    assert len(series) == 1024 + 1, len(series)
    other = [line for line in series if 'old="other"' in line]
    assert other and other[0].endswith(" 1976.0"), other     # 3000 - 1024 pairs kept apart
