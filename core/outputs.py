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
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys

from tcpstates.errors import UsageError

FILE_MODE = 0o640
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths; False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


class LineOutput:
    """A text destination taking whole lines; `path` "-" means stdout."""

    def __init__(self, path: str, *, max_bytes: int = 0, keep: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.fd = -1
        self.size = 0
        self.regular = False

    @property
    def is_stdout(self) -> bool:
        return self.path == "-"

    def open(self) -> None:
        if self.is_stdout:
            self.fd = sys.stdout.fileno() if sys.stdout is not None else 1
            return
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                              | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{self.path}: is a symbolic link; tcpstates never writes "
                                 f"through links, give the real path") from None
            raise UsageError(f"{self.path}: cannot open for appending ({exc.strerror}); "
                             f"check the directory exists and is writable") from None
        st = os.fstat(self.fd)
        # regular files, FIFOs (a shipper reading a pipe) and character devices (/dev/null)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            os.close(self.fd)
            self.fd = -1
            raise UsageError(f"{self.path}: not a file, FIFO or device; give a file path or '-' for stdout")
        self.regular = stat.S_ISREG(st.st_mode)
        self.size = st.st_size

    def write(self, data: bytes) -> None:
        """Write whole lines; with rotation, split so no file passes max_bytes."""
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
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.size += n
        except OSError:
            # e.g. ENOSPC halfway: take back our own partial append, so the
            # file never holds a torn line (what was there before stays)
            if self.regular and self.size != before:
                try:
                    os.ftruncate(self.fd, before)
                    self.size = before
                except OSError:
                    pass
            raise

    def rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.lexists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        first = f"{self.path}.1"
        # the new file, created under FILE.1 (free now), then swapped in atomically
        fd = os.open(first, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, FILE_MODE)
        try:
            if not exchange(self.path, first):
                os.replace(self.path, f"{first}.old")
                os.replace(first, self.path)
                os.replace(f"{first}.old", first)
        except OSError:
            os.close(fd)
            raise
        old, self.fd, self.size = self.fd, fd, 0
        if old >= 0:
            os.close(old)

    def reopen(self) -> None:
        if self.is_stdout:
            return
        old = self.fd
        self.open()
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        if not self.is_stdout and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
