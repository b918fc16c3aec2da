"""Opening files the way a root tool must: every check on the descriptor then used.

`open_path` walks a path one component at a time with O_NOFOLLOW (openat), so
no component can be swapped between a check and the open. A symbolic link on
the way is followed only when nobody but root (or the running user) could have
put it there: its directory is not writable by others, or is sticky (/tmp) and
the link belongs to root (or the running user). With `strict` (configs read as
root) every directory on the way must be trusted the same way. The caller then
checks the opened file itself with fstat (`check_owned`), never by path again.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from typing import Callable

MAX_LINKS = 40   # as the kernel's own limit (ELOOP)


class UntrustedPath(OSError):
    """A component of the path could have been changed by another user."""


def trusted_uids() -> tuple[int, ...]:
    euid = os.geteuid()
    return (0,) if euid == 0 else (0, euid)


def dir_trusted(st: os.stat_result) -> bool:
    """Nobody else can add, remove or rename entries (sticky dirs: see entry_trusted)."""
    return st.st_uid in trusted_uids() and not st.st_mode & 0o022


def entry_trusted(dir_st: os.stat_result, entry_st: os.stat_result) -> bool:
    """An entry of that directory that nobody else can replace."""
    if dir_trusted(dir_st):
        return True
    # sticky (/tmp): only the entry's owner (or root) may remove or rename it
    return bool(dir_st.st_mode & 0o1000) and entry_st.st_uid in trusted_uids()


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o}"


def open_path(path: str, open_last: Callable[[int, str], int], *, strict: bool,
              follow_last: bool) -> int:
    """Walk `path` with O_NOFOLLOW per component and return `open_last(dirfd, name)`.

    `open_last` must open `name` relative to `dirfd` with O_NOFOLLOW; when it
    fails with ELOOP (the last component is a link) and `follow_last` is set, a
    trusted link is followed. Raises OSError (UntrustedPath for trust problems).
    """
    if "\0" in path:
        raise OSError(errno.EINVAL, "the path contains a NUL byte")
    if not path:
        raise FileNotFoundError(errno.ENOENT, "empty path")
    parts = deque(path.split("/"))
    fd = os.open("/" if path.startswith("/") else ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    links = 0
    dir_name = "/" if path.startswith("/") else "."   # the directory fd is, for messages
    try:
        dir_st = os.fstat(fd)
        if strict and path.startswith("/") and not dir_trusted(dir_st):
            raise UntrustedPath(errno.EPERM, f"/ is writable by others ({_describe(dir_st)})")
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                if parts:
                    continue
                name = "."
            if not parts or all(p in ("", ".") for p in parts):
                try:
                    last = open_last(fd, name)
                except OSError as exc:
                    if exc.errno != errno.ELOOP or not follow_last:
                        raise
                    link_st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISLNK(link_st.st_mode):
                        raise
                    parts.clear()
                    if os.readlink(name, dir_fd=fd).startswith("/"):
                        dir_name = "/"
                    fd, links = _follow(fd, dir_st, name, link_st, parts, links)
                    dir_st = os.fstat(fd)
                    continue
                if strict and not entry_trusted(dir_st, os.fstat(last)):
                    os.close(last)
                    raise UntrustedPath(errno.EPERM, f"{name} is in directory {dir_name}, which someone "
                                        f"other than root can change ({_describe(dir_st)})")
                return last
            nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            st = os.fstat(nfd)
            if stat.S_ISLNK(st.st_mode):
                os.close(nfd)
                if os.readlink(name, dir_fd=fd).startswith("/"):
                    dir_name = "/"
                fd, links = _follow(fd, dir_st, name, st, parts, links)
                dir_st = os.fstat(fd)
                continue
            if not stat.S_ISDIR(st.st_mode):
                os.close(nfd)
                raise NotADirectoryError(errno.ENOTDIR, f"{name} is not a directory")
            if strict and not entry_trusted(dir_st, st):
                os.close(nfd)
                raise UntrustedPath(errno.EPERM, f"directory {name} is in directory {dir_name}, which "
                                    f"someone other than root can change ({_describe(dir_st)})")
            os.close(fd)
            fd, dir_st, dir_name = nfd, st, name
        raise FileNotFoundError(errno.ENOENT, "no file name in the path")
    finally:
        os.close(fd)


def _follow(fd: int, dir_st: os.stat_result, name: str, link_st: os.stat_result,
            parts: deque[str], links: int) -> tuple[int, int]:
    """Follow the link `name` in `fd` when it is trusted; the directory to go on from."""
    if not entry_trusted(dir_st, link_st):
        raise UntrustedPath(errno.EPERM, f"symbolic link {name} could be replaced by someone "
                            f"other than root (its directory: {_describe(dir_st)}); give the real path")
    links += 1
    if links > MAX_LINKS:
        raise OSError(errno.ELOOP, "too many levels of symbolic links")
    target = os.readlink(name, dir_fd=fd)
    parts.extendleft(reversed(target.split("/")))
    if target.startswith("/"):
        nfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        os.close(fd)
        return nfd, links
    return fd, links


def open_last_path(dirfd: int, name: str) -> int:
    """An `open_last` for open_path that opens only an O_PATH descriptor: the
    file can be looked at (fstat) before it is opened for reading, so a FIFO
    or device is never opened at all (opening some devices acts). A symbolic
    link raises ELOOP, as O_NOFOLLOW would, for open_path to decide on."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ELOOP, "a symbolic link", name)
    return fd


class ProcMissing(OSError):
    """/proc/self/fd is not there (/proc not mounted): the checked file exists,
    it cannot be reopened. Not a FileNotFoundError, so that no caller reports
    the file itself as missing."""


def reopen_for_reading(path_fd: int) -> int:
    """The very inode an O_PATH descriptor names, opened for reading (through
    /proc/self/fd, never by its path again)."""
    link = f"/proc/self/fd/{path_fd}"
    try:
        return os.open(link, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        # the O_PATH descriptor is open, so its /proc/self/fd entry can only be
        # missing when /proc is not mounted
        raise ProcMissing(errno.ENOENT, f"{link} is missing: is /proc mounted?") from None


class NotRegularFile(OSError):
    """The path names a directory, FIFO, socket or device, not a file."""

    def __init__(self, is_dir: bool) -> None:
        super().__init__(errno.EISDIR if is_dir else errno.EINVAL,
                         "a directory" if is_dir else "not a regular file")
        self.is_dir = is_dir


class NotOwned(OSError):
    """As root: the file could have been written (or, a secret, read) by
    someone else; strerror says why."""


def open_regular_checked(path: str, *, enforce: bool, secret: bool = False) -> int:
    """A read-only descriptor of the regular file `path` for a root tool: the
    walk of open_path (strict when `enforce`), then the checks on an O_PATH
    descriptor (a FIFO or device is never opened), then the same inode opened
    for reading. `enforce`: root-owned, not writable by others (`secret`: not
    readable by every user either). Raises UntrustedPath, NotRegularFile,
    NotOwned or another OSError."""
    fd = open_path(path, open_last_path, strict=enforce, follow_last=True)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(stat.S_ISDIR(st.st_mode))
        why = check_owned(fd, st) if enforce else None
        if why is None and enforce and secret and st.st_mode & 0o004:
            why = f"it is a private key readable by every user (mode {st.st_mode & 0o7777:o})"
        if why is not None:
            raise NotOwned(errno.EPERM, why)
        return reopen_for_reading(fd)
    finally:
        os.close(fd)


def check_owned(fd: int, st: os.stat_result | None = None) -> str | None:
    """Why an opened file may have been written by someone else, or None: as root,
    a file must belong to root, not be writable by group/others and have one link."""
    if os.geteuid() != 0:
        return None
    st = st or os.fstat(fd)
    if st.st_uid != 0:
        return f"it is writable by someone other than root (owner uid {st.st_uid})"
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o022:
        return f"it is writable by someone other than root (mode {st.st_mode & 0o7777:o})"
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        return f"it has {st.st_nlink} hard links"
    return None
