"""--user and the privileged opener: after root is dropped, logrotate's mv +
SIGHUP and max_bytes rotation still work in a directory only root can write,
because a small process that stayed root (tcpstates.opener) reopens and
rotates the outputs fixed at the start — and nothing else. The real CLI in a
subprocess as root, replaying records from a pipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from replayrec import line_count, replay_record, wait_for
from summary import parse_summary
from tracer import tcpstates_argv

pytestmark = pytest.mark.root

NOBODY = 65534


def _root_only_dir(tmp_path: Path) -> Path:
    """/var/log/x as a package would make it: root's, 0755."""
    tmp_path.chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    os.chown(logs, 0, 0)
    return logs


def _records(first: int, last: int) -> bytes:
    return b"".join(replay_record(i) for i in range(first, last + 1))


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])


def _dead(pid: int) -> bool:
    """Exited (a zombie not reaped yet by whoever inherited it counts: it runs
    nothing and holds no descriptor)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _opener_of(pid: int) -> int:
    kids = [k for k in _children(pid) if Path(f"/proc/{k}/comm").read_text().strip() == "tcpstates-open"]
    assert len(kids) == 1, kids
    return kids[0]


class Run:
    """The CLI replaying what the test writes to its stdin."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(tcpstates_argv("--replay", "-", *args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        _out, err = self.proc.communicate(timeout=timeout)   # closes stdin: the end of the replay
        return self.proc.returncode, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def test_sighup_after_mv_reopens_through_the_opener_and_loses_nothing(tmp_path):
    logs = _root_only_dir(tmp_path)
    out, table = logs / "e.jsonl", logs / "t.txt"
    run = Run("--user", "nobody", "--sink", "jsonl", "--sink", "text", "-o", f"sinks.jsonl.path={out}",
              "-o", f"sinks.text.path={table}", "-o", "sinks.text.header=false")
    try:
        run.feed(_records(1, 5))
        wait_for(lambda: line_count(out) == 5 and line_count(table) == 5, "the first 5 events written")
        pid = run.proc.pid
        opener = _opener_of(pid)
        assert (_uid(pid), _uid(opener)) == (NOBODY, 0)
        # it holds nothing of the tracer's (BPF objects, stdin, stdout): /dev/null on
        # 0-2, its socket, and the outputs' directory it rotates in
        held = {os.readlink(f"/proc/{opener}/fd/{fd}") for fd in os.listdir(f"/proc/{opener}/fd")}
        assert {h for h in held if not h.startswith("socket:")} == {"/dev/null", str(logs)}, held
        assert len(held) == 3, held
        status = Path(f"/proc/{opener}/status").read_text()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            assert ignored & (1 << (sig - 1)), sig          # the tracer's signals, not its
        before = out.stat()
        # nobody could not have done this itself
        assert before.st_uid == 0 and before.st_mode & 0o777 == 0o640
        os.rename(out, logs / "e.jsonl.1")
        os.rename(table, logs / "t.txt.1")
        os.kill(pid, signal.SIGHUP)
        # the reopen made the new files: the readiness signal for the next events
        wait_for(lambda: out.exists() and table.exists(), "the files reopened after SIGHUP")
        run.feed(_records(6, 12))
        wait_for(lambda: line_count(out) == 7 and line_count(table) == 7, "the later 7 events written")
        rc, err = run.finish()
    finally:
        run.kill()
    assert rc == 0, err
    assert "failed" not in err, err
    after = out.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert table.stat().st_uid == 0
    old = [orjson.loads(line)["seq"] for line in (logs / "e.jsonl.1").read_bytes().splitlines()]
    new = [orjson.loads(line)["seq"] for line in out.read_bytes().splitlines()]
    assert (old, new) == (list(range(1, 6)), list(range(6, 13)))       # exactly the later ones here
    s = parse_summary(err)
    assert s.written == {"jsonl": 12, "text": 12} and s.not_written == {}
    assert line_count(logs / "t.txt.1") + line_count(table) == 12
    wait_for(lambda: _dead(opener), "the opener gone after the tracer's exit", timeout=5)


@pytest.mark.parametrize("names", ["shift", "numbered"])
def test_size_rotation_works_with_user(tmp_path, names):
    """Was refused at the start (after the drop every rotation failed with
    EACCES: 580 of 3,000 events written); the opener creates the new files."""
    logs = _root_only_dir(tmp_path)
    out = logs / "e.jsonl"
    limit = 20_000
    run = Run("--user", "nobody", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
              "-o", f"sinks.jsonl.max_bytes={limit}", "-o", "sinks.jsonl.keep=100",
              "-o", f"sinks.jsonl.rotate_names={names}")
    try:
        run.feed(_records(1, 600))
        rc, err = run.finish()
    finally:
        run.kill()
    assert rc == 0, err
    files = sorted(logs.iterdir())
    assert len(files) >= 5, files        # about 300 bytes a line: several rotations
    seqs = []
    for f in files:
        st = f.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o640), f
        assert 0 < st.st_size <= limit, f
        seqs += [orjson.loads(line)["seq"] for line in f.read_bytes().splitlines()]
    assert sorted(seqs) == list(range(1, 601))
    s = parse_summary(err)
    assert s.written == {"jsonl": 600} and s.not_written == {}


def test_the_opener_dies_with_a_killed_tracer(tmp_path):
    logs = _root_only_dir(tmp_path)
    out = logs / "e.jsonl"
    run = Run("--user", "nobody", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
    try:
        run.feed(_records(1, 1))
        wait_for(lambda: line_count(out) == 1, "the first event written")
        opener = _opener_of(run.proc.pid)
        run.proc.send_signal(signal.SIGKILL)    # no EOF handling, no clean-up: PR_SET_PDEATHSIG
        run.proc.wait()
        wait_for(lambda: _dead(opener), "the opener gone after SIGKILL of the tracer", timeout=5)
    finally:
        run.kill()


def test_no_opener_without_user(tmp_path):
    logs = _root_only_dir(tmp_path)
    out = logs / "e.jsonl"
    run = Run("--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
    try:
        run.feed(_records(1, 1))
        wait_for(lambda: line_count(out) == 1, "the first event written")
        assert _children(run.proc.pid) == []
        rc, err = run.finish()
    finally:
        run.kill()
    assert rc == 0, err


def test_sigterm_ends_the_tracer_while_the_opener_does_not_answer(tmp_path):
    """A stopped opener costs a bounded wait per request and never the stop:
    the reopen fails (counted), SIGTERM still ends the run with its summary,
    and once the opener answers again the retry reopens the file."""
    logs = _root_only_dir(tmp_path)
    out = logs / "e.jsonl"
    run = Run("--user", "nobody", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
    opener = 0
    try:
        run.feed(_records(1, 3))
        wait_for(lambda: line_count(out) == 3, "the first events written")
        opener = _opener_of(run.proc.pid)
        os.kill(opener, signal.SIGSTOP)
        os.rename(out, logs / "e.jsonl.1")
        os.kill(run.proc.pid, signal.SIGHUP)
        # the reopen waits for the stopped opener, gives up, and says so
        err_fd = run.proc.stderr
        assert err_fd is not None
        os.set_blocking(err_fd.fileno(), False)
        said = b""

        def warned() -> bool:
            nonlocal said
            said += err_fd.read() or b""
            return b"did not answer" in said
        wait_for(warned, "the unanswered reopen reported")
        assert b"OpenerError: the privileged opener did not answer within 1 s" in said
        run.feed(_records(4, 5))
        # their write retries the open, which gives up after 0.05 s (an answer
        # is overdue): nothing outside says when, so a bounded moment
        time.sleep(0.5)
        assert not out.exists()
        os.kill(opener, signal.SIGCONT)
        run.feed(_records(6, 8))
        wait_for(lambda: line_count(out) == 3, "the retried reopen wrote the later events")
        os.kill(opener, signal.SIGSTOP)           # stopped again while the tracer stops
        os.rename(out, logs / "e.jsonl.2")
        os.kill(run.proc.pid, signal.SIGHUP)
        time.sleep(0.3)                           # let the reopen start waiting (no signal for it)
        began = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        _o, rest = run.proc.communicate(timeout=10)
        rc = run.proc.returncode
        took = time.monotonic() - began
    finally:
        if opener:
            try:
                os.kill(opener, signal.SIGCONT)
            except ProcessLookupError:
                pass
        run.kill()
    err = (said + rest).decode()
    assert took < 2, (took, err)
    assert rc == 0, err
    s = parse_summary(err)
    held = sum(line_count(f) for f in logs.iterdir())
    assert s.written["jsonl"] == held
    assert s.written["jsonl"] + s.not_written.get("jsonl", 0) == 8
    assert s.not_written["jsonl"] == 2       # 4 and 5, written while the file could not be reopened
    assert "works again after losing 2 events" in err
    wait_for(lambda: _dead(opener), "the opener gone after the tracer's exit", timeout=5)


PROBE = r"""
import errno, json, os, socket, sys
from tcpstates import opener, outputs, security

path = sys.argv[1]
out = outputs.LineOutput(path)
out.open()
ino = os.fstat(out.fd).st_ino
assert outputs.start_opener()
o = outputs._opener
security.drop_privileges("nobody")
res = {"uid": os.getuid()}
try:
    os.open(path, os.O_WRONLY | os.O_APPEND)
    res["self"] = "opened"
except PermissionError:
    res["self"] = "EACCES"

def ask(call):
    try:
        fd, info = call()
    except opener.OpenerError as exc:
        return "refused: " + str(exc)
    st = os.fstat(fd)
    os.close(fd)
    return {"uid": st.st_uid, "ino": st.st_ino, **info}

res["open0"] = ask(lambda: o.open(0))
res["open1"] = ask(lambda: o.open(1))
res["open_max"] = ask(lambda: o.open(2**32 - 1))
res["rotate0"] = ask(lambda: o.rotate(0, 0, 0))    # no max_bytes: no rotation
for name, raw in (("path", path.encode()), ("short", b"x"), ("long", b"\0" * 4096),
                  ("op", opener.REQUEST.pack(77, 9, 0, 0, 0))):
    o.sock.send(raw)
    res[name] = json.loads(o.sock.recv(4096))
res["open0_again"] = ask(lambda: o.open(0))
res["file_ino"] = ino
outputs.stop_opener()
print(json.dumps(res))
"""


def test_the_opener_acts_only_on_the_outputs_fixed_at_the_start(tmp_path):
    """The unprivileged side names an output by index: another index, a path,
    a malformed request or another operation is refused, and the opener goes
    on answering."""
    logs = _root_only_dir(tmp_path)
    path = logs / "e.jsonl"
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)
    assert res["uid"] == NOBODY and res["self"] == "EACCES"
    assert res["open0"]["uid"] == 0 and res["open0"]["ino"] == res["file_ino"]
    assert res["open1"] == "refused: no output #1 (there are 1)"
    assert res["open_max"] == f"refused: no output #{2**32 - 1} (there are 1)"
    assert res["rotate0"] == "refused: output #0 has no size rotation"
    for name in ("path", "short", "long"):
        assert res[name]["error"] == "malformed request", res[name]
    assert res["op"]["error"] == "unknown request 9"
    assert res["open0_again"]["ino"] == res["file_ino"]


THIEF = r"""
import ctypes, errno, json, os, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
res = {"uid": os.getuid()}
try:
    res["fds"] = sorted(os.listdir(f"/proc/{pid}/fd"))
except OSError as exc:
    res["fds"] = errno.errorcode[exc.errno]
pidfd = os.pidfd_open(pid)
taken = []
for n in range(64):
    fd = libc.syscall(438, pidfd, n, 0)          # pidfd_getfd: needs ptrace rights over it
    if fd >= 0:
        taken.append(n)
    elif ctypes.get_errno() != errno.EBADF:
        res["getfd"] = errno.errorcode[ctypes.get_errno()]
res["taken"] = taken
try:
    os.close(os.open(f"/proc/{pid}/mem", os.O_RDWR))
    res["mem"] = "opened"
except OSError as exc:
    res["mem"] = errno.errorcode[exc.errno]
PTRACE_ATTACH = 16
res["ptrace"] = "attached" if libc.ptrace(PTRACE_ATTACH, pid, 0, 0) == 0 else errno.errorcode[ctypes.get_errno()]
print(json.dumps(res))
"""


def test_another_process_of_the_user_cannot_take_over_the_tracer(tmp_path):
    """After the drop the tracer runs as nobody, like other daemons: it was made
    "dumpable" again, so any process of that user could ptrace it or take its
    descriptors (pidfd_getfd) — the root-owned outputs (forged lines), the BPF
    objects, and the opener's socket: 4 rotation requests emptied the file and
    all 3 rotated ones (29 events written, none left)."""
    logs = _root_only_dir(tmp_path)
    out = logs / "e.jsonl"
    run = Run("--user", "nobody", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
              "-o", "sinks.jsonl.max_bytes=2000", "-o", "sinks.jsonl.keep=9")
    try:
        run.feed(_records(1, 29))
        wait_for(lambda: sum(line_count(f) for f in logs.iterdir()) == 29, "29 events written")
        before = {f.name: f.read_bytes() for f in logs.iterdir()}
        assert len(before) >= 4, before
        # the system's Python: nobody cannot reach a venv in a clone under /root (0700)
        r = subprocess.run([os.path.realpath(sys.executable), "-c", THIEF, str(run.proc.pid)],
                           capture_output=True, timeout=30, cwd="/", user=NOBODY, group=NOBODY,
                           extra_groups=[])
        assert r.returncode == 0, r.stderr.decode()
        res = json.loads(r.stdout)
        assert res["uid"] == NOBODY
        assert res["taken"] == [] and res["getfd"] == "EPERM", res
        assert res["fds"] == "EACCES" and res["mem"] == "EACCES" and res["ptrace"] == "EPERM", res
        assert {f.name: f.read_bytes() for f in logs.iterdir()} == before
        rc, err = run.finish()
    finally:
        run.kill()
    assert rc == 0, err
    assert parse_summary(err).written == {"jsonl": 29}


def test_a_refusal_longer_than_a_reply_still_arrives_whole(tmp_path):
    """A refusal names the path, which may be longer than the 4096-byte reply
    (and than PATH_MAX: the walk is per component): the datagram was cut and
    the tracer reported 'JSONDecodeError: Unterminated string'. Now the text is
    shortened in the middle, and the opener and tracer stay in step."""
    logs = _root_only_dir(tmp_path)
    parts = [f"d{i:02d}" * 50 for i in range(28)]
    here = os.open(logs, os.O_RDONLY | os.O_DIRECTORY)
    for part in parts:
        os.mkdir(part, 0o755, dir_fd=here)
        there = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=here)
        os.close(here)
        here = there
    rel = "/".join(parts) + "/e.jsonl"
    assert len(rel) > 4096

    def lines() -> int:
        try:
            fd = os.open("e.jsonl", os.O_RDONLY, dir_fd=here)
        except FileNotFoundError:
            return 0
        try:
            return os.pread(fd, 1 << 20, 0).count(b"\n")
        finally:
            os.close(fd)
    proc = subprocess.Popen(tcpstates_argv("--replay", "-", "--user", "nobody", "--sink", "jsonl",
                                           "-o", f"sinks.jsonl.path={rel}"),
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=logs,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(_records(1, 3))
        proc.stdin.flush()
        wait_for(lambda: lines() == 3, "the first events written")
        os.rename("e.jsonl", "e.jsonl.1", src_dir_fd=here, dst_dir_fd=here)
        os.mkdir("e.jsonl", dir_fd=here)       # the reopen is refused: not a file
        os.kill(proc.pid, signal.SIGHUP)
        os.set_blocking(proc.stderr.fileno(), False)
        said = b""

        def refused() -> bool:
            nonlocal said
            said += proc.stderr.read() or b""
            return b"failed: " in said
        wait_for(refused, "the refused reopen reported")
        assert b"OpenerError: " in said and b"JSONDecodeError" not in said, said[-300:]
        os.rmdir("e.jsonl", dir_fd=here)
        proc.stdin.write(_records(4, 6))       # their write retries the open: it works again
        proc.stdin.flush()
        wait_for(lambda: lines() == 3, "the later events written after the retry")
        proc.stdin.close()
        proc.wait(timeout=30)
        os.set_blocking(proc.stderr.fileno(), True)
        err = (said + proc.stderr.read()).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(here)
    assert parse_summary(err).written == {"jsonl": 6}, err[-500:]


HIGH_FD = 1500


def test_the_opener_closes_descriptors_numbered_above_the_soft_limit(tmp_path):
    """It closed up to SC_OPEN_MAX (the soft RLIMIT_NOFILE): a descriptor
    inherited from a parent with a higher limit stayed open in the root process
    (here one of /etc/shadow, at 1500 under a limit of 1024)."""
    import resource
    logs = _root_only_dir(tmp_path)
    out = logs / "e.jsonl"
    secret = os.open("/etc/shadow", os.O_RDONLY)
    os.dup2(secret, HIGH_FD, inheritable=True)
    os.close(secret)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > HIGH_FD

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        proc = subprocess.Popen(tcpstates_argv("--replay", "-", "--user", "nobody", "--sink", "jsonl",
                                               "-o", f"sinks.jsonl.path={out}"),
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=[HIGH_FD],
                                preexec_fn=lower_limit)
    finally:
        os.close(HIGH_FD)
    try:
        assert proc.stdin is not None
        proc.stdin.write(_records(1, 1))
        proc.stdin.flush()
        wait_for(lambda: line_count(out) == 1, "the first event written")
        assert os.path.exists(f"/proc/{proc.pid}/fd/{HIGH_FD}")     # the tracer inherited it
        opener = _opener_of(proc.pid)
        held = {int(fd): os.readlink(f"/proc/{opener}/fd/{fd}") for fd in os.listdir(f"/proc/{opener}/fd")}
        assert HIGH_FD not in held, held
        assert len(held) == 5, held             # /dev/null on 0-2, the directory, the socket
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
