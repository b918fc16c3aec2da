"""The jsonl sink on real kernel events: schema, sequence, wall-clock time,
file handling (mode, symlinks, append), SIGHUP and size rotation."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import jsonschema
import orjson
import pytest
from summary import until_no_reported_loss
from traffic import free_port, refused, session

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "event.schema.json").read_text())


def _records(*paths: Path) -> list[dict]:
    out = []
    for p in paths:
        for line in p.read_bytes().splitlines():
            out.append(orjson.loads(line))    # a torn line would raise here
    return out


@pytest.mark.kernel
def test_real_events_validate_and_carry_every_field(tracer, tmp_path):
    out = tmp_path / "events.jsonl"
    port6 = free_port(socket.AF_INET6)
    t = tracer("--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
    before = time.time_ns()
    refused(free_port())
    after = time.time_ns()
    session(socket.AF_INET6, port6, hold=0.05, server_delay=0.0)
    rc, _, err = t.stop()
    assert rc == 0, err
    recs = _records(out)
    for r in recs:
        jsonschema.validate(r, SCHEMA)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    syn = [r for r in recs if r["newstate"] == "SYN_SENT" and r["family"] == "ipv4"
           and r["comm"] and r["pid"] == os.getpid()]
    assert syn, "our own connect must be there with our PID"
    first = syn[0]
    # wall clock from the kernel's monotonic clock: within a few ms of the call
    assert before - 5_000_000 <= first["time_ns"] <= after + 5_000_000
    assert first["time"].endswith("Z") and first["time"][:19] == time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.gmtime(first["time_ns"] // 10**9))
    assert first["span_us"] is None          # first transition seen: unknown, not 0
    v6 = [r for r in recs if r["family"] == "ipv6" and port6 in (r["lport"], r["rport"])]
    assert len(v6) == 12 and all(r["laddr"] == "::1" for r in v6)
    held = [r for r in v6 if r["oldstate"] == "ESTABLISHED" and r["newstate"] == "FIN_WAIT1"]
    assert 50_000 <= held[0]["span_us"] < 150_000


def test_file_is_created_0640_appended_and_never_through_a_symlink(tmp_path):
    from tracer import run_cli
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(orjson.dumps(_sample()) + b"\n")
    out = tmp_path / "out.jsonl"
    os.umask(0o022)
    for _ in range(2):
        r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
        assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert len(out.read_bytes().splitlines()) == 2       # appended, not truncated
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={link}")
    assert r.returncode == 2 and b"symbolic link" in r.stderr and b"Traceback" not in r.stderr
    assert len(out.read_bytes().splitlines()) == 2


def _sample(**kw) -> dict:
    rec = {"type": "state_change", "v": 1, "seq": 1, "time": "2026-11-27T08:00:00.000000000Z",
           "time_ns": 1795766400 * 10**9, "mono_ns": 10**9, "host": "h", "skaddr": "ffff1",
           "family": "ipv4", "laddr": "10.0.0.1", "lport": 22, "raddr": "10.0.0.2", "rport": 5000,
           "oldstate": "ESTABLISHED", "newstate": "FIN_WAIT1", "span_us": 1500, "pid": 1, "tid": 1,
           "comm": "sshd", "cgroup_id": 0}
    rec.update(kw)
    return rec


def test_replay_round_trip_keeps_every_field(tmp_path):
    from tracer import run_cli
    recs = [_sample(seq=i + 1, mono_ns=10**9 + i * 1000, time_ns=1795766400 * 10**9 + i * 1000,
                    time=f"2026-11-27T08:00:00.{i * 1000:09d}Z", span_us=None if i == 0 else i)
            for i in range(5)]
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "--no-summary")
    assert r.returncode == 0, r.stderr
    out = [orjson.loads(l) for l in r.stdout.splitlines()]
    for o in out:
        o["host"] = "h"
    assert out == recs


@pytest.mark.kernel
def test_sighup_reopens_for_logrotate_without_losing_or_tearing(tracer, tmp_path):
    def run(attempt: int) -> tuple[tuple[Path, int, int], str]:
        d = tmp_path / str(attempt)
        d.mkdir()
        out = d / "events.jsonl"
        port = free_port()
        t = tracer("--sink", "jsonl", "-D", str(port), "-o", f"sinks.jsonl.path={out}")
        stop = threading.Event()
        count = [0]

        def load() -> None:
            while not stop.is_set() and count[0] < 20000:
                refused(port)
                count[0] += 1

        th = threading.Thread(target=load)
        th.start()
        _wait_for_lines(out, 100)                          # records are arriving
        os.rename(out, d / "events.jsonl.1")              # logrotate's rename...
        t.proc.send_signal(signal.SIGHUP)                  # ...and postrotate
        _wait_for_lines(out, 100)                          # the new file fills
        stop.set()
        th.join()
        rc, _, err = t.stop()
        assert rc == 0, err
        return (out, port, count[0]), err

    (out, port, connects), err = until_no_reported_loss(run)
    old, new = _records(out.with_name("events.jsonl.1")), _records(out)
    assert old and new, "both files got records"
    recs = old + new
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert all(r["type"] == "state_change" and port in (r["lport"], r["rport"]) for r in recs), err
    assert len(recs) == 2 * connects                   # every event of every connect
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def _wait_for_lines(path: Path, n: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout}s")


def test_numbered_rotation_never_renames_and_goes_on_after_a_restart(tmp_path):
    from tracer import run_cli

    def replay(first: int, count: int) -> None:
        trace = tmp_path / "in.jsonl"
        trace.write_bytes(b"".join(orjson.dumps(_sample(seq=first + i, mono_ns=10**9 + i)) + b"\n"
                                   for i in range(count)))
        r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
                    "-o", "sinks.jsonl.max_bytes=20000", "-o", "sinks.jsonl.keep=3",
                    "-o", "sinks.jsonl.rotate_names=numbered")
        assert r.returncode == 0, r.stderr

    def numbered() -> dict[int, Path]:
        return {int(p.suffix[1:]): p for p in tmp_path.glob("r.jsonl.*")}

    out = tmp_path / "r.jsonl"
    (tmp_path / "r.jsonl.5").write_text("")      # a file already there is never written over
    (tmp_path / "r.jsonl.5").chmod(0o640)
    replay(1, 300)
    files = numbered()
    assert not out.exists() and min(files) >= 5 and len(files) == 4     # the live one + keep = 3
    assert sorted(files) == list(range(max(files) - 3, max(files) + 1))
    inodes = {n: p.stat().st_ino for n, p in files.items()}
    newest = max(files)
    replay(301, 100)                              # a restart appends to the newest file
    after = numbered()
    assert all(after[n].stat().st_ino == inodes[n] for n in inodes if n in after)   # never renamed
    # the second run's 100 (its own seq from 1) follow the first run's last one
    seqs = [x["seq"] for x in _records(*(after[n] for n in sorted(after)))]
    assert seqs[-101:] == [300] + list(range(1, 101)), seqs[-102:]
    assert after[newest].read_bytes().splitlines()[-1:] != [] and min(after) >= newest - 3
    assert all(p.stat().st_size <= 20000 for p in after.values())


def _numbered_run(tmp_path: Path, out: Path, first: int, count: int, keep: int = 2):
    from tracer import run_cli
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(_sample(seq=first + i, mono_ns=10**9 + i)) + b"\n"
                               for i in range(count)))
    return run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
                   "-o", "sinks.jsonl.max_bytes=20000", "-o", f"sinks.jsonl.keep={keep}",
                   "-o", "sinks.jsonl.rotate_names=numbered")


def test_numbered_rotation_deletes_every_older_file_past_a_gap(tmp_path):
    """A file removed by hand in the middle of the numbers must not make the
    older ones stay forever (the disk would fill with them)."""
    from tracer import run_cli
    out = tmp_path / "r.jsonl"
    for n in (1, 2, 4, 5):                 # .3 was removed by hand
        (tmp_path / f"r.jsonl.{n}").write_text("")
        (tmp_path / f"r.jsonl.{n}").chmod(0o640)
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(_sample(seq=1 + i, mono_ns=10**9 + i)) + b"\n"
                               for i in range(300)))
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
                "-o", "sinks.jsonl.max_bytes=20000", "-o", "sinks.jsonl.keep=2",
                "-o", "sinks.jsonl.rotate_names=numbered")
    assert r.returncode == 0, r.stderr
    left = sorted(int(p.suffix[1:]) for p in tmp_path.glob("r.jsonl.*"))
    assert left == list(range(left[-1] - 2, left[-1] + 1)) and left[0] > 5, left   # live + keep=2


def test_numbered_after_the_renaming_scheme_never_appends_to_its_oldest_file(tmp_path):
    """Switching an install from renaming rotation to numbered: PATH.1..PATH.3
    are the renaming scheme's, PATH.3 its OLDEST; numbered mode starts a new
    file after them instead of appending to the oldest one."""
    from tracer import run_cli
    out = tmp_path / "r.jsonl"
    for n in ("", ".1", ".2", ".3"):
        (tmp_path / f"r.jsonl{n}").write_text(f"old{n}\n")
        (tmp_path / f"r.jsonl{n}").chmod(0o640)
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(orjson.dumps(_sample(seq=1, mono_ns=10**9)) + b"\n")
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
                "-o", "sinks.jsonl.rotate_names=numbered")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.jsonl.3").read_text() == "old.3\n"
    assert len((tmp_path / "r.jsonl.4").read_bytes().splitlines()) == 1


def test_numbered_names_that_are_not_its_numbers_are_left_alone(tmp_path):
    """Names tcpstates never makes (a superscript or Arabic-Indic digit, a
    leading zero) are neither the newest file nor a crash: "r.jsonl.²" made
    int() fail, so the sink wrote nothing at all."""
    out = tmp_path / "r.jsonl"
    for odd in ("r.jsonl.²", "r.jsonl.٩", "r.jsonl.09", "r.jsonl.-1", "r.jsonl.x"):
        (tmp_path / odd).write_text("theirs\n")
    r = _numbered_run(tmp_path, out, 1, 100)
    assert r.returncode == 0 and b"failed" not in r.stderr, r.stderr
    assert b"written: jsonl 100;" in r.stderr, r.stderr
    assert (tmp_path / "r.jsonl.1").exists()              # from 1: none of those is a number of ours
    for odd in ("r.jsonl.²", "r.jsonl.٩", "r.jsonl.09", "r.jsonl.-1", "r.jsonl.x"):
        assert (tmp_path / odd).read_text() == "theirs\n"


def test_numbered_restart_finds_numbers_past_18_digits(tmp_path):
    """Every number rotation makes is found again at a restart: after
    r.jsonl.999999999999999999 it made 19-digit names, which the restart
    ignored (it went back to r.jsonl.1 and never deleted them)."""
    out = tmp_path / "r.jsonl"
    (tmp_path / "r.jsonl.999999999999999999").write_text("")
    assert _numbered_run(tmp_path, out, 1, 300).returncode == 0
    first = sorted(int(p.name.split(".")[-1]) for p in tmp_path.glob("r.jsonl.*"))
    assert len(first) == 3 and first[0] >= 10**18          # the live one + keep = 2
    r = _numbered_run(tmp_path, out, 301, 10)               # fits: no rotation
    assert r.returncode == 0, r.stderr
    after = sorted(int(p.name.split(".")[-1]) for p in tmp_path.glob("r.jsonl.*"))
    assert after == first, after                           # no r.jsonl.1: appended to the newest
    seqs = [x["seq"] for x in _records(tmp_path / f"r.jsonl.{first[-1]}")]
    assert seqs[-11:] == [300] + list(range(1, 11)), seqs[-12:]


def test_numbered_refusal_names_the_numbered_file(tmp_path):
    """The live file is PATH.N: a refusal to open it names PATH.N, not PATH."""
    from tracer import one_line_error
    out = tmp_path / "r.jsonl"
    (tmp_path / "r.jsonl.7").symlink_to(tmp_path / "elsewhere")
    err = one_line_error(_numbered_run(tmp_path, out, 1, 10), "symbolic link")
    assert f"{out}.7:" in err, err


def test_numbered_rotation_needs_a_file(tmp_path):
    from tracer import run_cli
    r = run_cli("--replay", os.devnull, "--sink", "jsonl", "-o", "sinks.jsonl.rotate_names=numbered")
    assert r.returncode == 2 and b"numbered needs a file path" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_size_rotation(tmp_path):
    from tracer import run_cli
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(_sample(seq=i + 1, mono_ns=10**9 + i)) + b"\n"
                               for i in range(300)))
    out = tmp_path / "r.jsonl"
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
                "-o", "sinks.jsonl.max_bytes=20000", "-o", "sinks.jsonl.keep=50")
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("r.jsonl*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    assert len(files) > 2
    assert all(f.stat().st_size <= 20000 for f in files)
    recs = _records(*files)
    assert [x["seq"] for x in recs] == list(range(1, 301))
