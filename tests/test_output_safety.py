"""Output files as root (review2 findings 2, 3, 9): rotation works relative to
the directory opened at the start, never the path string again; outputs in a
directory another user can change are refused (FIFOs of other users: test_fault_matrix.py);
rotation after logrotate's `mv` (its SIGHUP not yet here) loses nothing.
Real CLI in a subprocess, real files, the attacker a real uid-65534 process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest
from replayrec import replay_record as _record, wait_for as _wait_for, line_count as _lines
from tracer import Tracer, one_line_error, run_cli

NOBODY = 65534
ONE_LINE = len(b"\n")








def _as_nobody(*cmd: str) -> None:
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                   check=True, timeout=10)




@pytest.fixture
def open_tmp():
    """A directory uid 65534 can reach (pytest's tmp_path lies under a 0700 directory)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="tcpstates-outsafety-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _feeding(tmp_path: Path, out: Path, *opts: str) -> tuple[Tracer, int]:
    r_in, w_in = os.pipe()
    t = Tracer(["--replay", "-", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}", *opts],
               workdir=tmp_path / "t", stdin=r_in)
    os.close(r_in)
    return t, w_in


@pytest.mark.root
def test_rotation_never_follows_a_directory_swapped_for_a_link_after_the_start(open_tmp):
    tmp_path = open_tmp
    atk = tmp_path / "atk"                      # the attacker owns this directory...
    atk.mkdir()
    os.chown(atk, NOBODY, NOBODY)
    logs = atk / "logs"                         # ...but not the output directory in it
    logs.mkdir()
    victim = tmp_path / "victim"                # root-only
    victim.mkdir(mode=0o700)
    precious = {n: f"precious {n}\n".encode() for n in ("o.jsonl", "o.jsonl.1", "o.jsonl.2")}
    for n, data in precious.items():
        (victim / n).write_bytes(data)
    size = len(_record(1))
    t, w_in = _feeding(tmp_path, logs / "o.jsonl", "-o", f"sinks.jsonl.max_bytes={size * 3}",
                       "-o", "sinks.jsonl.keep=2")
    os.write(w_in, b"".join(_record(i) for i in range(1, 3)))
    _wait_for(lambda: _lines(logs / "o.jsonl") == 2, "first records")
    # the attacker (a real uid-65534 process) swaps the directory for a link to the victim
    _as_nobody("mv", str(logs), str(atk / "moved"))
    _as_nobody("ln", "-s", str(victim), str(logs))
    os.write(w_in, b"".join(_record(i) for i in range(3, 13)))   # several rotations
    os.close(w_in)
    rc = t.proc.wait(20)
    err = t.stderr_path.read_text()
    assert rc == 0, err
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == precious   # untouched
    moved = atk / "moved"
    assert sorted(p.name for p in moved.iterdir()) == ["o.jsonl", "o.jsonl.1", "o.jsonl.2"]
    assert "written: jsonl 12" in err.splitlines()[-1] and "not written" not in err, err


@pytest.mark.root
@pytest.mark.parametrize("owner,mode", [(NOBODY, 0o755), (0, 0o777), (0, 0o775)])
def test_output_in_a_directory_others_can_change_is_refused(tmp_path, owner, mode):
    tmp_path.chmod(0o755)
    d = tmp_path / "d"
    d.mkdir()
    os.chown(d, owner, owner)
    d.chmod(mode)
    r = run_cli("--replay", os.devnull, "--sink", "jsonl", "-o", f"sinks.jsonl.path={d / 'o.jsonl'}")
    one_line_error(r, "into a directory another user can change")
    assert not (d / "o.jsonl").exists() or (d / "o.jsonl").stat().st_size == 0


@pytest.mark.root
def test_root_file_in_a_sticky_directory_is_accepted(tmp_path):
    tmp_path.chmod(0o755)
    d = tmp_path / "sticky"
    d.mkdir()
    d.chmod(0o1777)
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(_record(1))
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={d / 'o.jsonl'}")
    assert r.returncode == 0, r.stderr
    assert _lines(d / "o.jsonl") == 1


def test_rotation_after_the_file_was_moved_away_starts_a_new_file_and_loses_nothing(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    out = d / "o.jsonl"
    size = len(_record(1))
    t, w_in = _feeding(tmp_path, out, "-o", f"sinks.jsonl.max_bytes={size * 4}", "-o", "sinks.jsonl.keep=3")
    os.write(w_in, b"".join(_record(i) for i in range(1, 4)))
    _wait_for(lambda: _lines(out) == 3, "first records")
    out.rename(d / "o.jsonl.r0")                  # logrotate's mv; its SIGHUP has not come yet
    os.write(w_in, b"".join(_record(i) for i in range(4, 10)))   # passes max_bytes: a rotation
    os.close(w_in)
    rc = t.proc.wait(20)
    err = t.stderr_path.read_text()
    assert rc == 0, err
    assert "not written" not in err and "FileNotFoundError" not in err, err
    assert "written: jsonl 9" in err.splitlines()[-1], err
    assert _lines(d / "o.jsonl.r0") == 3          # the moved file is left alone
    seqs = sorted(orjson.loads(line)["seq"] for p in d.iterdir() if p.name != "o.jsonl.r0"
                  for line in p.read_bytes().splitlines())
    assert seqs == list(range(4, 10))


def test_a_file_another_process_writes_is_refused(tmp_path):
    """Two tracers on one path interleave their rotations and delete each
    other's files: the output file is locked (flock) while written, and a
    second writer gets one line and exit 2, the file untouched."""
    import fcntl
    out = tmp_path / "e.jsonl"
    out.write_bytes(b"theirs\n")
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(_record(seq=1))
    with open(out, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)          # what a running tcpstates holds
        r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
        one_line_error(r, "another process is writing it")
    assert out.read_bytes() == b"theirs\n"
    r = run_cli("--replay", str(trace), "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
    assert r.returncode == 0, r.stderr                # free again once released
    assert out.read_bytes().count(b"\n") == 2
