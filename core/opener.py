"""The privileged opener: with --user, the one small process that stays root.

After root is dropped (--user) the tracer can no longer create or reopen its
output files in a directory only root may write: logrotate's rename + SIGHUP
and max_bytes rotation would fail with EACCES and lose every later event. So,
just before the drop, `start()` forks this process (as nginx keeps a master).
It stays root and does nothing but answer two requests over a socketpair,
each about an output fixed before the drop, named by its index in that list —
never a path or anything else the unprivileged side chose:

  open #i     the output's own safe open (openat per component, O_NOFOLLOW,
              every check on the descriptor: tcpstates.outputs) → its descriptor
  rotate #i   the output's size rotation in the directory kept from that open
              → the new file's descriptor (only for an output with max_bytes)

Descriptors go back with SCM_RIGHTS; refusals as one line of text. The opener
closes every descriptor it inherited except its socket and the outputs'
directories (BPF objects, stdout, the replay input...), ignores SIGINT, SIGHUP
and SIGUSR1 (a Ctrl-C reaches the whole process group; they are the tracer's),
and exits at EOF on its socket (the tracer exited or closed it) or when the
tracer dies (PR_SET_PDEATHSIG). It never makes the tracer wait: every request
waits at most REQUEST_TIMEOUT_S, interruptibly (tcpstates.interrupt), and
after one went unanswered the next ones only probe briefly.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from typing import Any, Protocol

from tcpstates import interrupt

__all__ = ["Opener", "OpenerError", "Target", "start", "OP_OPEN", "OP_ROTATE", "REQUEST"]

OP_OPEN, OP_ROTATE = 1, 2
# seq, op, index, then the device and inode of the file the tracer writes now
# (rotate: tells whether FILE was moved away since); fixed size, nothing else
REQUEST = struct.Struct("=IBIQQ")
REPLY_MAX = 4096
REQUEST_TIMEOUT_S = 1.0   # an answer normally takes well under a millisecond
PROBE_TIMEOUT_S = 0.05    # after a request went unanswered: until the opener answers again
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
NAME = b"tcpstates-open"  # its command name (ps, tests)


class OpenerError(OSError):
    """The opener refused (its reason), is gone, or did not answer in time."""

    def __str__(self) -> str:
        return str(self.strerror)


class Target(Protocol):
    """An output the opener may act on (tcpstates.outputs.LineOutput)."""

    def kept_fds(self) -> list[int]:
        """Descriptors of this output the opener keeps (its directory)."""

    def privileged_open(self) -> tuple[int, dict[str, Any]]:
        """The safe open as root; the new descriptor and facts for the tracer."""

    def privileged_rotate(self, dev: int, ino: int) -> tuple[int, dict[str, Any]]:
        """The rotation as root; -1 when FILE was moved away (then: open)."""

    def may_rotate(self) -> bool:
        """Only outputs configured with size rotation rotate."""


class Opener:
    """The tracer's end: one request at a time, each bounded in time."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self._seq = 0
        self._unanswered = False   # a request timed out and its answer has not come yet

    def open(self, index: int) -> tuple[int, dict[str, Any]]:
        return self._request(OP_OPEN, index)

    def rotate(self, index: int, dev: int, ino: int) -> tuple[int, dict[str, Any]]:
        return self._request(OP_ROTATE, index, dev, ino)

    def _request(self, op: int, index: int, dev: int = 0, ino: int = 0) -> tuple[int, dict[str, Any]]:
        """The descriptor (-1 for none) and the reply; OSError when the opener
        refused (errno and its text), is gone or did not answer in time."""
        if self.sock.fileno() < 0:
            raise OpenerError(errno.EPIPE, "the privileged opener was stopped")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        try:
            self.sock.send(REQUEST.pack(seq, op, index, dev, ino), socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise OpenerError(errno.EAGAIN, "the privileged opener is not taking requests "
                                        "(busy with earlier ones)") from None
        except OSError as exc:
            raise OpenerError(errno.EPIPE, f"the privileged opener is gone ({exc.strerror})") from None
        limit = PROBE_TIMEOUT_S if self._unanswered else REQUEST_TIMEOUT_S
        sent = time.monotonic()
        deadline = sent + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not interrupt.wait(self.sock.fileno(), select.POLLIN, left):
                if time.monotonic() < deadline:
                    continue
                self._unanswered = True
                raise OpenerError(errno.ETIMEDOUT, f"the privileged opener did not answer within "
                                               f"{limit:g} s")
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, REPLY_MAX, 2, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise OpenerError(errno.EPIPE, f"the privileged opener is gone ({exc.strerror})") from None
            if not data:
                raise OpenerError(errno.EPIPE, "the privileged opener is gone (it exited)")
            if self._unanswered:
                # an answer, even a late one, shows the opener is there again:
                # this request gets the whole bound (an opener slower than the
                # probe, on a slow disk, would otherwise be refused for good)
                limit = REQUEST_TIMEOUT_S
                deadline = sent + limit
            self._unanswered = False
            try:
                reply = json.loads(data)
                if not isinstance(reply, dict) or flags & socket.MSG_TRUNC:
                    raise ValueError("not one whole JSON object")
            except ValueError:
                for fd in fds:
                    os.close(fd)
                raise OpenerError(errno.EPROTO, "the privileged opener's answer could not be read") from None
            if reply.get("seq") != seq or flags & socket.MSG_CTRUNC:
                # the late answer to a request that timed out: nobody wants it now
                for fd in fds:
                    os.close(fd)
                continue
            if "error" in reply:
                for fd in fds:
                    os.close(fd)
                raise OpenerError(reply.get("errno") or errno.EPERM, reply["error"])
            return (fds[0] if fds else -1), reply

    def stop(self, timeout: float = 0.2) -> None:
        """Close our end (the opener sees EOF and exits) and reap it, waiting
        at most `timeout` (not interruptible: this runs after the stop)."""
        self.sock.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid or time.monotonic() >= deadline:
                return   # if still there: it dies with us (PR_SET_PDEATHSIG)
            time.sleep(0.005)


def start(targets: list[Target]) -> Opener:
    """Fork the opener (as root, before the drop) for exactly these outputs."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    # what the child needs, resolved before the fork (no import or lookup after it)
    libc = ctypes.CDLL(None, use_errno=True)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    keep = {theirs.fileno()} | {fd for t in targets for fd in t.kept_fds() if fd >= 0}
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        os.close(devnull)
        raise
    if pid == 0:   # ---- the opener ----
        status = 1
        try:
            _settle(libc, parent, devnull, keep)
            _serve(theirs, targets)
            status = 0
        finally:
            os._exit(status)   # never the tracer's atexit handlers or finally blocks
    theirs.close()
    os.close(devnull)
    return Opener(ours, pid)


def _settle(libc: Any, parent: int, devnull: int, keep: set[int]) -> None:
    """Dies with the tracer, leaves its signals to it, holds nothing else of it."""
    import gc
    # garbage collection could finalise a copied object (a socket) that closes
    # a descriptor number this process reuses for a file it opens
    gc.disable()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)    # the tracer died before the line above
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(NAME), 0, 0, 0)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # systemd stopping the unit ends it too
    interrupt.forget()
    for fd in (0, 1, 2):
        os.dup2(devnull, fd, inheritable=False)
    low = 3
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, _fd_bound())
    sys.stdout = sys.stderr = None   # nothing may print here


def _fd_bound() -> int:
    """Above every open descriptor. Not the soft RLIMIT_NOFILE (SC_OPEN_MAX):
    a descriptor inherited from a parent with a higher limit, or opened before
    the limit was lowered, may be numbered above it."""
    try:
        return max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        # no /proc: up to the hard limit (capped: a close per number)
        return max(os.sysconf("SC_OPEN_MAX"), min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20))


def _serve(sock: socket.socket, targets: list[Target]) -> None:
    """Answer requests until EOF; a malformed or out-of-range one is refused."""
    while True:
        try:
            data = sock.recv(REQUEST.size + 1)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        if len(data) != REQUEST.size:
            _reply(sock, {"seq": None, "error": "malformed request", "errno": errno.EINVAL})
            continue
        seq, op, index, dev, ino = REQUEST.unpack(data)
        if not 0 <= index < len(targets):
            _reply(sock, {"seq": seq, "error": f"no output #{index} (there are {len(targets)})",
                          "errno": errno.EPERM})
            continue
        target = targets[index]
        fd = -1
        try:
            if op == OP_OPEN:
                fd, info = target.privileged_open()
            elif op == OP_ROTATE and target.may_rotate():
                fd, info = target.privileged_rotate(dev, ino)
            elif op == OP_ROTATE:
                raise OSError(errno.EPERM, f"output #{index} has no size rotation")
            else:
                raise OSError(errno.EINVAL, f"unknown request {op}")
            _reply(sock, {"seq": seq, **info}, fd)
        except Exception as exc:   # every refusal is an answer, never the end of the opener
            _reply(sock, {"seq": seq, "error": str(exc) if not isinstance(exc, OSError) or exc.strerror
                          is None else exc.strerror, "errno": getattr(exc, "errno", None) or errno.EPERM})
        finally:
            if fd >= 0:
                os.close(fd)   # the tracer has its own copy now


def _encode(reply: dict[str, Any]) -> bytes:
    """The reply as one datagram the tracer reads whole: a refusal naming a
    path may be longer than REPLY_MAX (paths are walked per component, so
    longer than PATH_MAX too), and a cut datagram is no JSON at all — its
    text is shortened in the middle instead, keeping the reason at its end."""
    data = json.dumps(reply).encode()
    text = reply.get("error")
    while len(data) > REPLY_MAX and isinstance(text, str) and text:
        keep = max(0, len(text) - (len(data) - REPLY_MAX) - 8)   # a character is at least a byte
        text = text[:keep // 2] + "..." + text[len(text) - keep // 2:] if keep else ""
        reply = {**reply, "error": text}
        data = json.dumps(reply).encode()
    return data


def _reply(sock: socket.socket, reply: dict[str, Any], fd: int = -1) -> None:
    data = _encode(reply)
    try:
        if fd >= 0:
            socket.send_fds(sock, [data], [fd])
        else:
            sock.send(data)
    except OSError:
        pass   # the tracer is gone: the next recv says so
