"""Standard descriptors that were closed when we started (`>&-`, `2>&-`).

A closed fd 0/1/2 is taken by the next file we open — a BPF map, the journal
socket, an output file — and a later write to "stdout" would land there.
`guard()` puts /dev/null on each closed one first and remembers which were
closed, so a sink writing to stdout fails cleanly ("standard output is
closed") instead of writing into something else.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import select
import socket
import stat
import time
from typing import Callable, TextIO

_closed: set[int] = set()


def guard() -> None:
    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            _closed.add(fd)
    for fd in sorted(_closed):
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)


def was_closed(fd: int) -> bool:
    return fd in _closed


def settle() -> None:
    """At exit: flush sys.stdout and sys.stderr now, and where that fails (a
    full disk, a closed pipe) put /dev/null under the stream. Python flushes
    them once more at shutdown, and a failure there replaces the exit status
    with 120 (the status that says how the run went would be lost); what
    could not be written was already counted or said."""
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
                os.close(null)
            except (OSError, ValueError, AttributeError):
                pass


def write_bounded(stream: TextIO | None, text: str, timeout: float) -> bool:
    """Write `text` to `stream` (stderr), waiting at most `timeout` seconds in
    all for a consumer that takes nothing: a full pipe nobody reads, a stopped
    terminal (Ctrl-S), a swamped journald behind systemd's stderr socket.
    True when all of it went out. A plain blocking write there could never be
    interrupted: SIGTERM's handler runs, and the write goes on waiting.

    Pipes, FIFOs and terminals are written through a private non-blocking open
    file description (/proc/self/fd/N: the shell's or systemd's copy keeps its
    flags), sockets with MSG_DONTWAIT; files and other devices cannot block
    for long and are written as usual. Streams without a descriptor (a test's
    StringIO) are written as usual."""
    if stream is None:
        return False
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        stream.write(text)
        stream.flush()
        return True
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))):
        stream.write(text)
        stream.flush()
        return True
    stream.flush()   # nothing is buffered (every writer flushes), but keep the order if so
    data = memoryview(text.encode(getattr(stream, "encoding", None) or "utf-8", "backslashreplace"))
    deadline = time.monotonic() + timeout
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            return _send_all(lambda v: sock.send(v, socket.MSG_DONTWAIT), sock.fileno(), data, deadline)
        finally:
            sock.close()
    try:
        private = _private_fd(fd, os.fstat(fd))
    except OSError:
        return False         # a FIFO whose reader is gone (ENXIO): nothing can be said there
    if private is None:
        # no /proc: a blocking write once poll says there is room, in pieces
        # no larger than PIPE_BUF (a pipe then takes each one whole)
        return _send_all(lambda v: _write_when_ready(fd, v[:select.PIPE_BUF], deadline), fd, data, deadline)
    return _send_all(lambda v: os.write(private, v), private, data, deadline)


# (fd, st_dev, st_ino) -> our private non-blocking descriptor of that pipe or terminal
_private: dict[tuple[int, int, int], int] = {}


def _private_fd(fd: int, st: os.stat_result) -> int | None:
    """A private non-blocking open file description of the pipe, FIFO or
    terminal on `fd`, opened once and kept: after --user, a non-dumpable
    process may no longer open its own /proc/self/fd. None without /proc;
    OSError (ENXIO) for a FIFO nobody reads."""
    key = (fd, st.st_dev, st.st_ino)
    if key not in _private:
        try:
            _private[key] = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                                    | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise
            return None
    return _private[key]


def prepare_stderr() -> None:
    """Open stderr's private descriptor now, while we may (before --user drops root)."""
    import sys
    try:
        fd = sys.stderr.fileno()
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode) or (stat.S_ISCHR(st.st_mode) and os.isatty(fd)):
            _private_fd(fd, st)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass


def _write_when_ready(fd: int, view: memoryview, deadline: float) -> int:
    if not _ready(fd, deadline):
        raise BlockingIOError(errno.EAGAIN, "not writable")
    return os.write(fd, view)


def _ready(fd: int, deadline: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        return bool(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
    except InterruptedError:
        return False


def _send_all(send: Callable[[memoryview], int], fd: int, data: memoryview, deadline: float) -> bool:
    try:
        while data:
            try:
                data = data[send(data):]
            except BlockingIOError:
                if time.monotonic() >= deadline or not _ready(fd, deadline):
                    return False
                # "writable" yet too little room for what is left (a terminal
                # with a few bytes free): let the reader take some first
                time.sleep(0.002)
    except OSError:
        return False     # the reader is gone (EPIPE), or the device failed: nothing to tell
    return True
