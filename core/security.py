"""Running as root safely: no imports from the working directory, no plugins
or configs others could have written, and dropping root once attached."""

from __future__ import annotations

import ctypes
import os
import pwd
import sys
from pathlib import Path

from tcpstates.errors import UsageError

PR_SET_DUMPABLE = 4


def sanitize_sys_path() -> None:
    """`python -m` puts the working directory first on sys.path; a root tool
    must not import (or find entry points in) whatever lies there."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]


def writable_by_others(path: Path) -> Path | None:
    """The first of `path` and its parents that someone other than root can
    modify (sticky directories such as /tmp excepted for their children), or None."""
    p = path.resolve()
    chain = [p, *p.parents]
    for i, q in enumerate(chain):
        try:
            st = q.stat()
        except OSError:
            continue
        if st.st_uid != 0:
            return q
        if st.st_mode & 0o022:
            sticky = st.st_mode & 0o1000
            # a sticky world-writable dir (/tmp) protects entries owned by root
            if not (sticky and i > 0 and chain[i - 1].stat().st_uid == 0):
                return q
    return None


def check_plugin_file(path: Path, what: str, allow: bool) -> None:
    if os.geteuid() != 0 or allow:
        return
    bad = writable_by_others(path)
    if bad is not None:
        raise UsageError(f"{what}: refusing to load {path} as root because {bad} is writable by "
                         f"someone other than root; fix its ownership/mode or pass --allow-insecure-plugins")


def drop_privileges(user: str) -> None:
    """Become `user` (and its primary group), keeping open fds and mappings."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--user {user}: no such user") from None
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise UsageError(f"--user {user}: could not drop root")
    # setuid clears "dumpable", which makes /proc/self/fdinfo unreadable to
    # ourselves; we read the kernel's recursion-miss counter there
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
