"""Exit status when sinks fail, through the real CLI in a subprocess (`--replay`
of a generated JSON Lines file): every sink failed → status 1 and one error
line; one of two failed → status 0 and "the other sinks continue"; a table
whose reader left (`| head -N`) → status 0 and quiet; a structured sink whose
reader left → status 1 (README "Exit status")."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from replayrec import replay_record
from tracer import tcpstates_argv

N = 50


def _trace(tmp_path: Path, n: int = N) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(replay_record(i) for i in range(1, n + 1)))
    return path


def _run(args: list[str], stdout_path: str) -> tuple[int, str]:
    with open(stdout_path, "wb") as out:
        r = subprocess.run(tcpstates_argv(*args), stdout=out, stderr=subprocess.PIPE, timeout=60)
    return r.returncode, r.stderr.decode()


@pytest.mark.parametrize("extra,failed", [
    ([], "text: its last write failed, 0 of 50 events written"),
    (["--sink", "jsonl"], "jsonl: its last write failed, 0 of 50 events written"),
    (["--sink", "csv", "--sink", "jsonl", "-o", "sinks.jsonl.path=/dev/full"],
     "csv: its last write failed, 0 of 50 events written; jsonl: its last write failed, 0 of 50 events written"),
    (["-o", "sinks.text.on_error=disable"], "text: disabled after an error, 0 of 0 events written"),
], ids=["text", "jsonl", "csv-and-jsonl", "text-disabled"])
def test_every_sink_failing_exits_1(tmp_path, extra, failed):
    rc, err = _run(["--replay", str(_trace(tmp_path)), *extra], "/dev/full")
    assert rc == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert lines[-2] == f"tcpstates: error: every sink failed ({failed}); see the warnings above", err
    assert "events seen" in lines[-1], err
    # no sink works: never "the other sinks continue" for the last one to fail
    assert "nothing is being written" in err or "nothing is written and the run stops" in err, err
    assert "add a sink that works" in err, err
    assert "the other sinks continue" not in lines[-3], err


def test_only_sink_failing_never_says_the_other_sinks_continue(tmp_path):
    rc, err = _run(["--replay", str(_trace(tmp_path))], "/dev/full")
    assert rc == 1, err
    assert "the other sinks continue" not in err, err
    assert "sink text (text) failed: OSError: [Errno 28] No space left on device; no other sink works, " \
           "so nothing is being written" in err, err
    assert "not written: text 50" in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("policy", ["ignore", "disable"])
def test_one_of_two_sinks_failing_exits_0(tmp_path, policy):
    out = tmp_path / "e.jsonl"
    rc, err = _run(["--replay", str(_trace(tmp_path)), "--sink", "text", "--sink", "jsonl",
                    "-o", f"sinks.jsonl.path={out}", "-o", f"sinks.text.on_error={policy}"], "/dev/full")
    assert rc == 0, err
    assert "sink text (text) failed" in err and "the other sinks continue" in err, err
    assert "every sink failed" not in err and "nothing is being written" not in err, err
    assert out.read_bytes().count(b"\n") == N
    assert "jsonl 50" in err.strip().splitlines()[-1], err


def test_empty_replay_with_working_sink_exits_0(tmp_path):
    # nothing to write is not a failure
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    rc, err = _run(["--replay", str(empty), "--sink", "jsonl"], str(tmp_path / "out"))
    assert rc == 0, err
    assert "every sink failed" not in err


def _into_head(args: list[str], lines: int = 2) -> tuple[int, bytes, bytes]:
    """`tcpstates ARGS | head -n LINES`, with the real head."""
    tracer = subprocess.Popen(tcpstates_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-n", str(lines)], stdin=tracer.stdout, capture_output=True, timeout=60)
    tracer.stdout.close()
    err = tracer.stderr.read()
    tracer.stderr.close()
    return tracer.wait(60), head.stdout, err


def test_table_into_head_stays_quiet_and_exits_0(tmp_path):
    # 20,000 rows are far more than a pipe holds: the run cannot end without
    # EPIPE, and a run that ended normally would print its summary
    rc, out, err = _into_head(["--replay", str(_trace(tmp_path, 20_000))])
    assert len(out.splitlines()) == 2 and out.startswith(b"SKADDR")
    assert rc == 0 and err == b"", err


def test_structured_sink_into_head_exits_1(tmp_path):
    rc, out, err = _into_head(["--replay", str(_trace(tmp_path, 20_000)), "--sink", "jsonl"])
    assert len(out.splitlines()) == 2
    text = err.decode()
    assert rc == 1, text
    assert "error: the reader of sink jsonl closed the pipe (EPIPE)" in text, text
    assert "every sink failed" not in text, text
