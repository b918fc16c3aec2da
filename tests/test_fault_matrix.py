"""Issue 14's fault matrix: every output fault and every blocking state, one
line per case. Extend it by adding a line (the destinations and states are in
tests/helpers/faultcases.py).

OUTPUT_FAULTS runs the real CLI with `--replay` of N generated events, the
sink under test pointed at a faulty destination and a second, healthy jsonl
sink ("keep") beside it. Whatever the fault: no traceback, no internal error,
one clear line naming the output, the documented exit status; the healthy
sink gets every event; and for every sink the summary's "written" is exactly
what its destination holds, "not written" the rest.

STOP_STATES starts the tracer blocked in one state, waits for a readiness
signal (the kernel's wchan or fd table, the pipe being full, the tracer's own
notice), sends SIGTERM (as systemd does) or SIGINT (to the whole process group,
as Ctrl-C does) and wants the exit, with the summary and the documented status
(0; 1 when the run's only sink delivered nothing), within 2 s.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from contextlib import ExitStack

import orjson
import pytest
from faultcases import (CLOSED, fifo_of_another_user, fifo_output_without_reader, fifo_reader_comes_late,
                        fifo_reader_stopped, file_mode_0666, file_owned_by_nobody, forward_receiver_that_never_reads,
                        journald_stopped, path_to, read_only_mount_existing_file, read_only_mount_new_file,
                        replay_of, replay_of_fifo_without_writer, replay_of_huge_corrupt_file, stderr_full_pipe,
                        stdout_closed, stdout_full_pipe, stdout_full_pipe_nobody_reads, stdout_reader_gone,
                        stdout_to_dev_full, symlinked_parent_of_root, symlinked_parent_planted)
from replayrec import replay_record, wait_for
from summary import parse_summary
from tracer import tcpstates_argv

N = 200


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the run must end in.

    all      every event reaches the destination, status 0, nothing on stderr but the summary
    lost     the sink fails (one line naming it and `needle`); status 0; the others go on
    stalled  as lost, but the destination took some rows first: those are "written"
    quiet    the table's reader left: status 0, nothing said, nothing counted as written
    ended    a structured sink's reader left: one error line, status 1, the summary
    refused  the run does not start: status 2, exactly one line with `needle`, nothing written
    """
    kind: str
    needle: str = ""


ALL, QUIET = Outcome("all"), Outcome("quiet")
ENOSPC = Outcome("lost", "No space left on device")
CLOSED_FD = Outcome("lost", "standard output is closed")
STALLED = Outcome("stalled", "stall_timeout")
EPIPE = Outcome("ended", "closed the pipe (EPIPE)")
NO_DIR = Outcome("refused", "No such file or directory")
EROFS = Outcome("refused", "Read-only file system")
PLANTED = Outcome("refused", "could be replaced by someone other than root")
OTHERS_FILE = Outcome("refused", "owner uid 65534")
OPEN_FILE = Outcome("refused", "mode 666")

# (name, sink under test, how to make its destination, outcome): one line per case
OUTPUT_FAULTS = [
    ("dev-full-path", "text", path_to("/dev/full"), ENOSPC),
    ("dev-full-path", "jsonl", path_to("/dev/full"), ENOSPC),
    ("dev-full-stdout", "text", stdout_to_dev_full, ENOSPC),
    ("dev-full-stdout", "jsonl", stdout_to_dev_full, ENOSPC),
    ("closed-stdout", "text", stdout_closed, CLOSED_FD),
    ("closed-stdout", "jsonl", stdout_closed, CLOSED_FD),
    ("full-pipe-stdout", "text", stdout_full_pipe, STALLED),
    ("full-pipe-stdout", "jsonl", stdout_full_pipe, STALLED),
    ("reader-gone-stdout", "text", stdout_reader_gone, QUIET),
    ("reader-gone-stdout", "jsonl", stdout_reader_gone, EPIPE),
    ("full-fifo-reader-stopped", "text", fifo_reader_stopped, STALLED),
    ("full-fifo-reader-stopped", "jsonl", fifo_reader_stopped, STALLED),
    ("fifo-reader-comes-late", "text", fifo_reader_comes_late, ALL),
    ("fifo-reader-comes-late", "jsonl", fifo_reader_comes_late, ALL),
    ("fifo-of-another-user", "jsonl", fifo_of_another_user, OTHERS_FILE),
    ("deleted-directory", "text", path_to("TMP/gone/e.out"), NO_DIR),
    ("deleted-directory", "jsonl", path_to("TMP/gone/e.out"), NO_DIR),
    ("read-only-mount-new-file", "text", read_only_mount_new_file, EROFS),
    ("read-only-mount-new-file", "jsonl", read_only_mount_new_file, EROFS),
    ("read-only-mount-existing-file", "jsonl", read_only_mount_existing_file, EROFS),
    ("symlinked-parent-planted", "text", symlinked_parent_planted, PLANTED),
    ("symlinked-parent-planted", "jsonl", symlinked_parent_planted, PLANTED),
    ("symlinked-parent-of-root", "jsonl", symlinked_parent_of_root, ALL),
    ("file-owned-by-another-user", "text", file_owned_by_nobody, OTHERS_FILE),
    ("file-owned-by-another-user", "jsonl", file_owned_by_nobody, OTHERS_FILE),
    ("file-mode-0666", "text", file_mode_0666, OPEN_FILE),
    ("file-mode-0666", "jsonl", file_mode_0666, OPEN_FILE),
]
# cases that need root (mounts, chown): skipped without it, as the `root` mark does
_ROOT_ONLY = {"fifo-of-another-user", "read-only-mount-new-file", "read-only-mount-existing-file",
              "symlinked-parent-planted", "file-owned-by-another-user", "file-mode-0666"}


def _events_in(sink: str, data: bytes) -> int:
    """The events a destination holds: whole lines only (a cut line is no event),
    the table's header is none."""
    lines = data.split(b"\n")[:-1]
    if sink == "jsonl":
        return sum(orjson.loads(line)["type"] == "state_change" for line in lines)
    return sum(not line.startswith(b"SKADDR") for line in lines)


def _params(table, root_only):
    for case in table:
        marks = [pytest.mark.root] if case[0] in root_only else []
        yield pytest.param(*case[1:], id=f"{case[0]}-{case[1]}" if len(case) > 3 else case[0], marks=marks)


@pytest.mark.parametrize("sink,make,outcome", list(_params(OUTPUT_FAULTS, _ROOT_ONLY)))
def test_output_fault(tmp_path, sink, make, outcome):
    tmp_path.chmod(0o755)      # a root-owned directory nobody else can change (as a real output's)
    trace = tmp_path / "in.jsonl"
    trace.write_bytes(b"".join(replay_record(i) for i in range(1, N + 1)))
    keep = tmp_path / "keep.jsonl"
    with ExitStack() as stack:
        dest = make(tmp_path, stack, sink)
        opts = [a for value in dest.args for a in ("-o", value)]
        argv = tcpstates_argv("--replay", str(trace), "--sink", sink, "--sink", "keep",
                              "-o", "sinks.keep.type=jsonl", "-o", f"sinks.keep.path={keep}", *opts)
        err_path = tmp_path / "stderr"
        stdout = subprocess.DEVNULL if dest.stdout == CLOSED else dest.stdout
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err,
                                    preexec_fn=(lambda: os.close(1)) if dest.stdout == CLOSED else None)
        if dest.stdout >= 0:
            os.close(dest.stdout)      # only the tracer holds the write end now
        try:
            dest.during(err_path)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        held = dest.held()
    err = err_path.read_text(errors="replace")
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.splitlines()
    if outcome.kind == "refused":
        assert rc == 2 and len(lines) == 1 and outcome.needle in lines[0], (rc, err)
        assert held == b"" and (not keep.exists() or keep.read_bytes() == b""), "nothing is written"
        return
    summary = parse_summary(err)
    said = lines[:-1]
    assert parse_summary(lines[-1]) == summary, err                # the summary is the last line
    # the healthy sink: every event, and its count is its file's
    assert _events_in("jsonl", keep.read_bytes()) == N and summary.written["keep"] == N, err
    assert "keep" not in summary.not_written, err
    # the sink under test: "written" is what its destination holds, "not written" the rest
    got = _events_in(sink, held)
    assert summary.written[sink] == got, (got, err)
    assert summary.written[sink] + summary.not_written.get(sink, 0) == N, err
    if outcome.kind == "all":
        assert rc == 0 and got == N, (rc, err)
        assert all("waiting for a reader" in line for line in said), err   # a notice, no warning
    elif outcome.kind == "quiet":
        assert rc == 0 and said == [] and got == 0, (rc, err)
    else:
        assert len(said) == 1, err                                     # one line, naming the output
        assert outcome.needle in said[0] and (f"sink {sink}" in said[0] or "standard output" in said[0]
                                               or "out.fifo" in said[0]), err
        assert rc == (1 if outcome.kind == "ended" else 0), (rc, err)
        if outcome.kind == "stalled":
            assert 0 < got < N, (got, "the pipe took some rows, then stopped")
        else:
            assert got == 0, got


# -- SIGTERM and SIGINT in each blocking state ----------------------------------------------------
# (name, setup, readiness is in the setup's `ready`): one line per state
STOP_STATES = [
    ("stdout-full-pipe-nobody-reads", stdout_full_pipe_nobody_reads),
    ("fifo-output-without-reader", fifo_output_without_reader),
    ("replay-fifo-without-writer", replay_of_fifo_without_writer),
    ("replay-dev-zero", replay_of("/dev/zero")),
    ("replay-dev-urandom", replay_of("/dev/urandom")),
    ("replay-huge-corrupt-file", replay_of_huge_corrupt_file),
    ("stderr-full-pipe", stderr_full_pipe),
    ("forward-receiver-never-reads", forward_receiver_that_never_reads()),
    ("forward-receiver-never-reads-shared-key", forward_receiver_that_never_reads("-o", "sinks.forward.shared_key=k")),
    ("journald-stopped", journald_stopped),
]
_STATES_ROOT_ONLY = {"journald-stopped"}


def _stop(proc: subprocess.Popen, sig: signal.Signals) -> None:
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)     # Ctrl-C: every process of the foreground group
    else:
        proc.send_signal(sig)        # systemd's stop: the main process


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("setup", list(_params(STOP_STATES, _STATES_ROOT_ONLY)))
def test_a_stop_signal_ends_the_run_within_two_seconds_with_its_summary(tmp_path, setup, sig):
    with ExitStack() as stack:
        state = setup(tmp_path, stack)
        err_path = tmp_path / "stderr"
        argv = tcpstates_argv(*state.args)
        with open(err_path, "wb") as err:
            # its own process group: SIGINT reaches it and its helpers, never pytest
            proc = subprocess.Popen(state.wrap(argv) if state.wrap else argv, stdin=state.stdin,
                                    stdout=state.stdout, process_group=0,
                                    stderr=err if state.stderr is None else state.stderr)
        for fd in (state.stdin, state.stdout, state.stderr):
            if fd is not None and fd >= 0:
                os.close(fd)             # only the tracer holds them now
        try:
            pid = state.tracer_pid(proc.pid)
            wait_for(lambda: proc.poll() is not None or state.ready(pid), "never reached the state")
            assert proc.poll() is None, f"exited before the stop: {err_path.read_text()}"
            start = time.monotonic()
            _stop(proc, sig)
            state.at_stop()
            rc = proc.wait(10)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = state.stderr_text() if state.stderr_text else err_path.read_text(errors="replace")
    assert took < 2.0, (took, text)
    assert rc == state.status and "Traceback" not in text and "internal error" not in text, (rc, text)
    assert "events seen" in text.splitlines()[-1] and state.summary_has in text.splitlines()[-1], text
    assert state.never_says not in text, text
    summary = parse_summary(text)
    assert summary.seen == summary.kept and summary.dropped == 0, text
