"""The journal sink's bounded sends (plugins/journal/bounded.py), on a real
blocking datagram socket whose reader takes nothing.

libsystemd's sd_journal_sendv is C: a sendmsg() that a signal interrupts
returns EINTR to it and it gives up. Python's own socket.send would retry
(PEP 475), so the stand-in here is libc's send() through ctypes, which
behaves as libsystemd does; the real journald cases are in
test_stop_and_faults.py."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import time

import pytest

from tcpstates.outputs import OutputStalled
from tcpstates.plugins.journal.bounded import PROBE_S, BoundedSends

_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def full_socket():
    """A connected datagram pair whose receive queue is full: the next send blocks."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    try:
        while True:
            a.send(b"x" * 512)
    except BlockingIOError:
        pass
    a.setblocking(True)
    yield a, b
    a.close()
    b.close()


def _sendv(sock: socket.socket):
    def sendv(*fields: str) -> None:
        data = "\n".join(fields).encode()
        if _libc.send(sock.fileno(), data, len(data), 0) < 0:
            err = ctypes.get_errno()
            raise InterruptedError(err, os.strerror(err)) if err == errno.EINTR else OSError(err, os.strerror(err))
    return sendv


def test_a_stalled_journal_gives_up_after_stall_timeout_then_probes_briefly(full_socket):
    a, b = full_socket
    sends = BoundedSends(_sendv(a), stall_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(OutputStalled), sends:
        sends.send(["MESSAGE=first"])
    first = time.monotonic() - start
    assert 1.0 <= first < 3.0
    # still stalled: the next batches try only briefly, so other sinks keep going
    start = time.monotonic()
    with pytest.raises(OutputStalled), sends:
        sends.send(["MESSAGE=second"])
    assert time.monotonic() - start < PROBE_S + 0.5
    # the reader takes again: the next batch is sent, and the full bound is back
    b.setblocking(False)
    while True:
        try:
            b.recv(1024)
        except BlockingIOError:
            break
    with sends:
        sends.send(["MESSAGE=third"])
    assert not sends.stalled and b.recv(1024) == b"MESSAGE=third"


def test_the_process_timer_and_handler_are_given_back():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0, 30.0)
        sends = BoundedSends(lambda *fields: None, 1.0)
        with sends:
            sends.send(["MESSAGE=x"])
        remaining, interval = signal.getitimer(signal.ITIMER_REAL)
        assert 29.0 < remaining <= 30.0 and interval == 30.0
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_journald_absent_tells_listening_stale_and_missing_apart(tmp_path):
    """The start check of the journal sink (and `tcpstates doctor`): a socket
    file with a listener, one left behind by a journald that is gone, none."""
    import socket

    from tcpstates.plugins.journal.sink import journald_absent
    path = str(tmp_path / "socket")
    assert "does not exist" in journald_absent(path)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    live.bind(path)
    try:
        assert journald_absent(path) is None
    finally:
        live.close()
    assert "nothing listens on it" in journald_absent(path)     # the file stays: stale
