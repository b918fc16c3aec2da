"""Where line-oriented sinks write: stdout or an append-only file.

Files are opened O_APPEND|O_CREAT|O_NOFOLLOW with mode 0640, never truncated,
and reopened on SIGHUP (logrotate's rename-and-reopen). Optional size-based
rotation moves FILE to FILE.1 (shifting older ones) before a write would pass
the limit.

Rotation never leaves a moment without FILE: a tailer (Fluent Bit's `tail`)
handles the rename of the file it follows by looking for a new FILE right
away, and if there is none it follows nothing until its next directory scan
(Refresh_Interval, 60 s by default) — measured: thousands of events lost per
rotation. So the new, empty file is created first under the name FILE.1 and
swapped with FILE in one atomic renameat2(RENAME_EXCHANGE): FILE is the new
file and FILE.1 the old one at the same instant. Where the filesystem cannot
exchange (EINVAL/ENOSYS), two renames follow back to back.

Every rotation step works relative to a descriptor of FILE's directory kept
from the safe open (never the path string again): a directory on the path
swapped for a link after the start cannot redirect a rename. As root, an
output whose directory another user could change is refused at the start,
and a FIFO or file must belong to root. When FILE was moved away before a
rotation (logrotate's `mv`, its SIGHUP not yet here), the moved file is left
alone and a new FILE is started.

A destination that takes nothing for `stall_timeout` seconds (a reader that
stopped reading: a paused pager, a stuck shipper on a pipe) fails the write
with OutputStalled, so the pipeline counts it for this sink alone and the
other sinks go on; until it takes something again, later writes give up
after STALL_PROBE_S instead of a whole stall_timeout each. A line cut in the middle by the stall is finished first
at the next write (so the reader never sees a torn line followed by another)
and counts as written; if the output closes before its rest went out (the run
ended, the reader left), `unfinished` says so and the sink un-counts it.

With --user, root is dropped once the outputs are open; from then on every
open (SIGHUP, a retry, a file moved away) and every rotation goes through the
privileged opener (tcpstates.opener, started by `start_opener` just before the
drop), which runs exactly the steps below as root for the outputs known then.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import select
import socket
import stat
import sys
import termios
import time
import weakref
from typing import Any, Callable

from tcpstates import interrupt, opener, stdio
from tcpstates.errors import UsageError, mark_written
from tcpstates.safeopen import UntrustedPath, check_owned, entry_trusted, open_path

FILE_MODE = 0o640
STALL_TIMEOUT_S = 1.0   # default: a reader may pause this long before a batch fails for its sink
STALL_PROBE_S = 0.01    # while the reader stays stalled: how long each later batch tries
# what each open LineOutput writes to: two sinks appending to one stdout or
# file would interleave their lines, so the second is refused
_IN_USE: dict[tuple[int, int], str] = {}
PIPE_BUF = 4096
FIFO_RETRY_S = 0.1
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
# every file output made so far: the ones the privileged opener may act on
_FILES: list[weakref.ref[LineOutput]] = []


def exchange(dirfd: int, a: str, b: str) -> bool:
    """Atomically swap two existing entries of the directory `dirfd`; False where
    the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(dirfd, os.fsencode(a), dirfd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _lexists(name: str, dirfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


F_GETPIPE_SZ = 1032


def _used_guard(fd: int) -> int:
    """Bytes already in the pipe: with them, the pipe's whole capacity."""
    try:
        used = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, used)
        return used[0]
    except OSError:
        return 0


def _numbered(suffix: str) -> bool:
    """`suffix` is a number as rotation writes it: ASCII digits, no leading zero
    (str.isdigit also takes "²", which int() refuses, and "٣", which it reads
    as 3), of any length (every number rotation made is found again at a
    restart, or the restart would go back to an older file and never delete
    the newer ones)."""
    return suffix.isascii() and suffix.isdigit() and (suffix == "0" or suffix[0] != "0")


def _numbers(names: list[str], base: str) -> dict[int, str]:
    """N → name of every BASE.N among `names` (numbered rotation's files)."""
    cut = len(base) + 1
    return {int(n[cut:]): n for n in names if n.startswith(base + ".") and _numbered(n[cut:])}


class OutputStalled(OSError):
    """The destination took nothing for stall_timeout seconds."""


class NoRoomForLine(BlockingIOError):
    """The pipe has room, but not for the next whole line. poll() cannot wait
    for that (a pipe is "writable" as soon as one buffer slot is free), so the
    writer waits a moment instead of polling."""


NO_ROOM_WAIT_S = 0.002


def _no_readers(fd: int) -> bool:
    """The pipe we write to has no reader left (poll's POLLERR on a write end)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


class LineOutput:
    """A text destination taking whole lines; `path` "-" means stdout."""

    def __init__(self, path: str, *, max_bytes: int = 0, keep: int = 5,
                 notice: Callable[[str], None] | None = None,
                 stall_timeout: float = STALL_TIMEOUT_S, numbered: bool = False) -> None:
        self.path = path
        # numbered: the live file is PATH.N, N rising at each rotation, and no
        # file is ever renamed (a tailer following a glob reads each exactly once)
        self.numbered = numbered and path != "-"
        self.index = 0                           # N of the live file (numbered)
        self.stall_timeout = stall_timeout
        self.stalled = False                     # the last write gave up: probe briefly until one works
        self._pending = b""                      # the rest of a line a stall cut
        self.unfinished = 0                      # lines counted as written but closed torn
        self.notice = notice                     # says once that we wait for a FIFO's reader
        self.max_bytes = max_bytes
        self.keep = keep
        self.fd = -1
        self._dirfd = -1                         # O_PATH descriptor of the file's directory
        self._name = ""                          # the file's name in it
        self.size = 0
        self.regular = False
        self._own = False                        # fd is ours to close
        self._sock: socket.socket | None = None  # stdout is a socket: send(MSG_DONTWAIT)
        self._chunked = False                    # blocking fd: poll, then PIPE_BUF at a time
        self._accepted = 0                       # bytes the OS took in this write()
        self._token = f"{'stdout' if path == '-' else path} #{id(self)}"
        self._key: tuple[int, int] | None = None
        # after --user dropped root: opens and rotations go through the opener, as output #_slot
        self._opener: opener.Opener | None = None
        self._slot = -1
        if path != "-":
            _FILES[:] = [r for r in _FILES if r() is not None]
            _FILES.append(weakref.ref(self))

    @property
    def is_stdout(self) -> bool:
        return self.path == "-"

    def open(self) -> None:
        """Open (or reopen) the destination. Every write through it is non-blocking
        and waits interruptibly (tcpstates.interrupt), so a consumer that stops
        reading can never make a stop request wait."""
        self._release()
        if self.is_stdout:
            self._open_stdout()
        else:
            self._open_path()
        self._claim()

    def _claim(self) -> None:
        st = os.fstat(self._sock.fileno() if self._sock is not None else self.fd)
        if stat.S_ISCHR(st.st_mode) and not os.isatty(self.fd):
            return                                  # /dev/null, /dev/full may be shared
        key = (st.st_dev, st.st_ino)
        other = _IN_USE.get(key)
        if other is not None and other != self._token:
            self._close_fd()
            where = "standard output" if self.is_stdout else self.path
            raise UsageError(f"{where}: another sink already writes there; give each "
                             f"sink its own path")
        if stat.S_ISREG(st.st_mode) and not self.is_stdout:
            # across processes too: two tracers appending to one file interleave
            # rotations and delete each other's files (the lock goes with the
            # open file: released at close, a rotated file is free again)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                self._close_fd()
                raise UsageError(f"{self.live_path}: another process is writing it (a second "
                                 f"tcpstates?); give each its own path") from None
        _IN_USE[key] = self._token
        self._key = key

    def _release(self) -> None:
        key = getattr(self, "_key", None)
        if key is not None and _IN_USE.get(key) == self._token:
            del _IN_USE[key]
        self._key = None

    def _open_path(self, wait: bool = True) -> None:
        if self._opener is not None:
            # root was dropped: the opener ran the walk and every check below as root
            self.fd = self._open_file(wait, self._open_via_opener)
            self._own = True
            st = os.fstat(self.fd)
            self.regular = stat.S_ISREG(st.st_mode)
            self.size = st.st_size
            return
        self.fd = self._open_file(wait)
        self._own = True
        st = os.fstat(self.fd)
        # regular files, FIFOs (a shipper reading a pipe) and character devices (/dev/null)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            self._close_fd()
            raise UsageError(f"{self.live_path}: not a file, FIFO or device; give a file path or '-' for stdout")
        # a FIFO too: another user's FIFO hands them every event we write
        why = check_owned(self.fd, st) if stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) else None
        if why is not None:   # as root: never append to a file someone else controls
            self._close_fd()
            raise UsageError(f"{self.live_path}: refusing to append as root because {why}; remove it or "
                             f"fix its owner and mode")
        dir_st = os.fstat(self._dirfd)
        if os.geteuid() == 0 and not entry_trusted(dir_st, st):
            # another user could rename or replace what we write (and rotate)
            self._close_fd()
            raise UsageError(f"{self.live_path}: refusing to write as root into a directory another user "
                             f"can change (owner uid {dir_st.st_uid}, mode {dir_st.st_mode & 0o7777:o}); "
                             f"use a directory owned by root and not writable by group/others")
        self.regular = stat.S_ISREG(st.st_mode)
        self.size = st.st_size

    @property
    def live_path(self) -> str:
        """The file written now: PATH, or PATH.N when numbered."""
        return f"{self.path}.{self.index}" if self.numbered else self.path

    def _last_index(self) -> int:
        """The highest N of an existing PATH.N (numbered mode), 1 when none: a
        restart goes on appending to the newest file (after a switch from
        the renaming scheme, a new file after them)."""
        head, sep, base = self.path.rpartition("/")
        try:
            # names only: the file itself is then opened by the safe walk
            names = os.listdir(head or ("/" if sep else "."))
        except OSError:
            return 1
        newest = max(_numbers(names, base), default=0)
        if base in names and newest:
            # PATH itself exists: the PATH.N here are the renaming scheme's, where
            # the highest N is the OLDEST file; never append to it, start after it
            return newest + 1
        return max(newest, 1)

    def _open_via_opener(self) -> int:
        assert self._opener is not None
        # refused (its reason), timed out or gone: OpenerError; ENXIO (a FIFO
        # nobody reads yet) is waited for here, never in the opener
        fd, info = self._opener.open(self._slot)
        self.index, self._name = int(info["index"]), str(info["name"])
        return fd

    def _open_file(self, wait: bool = True, attempt: Callable[[], int] | None = None) -> int:
        """openat per component with O_NOFOLLOW (a symlinked parent is followed only
        when nobody else could have planted it); a FIFO without a reader is waited
        for, interruptibly (`wait`; else ENXIO is raised)."""
        waited = False
        while True:
            try:
                return (attempt or self._open_once)()
            except OSError as exc:
                if exc.errno != errno.ENXIO or not wait:   # ENXIO: a FIFO nobody reads yet
                    raise
                if not waited and self.notice is not None:
                    self.notice(f"{self.live_path}: a FIFO nobody reads yet; waiting for a reader")
                waited = True
                interrupt.sleep(FIFO_RETRY_S)

    def _open_once(self) -> int:
        if self.numbered and self.index == 0:
            self.index = self._last_index()
        flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                 | os.O_NONBLOCK | os.O_NOCTTY)

        def open_last(dirfd: int, name: str) -> int:
            fd = os.open(name, flags, FILE_MODE, dir_fd=dirfd)
            if self._dirfd >= 0:
                os.close(self._dirfd)
            # the directory the file was found in, for rotation (never the path again)
            self._dirfd, self._name = os.dup(dirfd), name
            return fd

        try:
            return open_path(self.live_path, open_last, strict=False, follow_last=False)
        except UntrustedPath as exc:
            raise UsageError(f"{self.live_path}: refusing to write: {exc.strerror}") from None
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{self.live_path}: is a symbolic link; tcpstates never writes "
                                 f"through links, give the real path") from None
            raise UsageError(f"{self.live_path}: cannot open for appending ({exc.strerror}); "
                             f"check the directory exists and is writable") from None

    def _open_stdout(self) -> None:
        if stdio.was_closed(1) or sys.stdout is None:
            raise OSError(errno.EBADF, "standard output is closed")
        fd = sys.stdout.fileno()
        st = os.fstat(fd)
        self.fd, self._own, self._sock, self._chunked = fd, False, None, False
        self.regular = stat.S_ISREG(st.st_mode)
        if self.regular or (stat.S_ISCHR(st.st_mode) and not os.isatty(fd)):
            return                                  # never blocks for long
        if stat.S_ISSOCK(st.st_mode):              # e.g. systemd's StandardOutput=journal
            self._sock = socket.socket(fileno=os.dup(fd))
            return
        # a pipe, FIFO or terminal: a private open file description we may make
        # non-blocking without changing the shell's (or anyone's) copy
        try:
            self.fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                              | os.O_NOCTTY)
            self._own = True
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise BrokenPipeError(errno.EPIPE, "nobody reads standard output") from None
            self._chunked = True                    # no /proc: poll, then write what fits

    def write(self, data: bytes) -> None:
        """Write whole lines; with rotation, split so no file passes max_bytes.

        On failure the exception carries, by `mark_written`, the whole lines of
        `data` the OS accepted before it (so a sink counts exactly)."""
        self._accepted = 0
        try:
            if self.fd < 0 and not self.is_stdout:
                self.open()                          # a reopen failed before: retry it now
            if self._pending:
                self._flush_pending()
            self._write_lines(data)
        except (OSError, UsageError, interrupt.StopRequested) as exc:
            done = self._accepted
            written = bytes(data[:done]).count(b"\n")
            if isinstance(exc, (OutputStalled, interrupt.StopRequested)) and done and data[done - 1:done] != b"\n":
                # a line cut by the stall or the stop: its rest goes first next
                # time (never a torn line followed by another: the stop's drain
                # still writes), so it counts as written unless close says otherwise
                end = data.find(b"\n", done)
                self._pending = bytes(data[done:] if end < 0 else data[done:end + 1])
                written += end >= 0
            mark_written(exc, written)
            raise

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, b""
        try:
            self._write_all(pending)
        except BaseException:
            # whatever failed (a stall, the stop, the reader gone): the rest
            # stays pending, so close() finishes it or counts the line as
            # unfinished (it was counted as written when it was cut); and the
            # bytes accepted here are the pending line's, not the new data's
            self._pending = pending[self._accepted:]
            self._accepted = 0
            raise
        self._accepted = 0

    def _write_lines(self, data: bytes) -> None:
        if self.max_bytes and self.regular and self.size + len(data) > self.max_bytes:
            self._write_rotating(data)
            return
        self._write_all(data)

    def _write_rotating(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            room = self.max_bytes - self.size
            end = len(data) if len(data) - start <= room else data.rfind(b"\n", start, start + room) + 1
            if end <= start:
                if self.size:
                    self.rotate()
                    continue
                end = data.find(b"\n", start) + 1 or len(data)   # one line bigger than the limit
            self._write_all(data[start:end])
            start = end

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        before = self.size
        progress = time.monotonic()
        # once a write gave up, later ones only probe until the reader takes
        # again: a reader that stays stopped must not cost the other sinks
        # stall_timeout per batch (the kernel buffer would fill for all)
        limit = STALL_PROBE_S if self.stalled else self.stall_timeout
        try:
            while view:
                try:
                    n = self._send(view)
                except BlockingIOError as exc:
                    # a reader that takes nothing for stall_timeout fails this
                    # sink's write only; the other sinks must not wait for it
                    left = progress + limit - time.monotonic()
                    if isinstance(exc, NoRoomForLine) and left > 0:
                        interrupt.sleep(min(left, NO_ROOM_WAIT_S))   # poll would not wait
                        left = progress + limit - time.monotonic()
                        if left > 0:
                            continue
                    if left <= 0 or not interrupt.wait(self.fd, select.POLLOUT, left):
                        if time.monotonic() - progress >= limit:
                            self.stalled = True
                            where = "standard output" if self.is_stdout else self.path
                            # "accepted", not "read": a pipe takes a write only when
                            # its reader frees a whole page, so a trickling reader
                            # counts as stopped too
                            raise OutputStalled(errno.ETIMEDOUT, f"{where}: nothing could be written for "
                                                f"{self.stall_timeout:g} s (stall_timeout): its reader "
                                                f"stopped or reads too slowly") from None
                    continue
                progress = time.monotonic()
                self.stalled = False
                view = view[n:]
                self.size += n
                self._accepted += n
        except (OSError, interrupt.StopRequested):
            # e.g. ENOSPC halfway: take back the torn end of our own append, so
            # the file never holds a torn line; the whole lines that fit stay
            # (and are counted written: the caller counts the newlines accepted)
            if self.regular and self.size != before:
                keep = before + bytes(data[:self.size - before]).rfind(b"\n") + 1
                try:
                    os.ftruncate(self.fd, keep)
                    self._accepted -= self.size - keep
                    self.size = keep
                except OSError:
                    pass
            raise

    def rotate(self) -> None:
        """FILE → FILE.1 (older ones shifted), a new FILE; every step relative to
        the directory descriptor from the safe open. Numbered: a new FILE.N+1.
        After --user dropped root, the opener takes these steps."""
        mine = os.fstat(self.fd)
        if self._opener is not None:
            fd, info = self._opener.rotate(self._slot, mine.st_dev, mine.st_ino)
            if fd >= 0:
                self.index, self._name = int(info["index"]), str(info["name"])
        else:
            fd = self._rotate_files(mine.st_dev, mine.st_ino)
        if fd < 0:
            # moved away (logrotate's mv, its SIGHUP still to come): that file is
            # someone else's now; start a new FILE through the same safe open
            self._close_fd()
            self.open()
            return
        old, self.fd, self.size = self.fd, fd, 0
        if old >= 0:
            os.close(old)
        self._release()      # the destination is a new inode now
        self._claim()

    def _rotate_files(self, dev: int, ino: int) -> int:
        """The file-system steps of a rotation (as root: by the tracer, or by the
        opener after the drop); the new file, or -1 when the file written now,
        (dev, ino), is no longer FILE."""
        if self.numbered:
            return self._rotate_numbered()
        d, name = self._dirfd, self._name
        try:
            cur: os.stat_result | None = os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            cur = None
        if cur is None or (cur.st_dev, cur.st_ino) != (dev, ino):
            return -1
        for i in range(self.keep - 1, 0, -1):
            src = f"{name}.{i}"
            if _lexists(src, d):
                os.replace(src, f"{name}.{i + 1}", src_dir_fd=d, dst_dir_fd=d)
        first = f"{name}.1"
        # the new file, created under FILE.1 (free now), then swapped in atomically
        fd = os.open(first, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE, dir_fd=d)
        try:
            if not exchange(d, name, first):
                os.replace(name, f"{first}.old", src_dir_fd=d, dst_dir_fd=d)
                os.replace(first, name, src_dir_fd=d, dst_dir_fd=d)
                os.replace(f"{first}.old", first, src_dir_fd=d, dst_dir_fd=d)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _rotate_numbered(self) -> int:
        """PATH.N stays as it is; PATH.N+1 (the next free number) is created in
        the same directory (its descriptor from the safe open) and written from
        now on; PATH.(N+1-keep-1) and older, beyond `keep` old files, go."""
        d, base = self._dirfd, self.path.rpartition("/")[2]
        index = self.index
        for _ in range(1000):
            index += 1
            try:
                fd = os.open(f"{base}.{index}", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE, dir_fd=d)
                break
            except FileExistsError:
                continue        # someone's file, or ours from a clock-skewed past: never reused
        else:
            raise OSError(errno.EEXIST, f"no free number after {self.path}.{self.index}")
        self.index, self._name = index, f"{base}.{index}"
        # every PATH.M older than the kept ones, not only the run just below:
        # a file removed by hand must not make all older ones stay forever
        try:
            # the directory descriptor may be O_PATH: listed through a readable one
            listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=d)
            try:
                names = os.listdir(listing)
            finally:
                os.close(listing)
        except OSError:
            names = []
        for number, name in _numbers(names, base).items():
            if number < index - self.keep:
                try:
                    os.unlink(name, dir_fd=d)
                except OSError:
                    pass
        return fd

    # -- the privileged opener's side (tcpstates.opener.Target), as root ---------
    def kept_fds(self) -> list[int]:
        return [self._dirfd]

    def may_rotate(self) -> bool:
        return bool(self.max_bytes)

    def privileged_open(self) -> tuple[int, dict[str, Any]]:
        """The whole safe open and its checks, as root; the descriptor for the
        tracer. The directory descriptor stays here, for rotations."""
        self.fd, self._own, self._sock = -1, False, None   # the tracer's, not this copy's
        self._open_path(wait=False)
        fd, self.fd, self._own = self.fd, -1, False
        return fd, {"index": self.index, "name": self._name}

    def privileged_rotate(self, dev: int, ino: int) -> tuple[int, dict[str, Any]]:
        return self._rotate_files(dev, ino), {"index": self.index, "name": self._name}

    def _pipe_room(self) -> int | None:
        """Free bytes in the pipe or FIFO we write to (None: not a pipe, or unknown)."""
        if self.fd < 0 or self.regular:
            return None
        try:
            if not stat.S_ISFIFO(os.fstat(self.fd).st_mode):
                return None
            size = fcntl.fcntl(self.fd, F_GETPIPE_SZ)
            used = array.array("i", [0])
            fcntl.ioctl(self.fd, termios.FIONREAD, used)
        except OSError:
            return None
        return max(0, size - used[0])

    def _whole_lines(self, view: memoryview) -> memoryview:
        """As much of `view` as fits in the pipe, cut after a newline: a reader
        never sees half a line, whatever happens to the rest (a stall, a stop).
        Only a line longer than the whole pipe can still be split."""
        room = self._pipe_room()
        if room is None or room >= len(view):
            return view
        cut = view[:room].tobytes().rfind(b"\n")
        if cut < 0:
            first = view.tobytes().find(b"\n")
            if first < 0 or first + 1 > room + _used_guard(self.fd):
                return view          # one line bigger than the pipe: may split
            if _no_readers(self.fd):
                # nothing is written here, so the write that would say EPIPE
                # never happens: say it (the reader left, e.g. `| head -3`)
                raise BrokenPipeError(errno.EPIPE, "the reader of the pipe is gone")
            raise NoRoomForLine(errno.EAGAIN, "no room for a whole line")
        return view[:cut + 1]

    def _send(self, view: memoryview) -> int:
        if self._sock is not None:
            return self._sock.send(view, socket.MSG_DONTWAIT)
        view = self._whole_lines(view)
        if self._chunked:
            if not interrupt.wait(self.fd, select.POLLOUT, 0):
                raise BlockingIOError(errno.EAGAIN, "not writable")
            chunk = view[:PIPE_BUF]
            if len(view) > PIPE_BUF:
                cut = chunk.tobytes().rfind(b"\n")   # whole lines per write, as above
                if cut >= 0:
                    chunk = view[:cut + 1]
            return os.write(self.fd, chunk)
        if self.fd < 0:
            raise OSError(errno.EBADF, "not open")
        return os.write(self.fd, view)

    def reopen(self) -> None:
        """SIGHUP (logrotate): the old file is closed first; when the new open
        fails, writes fail and are counted until a later write's retry works —
        never silently appended to the rotated or deleted file."""
        if self.is_stdout:
            return
        self._close_fd()
        self.open()

    def _close_fd(self) -> None:
        # (the opener's directory descriptor, if any, is the opener's: -1 here)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._own and self.fd >= 0:
            os.close(self.fd)
        if self._dirfd >= 0:
            os.close(self._dirfd)
        self._dirfd = -1
        self.fd = -1
        self._own = False

    def close(self) -> None:
        self._finish_pending()
        self._release()
        self._close_fd()

    def _finish_pending(self) -> None:
        """The rest of a line a stall cut goes out now if the destination takes it
        without waiting (a close must not block); otherwise that line stays torn
        and is counted in `unfinished`."""
        if not self._pending:
            return
        try:
            while self._pending and self.fd >= 0:
                n = self._send(memoryview(self._pending))
                self._pending = self._pending[n:]
        except OSError:
            pass
        if self._pending:
            self.unfinished += 1
            self._pending = b""


_opener: opener.Opener | None = None


def start_opener() -> bool:
    """Just before --user drops root: fork the privileged opener for every
    file output made so far, and route their later opens and rotations through
    it. False (and nothing started) when there is no file output."""
    global _opener
    outs = [o for o in (r() for r in _FILES) if o is not None]
    if not outs:
        return False
    _opener = opener.start(list(outs))
    for i, out in enumerate(outs):
        out._opener, out._slot = _opener, i
    return True


def stop_opener() -> None:
    """At exit: the opener sees EOF, exits and is reaped (bounded)."""
    global _opener
    if _opener is not None:
        _opener.stop()
        _opener = None
