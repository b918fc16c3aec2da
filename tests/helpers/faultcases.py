"""The building blocks of tests/test_fault_matrix.py: destinations in a faulty
state for an output sink, and the tracer blocked in one state for SIGTERM and SIGINT.

An output destination (`Dest`) says how the tracer's command line and stdout
look, what to do while the run goes on, and what the destination holds
afterwards (the bytes a reader would get), so a test can hold the summary's
"written" against it. A blocking state (`Blocked`) says how to start the
tracer and how to know, from the kernel or the tracer's own output, that it is
in that state — never a bare sleep.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import subprocess
import termios
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from pipes import fill, full_pipe

F_GETPIPE_SZ = 1032
CLOSED = -100            # stdout closed before exec (a shell's `>&-`)
ROOM = 8192              # bytes left free in a "full" pipe: a few rows fit, then it stalls
NOBODY = 65534


def _nothing() -> bytes:
    return b""


@dataclasses.dataclass
class Dest:
    """One output destination in a fault state."""
    args: list[str]                                   # -o values pointing the sink there
    stdout: int = subprocess.DEVNULL                  # the tracer's stdout (an fd, DEVNULL or CLOSED)
    held: Callable[[], bytes] = _nothing              # after the run: what the destination holds
    during: Callable[[Path], None] = lambda err: None  # while the run goes on (err: its stderr file)


def pipe_bytes_queued(fd: int) -> int:
    n = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, n)
    return int.from_bytes(n, "little")


def _drain_after_exit(fd: int, skip: int) -> Callable[[], bytes]:
    """What a pipe's reader gets once the tracer has gone, past our own `skip`
    filler bytes."""
    def held() -> bytes:
        os.set_blocking(fd, True)
        got = bytearray()
        while chunk := os.read(fd, 65536):
            got += chunk
        return bytes(got[skip:])
    return held


# -- destinations ---------------------------------------------------------------------------------
def path_to(target: Path | str) -> Callable[[Path, ExitStack, str], Dest]:
    """The sink writes to `target` (its path option); holds what the file holds."""
    def make(tmp: Path, stack: ExitStack, sink: str) -> Dest:
        p = Path(str(target).replace("TMP", str(tmp)))
        return Dest([f"sinks.{sink}.path={p}"], held=lambda: p.read_bytes() if p.is_file() else b"")
    return make


def stdout_to_dev_full(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    return Dest([], stdout=os.open("/dev/full", os.O_WRONLY))     # the test closes it after the start


def stdout_closed(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    return Dest([], stdout=CLOSED)


def stdout_full_pipe(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    """stdout a pipe whose reader stopped: ROOM bytes free, then nothing."""
    r, w, filled = full_pipe(room=ROOM)
    stack.callback(os.close, r)
    return Dest([f"sinks.{sink}.stall_timeout=0.3"], stdout=w, held=_drain_after_exit(r, filled))


def stdout_reader_gone(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    """stdout a pipe whose reader left before the first write (`| head -0`)."""
    r, w = os.pipe()
    os.close(r)
    return Dest([], stdout=w)


def fifo_reader_stopped(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    """The sink's path a FIFO whose reader opened it and then stopped reading."""
    fifo = tmp / "out.fifo"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    stack.callback(os.close, r)
    w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    filled = fill(w)
    os.close(w)
    os.read(r, ROOM)
    return Dest([f"sinks.{sink}.path={fifo}", f"sinks.{sink}.stall_timeout=0.3"],
                held=_drain_after_exit(r, filled - ROOM))


def fifo_reader_comes_late(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    """The sink's path a FIFO nobody reads yet: the tracer says it waits; the
    reader comes once it said so, and reads to the end."""
    fifo = tmp / "out.fifo"
    os.mkfifo(fifo)
    got = bytearray()
    done = threading.Event()

    def read_all() -> None:
        with open(fifo, "rb") as f:
            got.extend(f.read())
        done.set()

    def during(err: Path) -> None:
        from replayrec import wait_for
        wait_for(lambda: "waiting for a reader" in err.read_text(), "no 'waiting for a reader' notice")
        threading.Thread(target=read_all, daemon=True).start()

    def held() -> bytes:
        assert done.wait(10), "the FIFO's reader never saw the end"
        return bytes(got)
    return Dest([f"sinks.{sink}.path={fifo}"], held=held, during=during)


def fifo_of_another_user(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    """A FIFO owned by someone else, with its owner reading: root must not hand
    them the events."""
    fifo = tmp / "theirs.fifo"
    os.mkfifo(fifo)
    os.chown(fifo, NOBODY, NOBODY)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    stack.callback(os.close, r)

    def held() -> bytes:
        try:
            return os.read(r, 65536)
        except BlockingIOError:
            return b""
    return Dest([f"sinks.{sink}.path={fifo}"], held=held)


def file_owned_by_nobody(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    p = tmp / "theirs.out"
    p.write_bytes(b"")
    os.chown(p, NOBODY, NOBODY)
    p.chmod(0o644)
    return Dest([f"sinks.{sink}.path={p}"], held=p.read_bytes)


def file_mode_0666(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    p = tmp / "open.out"
    p.write_bytes(b"")
    p.chmod(0o666)
    return Dest([f"sinks.{sink}.path={p}"], held=p.read_bytes)


def _ro_mount(tmp: Path, stack: ExitStack, with_file: bool) -> Path:
    d = tmp / "ro"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], check=True)
    stack.callback(subprocess.run, ["umount", str(d)], check=False)
    if with_file:
        (d / "e.out").write_bytes(b"")
    subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
    return d / "e.out"


def read_only_mount_new_file(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    p = _ro_mount(tmp, stack, with_file=False)
    return Dest([f"sinks.{sink}.path={p}"], held=lambda: p.read_bytes() if p.exists() else b"")


def read_only_mount_existing_file(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    p = _ro_mount(tmp, stack, with_file=True)
    return Dest([f"sinks.{sink}.path={p}"], held=p.read_bytes)


def symlinked_parent_planted(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    """The parent directory a link another user owns, in a sticky world-writable
    directory (/tmp): anyone could have planted it."""
    real = tmp / "real"
    real.mkdir()
    link = Path("/tmp") / f"tcpstates-matrix-link-{os.getpid()}"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    stack.callback(link.unlink)
    p = real / "e.out"
    return Dest([f"sinks.{sink}.path={link / 'e.out'}"], held=lambda: p.read_bytes() if p.exists() else b"")


def symlinked_parent_of_root(tmp: Path, stack: ExitStack, sink: str) -> Dest:
    """The parent directory root's own link in a root-only directory: followed."""
    real = tmp / "real"
    real.mkdir()
    (tmp / "link").symlink_to(real)
    p = real / "e.out"
    return Dest([f"sinks.{sink}.path={tmp / 'link' / 'e.out'}"],
                held=lambda: p.read_bytes() if p.exists() else b"")


# -- blocking states for SIGTERM and SIGINT ---------------------------------------------------------
@dataclasses.dataclass
class Blocked:
    """The tracer started in a state where it blocks; `ready(pid)` says it is there."""
    args: list[str]
    ready: Callable[[int], bool]
    stdout: int = subprocess.DEVNULL
    stdin: int = subprocess.DEVNULL
    stderr: int | None = None                 # None: a file the test reads
    stderr_text: Callable[[], str] | None = None   # how to read stderr when it is a pipe
    at_stop: Callable[[], None] = lambda: None     # right after the signal is sent
    wrap: Callable[[list[str]], list[str]] | None = None
    tracer_pid: Callable[[int], int] = lambda pid: pid
    summary_has: str = ""                     # what the summary must also say
    never_says: str = "Traceback"             # what stderr must not say
    status: int = 0                           # the exit status (1: every sink failed)


def wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def holds_open(pid: int, path: Path | str) -> bool:
    """`pid` has `path` open (the kernel's fd table, not what the tracer says)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


def has_read(pid: int, nbytes: int) -> bool:
    """`pid` has read more than `nbytes` (its rchar): it is busy reading its input."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1]) > nbytes
    except OSError:
        pass
    return False


def waiting_in_poll(pid: int) -> bool:
    return wchan(pid).startswith(("poll_schedule_timeout", "do_select", "do_sys_poll"))


def replay_of_fifo_without_writer(tmp: Path, stack: ExitStack) -> Blocked:
    fifo = tmp / "in.fifo"
    os.mkfifo(fifo)
    return Blocked(["--replay", str(fifo), "-s"],
                   ready=lambda pid: holds_open(pid, fifo) and waiting_in_poll(pid))


def replay_of(device: str) -> Callable[[Path, ExitStack], Blocked]:
    def make(tmp: Path, stack: ExitStack) -> Blocked:
        # past the imports' few MB: it is in the replay loop
        return Blocked(["--replay", device, "-s"],
                       ready=lambda pid: holds_open(pid, device) and has_read(pid, 64 << 20))
    return make


def replay_of_huge_corrupt_file(tmp: Path, stack: ExitStack) -> Blocked:
    big = tmp / "huge.jsonl"
    with open(big, "wb") as f:
        f.truncate(64 << 30)          # 64 GiB of NULs (sparse): minutes to read through
    return Blocked(["--replay", str(big), "-s"],
                   ready=lambda pid: holds_open(pid, big) and has_read(pid, 64 << 20))


def _full_pipe_filled_again(r: int) -> Callable[[int], bool]:
    """The tracer filled the room it had (less than a row is left: rows are
    never cut) and now waits for the pipe to take more."""
    size = fcntl.fcntl(r, F_GETPIPE_SZ)
    return lambda pid: pipe_bytes_queued(r) > size - 256 and waiting_in_poll(pid)


def stdout_full_pipe_nobody_reads(tmp: Path, stack: ExitStack) -> Blocked:
    """The table into a pipe that takes ROOM bytes more, then nothing; its
    stall_timeout far away: the tracer waits on the pipe when the stop comes."""
    from replayrec import replay_record
    trace = tmp / "in.jsonl"
    trace.write_bytes(b"".join(replay_record(i) for i in range(1, 2001)))
    r, w, _ = full_pipe(room=ROOM)
    stack.callback(os.close, r)
    return Blocked(["--replay", str(trace), "-o", "sinks.text.stall_timeout=3600"], stdout=w,
                   ready=_full_pipe_filled_again(r), summary_has="not written: text")


def fifo_output_without_reader(tmp: Path, stack: ExitStack) -> Blocked:
    fifo = tmp / "out.fifo"
    os.mkfifo(fifo)
    err = tmp / "stderr"
    return Blocked(["--replay", os.devnull, "--sink", "jsonl", "-o", f"sinks.jsonl.path={fifo}"],
                   ready=lambda pid: "waiting for a reader" in err.read_text())


def stderr_full_pipe(tmp: Path, stack: ExitStack) -> Blocked:
    """stderr a pipe nobody reads, the tracer waiting on its replay FIFO. Its
    reader comes back at the stop (as a paused consumer would): the summary,
    said once stderr has room, must reach it."""
    fifo = tmp / "in.fifo"
    os.mkfifo(fifo)
    r, w, filled = full_pipe()
    stack.callback(os.close, r)
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 65536):
            got.extend(chunk)
    reader = threading.Thread(target=drain, daemon=True)

    def text() -> str:
        reader.join(10)
        return bytes(got[filled:]).decode(errors="replace")
    return Blocked(["--replay", str(fifo), "-s"], stderr=w, stderr_text=text, at_stop=reader.start,
                   ready=lambda pid: holds_open(pid, fifo) and waiting_in_poll(pid))


def forward_receiver_that_never_reads(*auth: str) -> Callable[[Path, ExitStack], Blocked]:
    """A receiver that accepts and then does nothing (no HELO, no ack, no reads)."""
    def make(tmp: Path, stack: ExitStack) -> Blocked:
        from fbcase import trace
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        stack.callback(listener.close)
        port = listener.getsockname()[1]
        conns: list[socket.socket] = []
        stack.callback(lambda: [c.close() for c in conns])

        def ready(pid: int) -> bool:
            # the sink connected (accepted here): from now on it waits on us
            listener.settimeout(0.05)
            try:
                conns.append(listener.accept()[0])
            except TimeoutError:
                pass
            return bool(conns)
        # replayed from a pipe kept open until the end: the run is live, not in its exit flush
        r, w = os.pipe()
        os.write(w, trace(tmp / "t.jsonl", 50).read_bytes())
        stack.callback(os.close, w)
        return Blocked(["--replay", "-", "--sink", "forward",
                        "-o", f"sinks.forward.address=127.0.0.1:{port}", *auth], stdin=r, ready=ready,
                       summary_has="not written: forward 50",
                       status=1,        # its only sink delivered nothing: every sink failed
                       # the sink's own cut at the stop is not the receiver closing
                       never_says="receiver closed the connection")
    return make


def journald_stopped(tmp: Path, stack: ExitStack) -> Blocked:
    """Blocked in libsystemd's send to a stopped journald (stall_timeout far away)."""
    from fbcase import trace
    from journald import stopped_journald
    j = stack.enter_context(stopped_journald(tmp / "journald"))
    return Blocked(["--replay", str(trace(tmp / "t.jsonl", 2000)), "--sink", "journal",
                    "-o", "sinks.journal.stall_timeout=3600"], wrap=j.argv,
                   tracer_pid=descendant_python, summary_has="not written: journal",
                   ready=lambda pid: wchan(pid) == "unix_wait_for_peer")


def descendant_python(pid: int) -> int:
    """nsenter execs or forks the tracer: the python process under `pid` (or it)."""
    import time
    for _ in range(200):
        if "python" in Path(f"/proc/{pid}/comm").read_text():
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            pid = int(children[0])
            continue
        time.sleep(0.01)
    raise AssertionError("no python process found under nsenter")
