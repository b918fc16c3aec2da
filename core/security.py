"""Running as root safely: no imports from the working directory, no plugins
or configs others could have written, and dropping root once attached."""

from __future__ import annotations

import ctypes
import os
import pwd
import stat
import sys
from pathlib import Path

from tcpstates.errors import UsageError
from tcpstates.text import escape_text

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


def open_checked_file(path: str, what: str, *, secret: bool = False) -> int:
    """A read-only descriptor of the regular file `path` (a CA bundle, a
    certificate, a key), checked on that descriptor: as root every directory
    and link on the way must be unchangeable by others and the file root's and
    not writable by others (`secret`: not readable by every user either). A
    FIFO or device is refused, never waited on. Raises UsageError (one line)."""
    from tcpstates.safeopen import NotOwned, NotRegularFile, UntrustedPath, open_regular_checked

    shown = escape_text(path)
    try:
        return open_regular_checked(path, enforce=os.geteuid() == 0, secret=secret)
    except UntrustedPath as exc:
        raise UsageError(f"{what}: refusing to read {shown} as root because {escape_text(exc.strerror)}; "
                         f"keep it where only root can change it") from None
    except NotRegularFile:
        raise UsageError(f"{what}: {shown} is not a regular file (a directory, FIFO, socket or "
                         f"device); give the path of a file") from None
    except NotOwned as exc:
        raise UsageError(f"{what}: refusing to read {shown} as root because {exc.strerror}; fix it with "
                         f"'chown root {shown} && chmod go-w{',o-r' if secret else ''} {shown}'") from None
    except OSError as exc:
        raise UsageError(f"{what}: cannot open {shown} ({escape_text(exc.strerror)}); check the path") from None


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {st.st_mode & 0o7777:o}"


def untrusted_in_tree(root: Path, recursive: bool = True) -> tuple[Path, str] | None:
    """The first directory or file under `root` (itself included; lstat, links
    not followed) that someone other than root owns or may write, with why.

    Python imports whatever lies in a package: submodules the entry module
    imports and the bytecode in __pycache__ it prefers over the source. A
    symbolic link counts as trusted only when it is root's and its target (with
    the target's parents, and everything under a target directory) is too."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                return path, f"a symbolic link owned by uid {st.st_uid}"
            target = path.resolve()
            bad = writable_by_others(target)
            if bad is not None:
                return path, f"a symbolic link to {target}, and {bad} is writable by others"
            try:
                if target.is_dir() and recursive:
                    stack.append(target)
            except OSError:
                pass
            continue
        if st.st_uid != 0 or st.st_mode & 0o022:
            return path, _describe(st)
        if stat.S_ISDIR(st.st_mode) and recursive:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            try:
                stack.extend(sorted(path.iterdir(), reverse=True))
            except OSError as exc:
                return path, f"cannot be listed ({exc.strerror})"
    return None


def check_plugin_tree(root: Path, what: str, allow: bool, recursive: bool = True) -> None:
    """Everything an import of the plugin's top-level package (or module) may run."""
    if os.geteuid() != 0 or allow:
        return
    bad = untrusted_in_tree(root, recursive)
    if bad is not None:
        path, why = bad
        raise UsageError(f"{what}: refusing to load it as root because {path} could have been written by "
                         f"someone other than root ({why}); make it root's and not writable by group/others "
                         f"(or remove it, e.g. a stale __pycache__), or pass --allow-insecure-plugins")


def lookup_user(user: str) -> pwd.struct_passwd:
    """The account --user names, or UsageError: asked before anything is
    opened or printed, so a typo leaves no header and no empty files."""
    if not user:
        raise UsageError("--user: empty name")
    try:
        pw = pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise UsageError(f"--user {escape_text(user)}: no such user; give an existing account "
                         f"(e.g. nobody)") from None
    if pw.pw_uid == 0:
        # the drop would "succeed" as root and then be refused after the outputs
        # were opened and written to
        raise UsageError(f"--user {escape_text(user)}: is root (uid 0); give an unprivileged "
                         f"account (e.g. nobody)")
    euid = os.geteuid()
    if euid != 0 and pw.pw_uid != euid:
        # only root may switch users: setgroups() would fail after the start
        raise UsageError(f"--user {escape_text(user)}: only root can switch to another user "
                         f"(running as uid {euid}); run as root or leave --user out")
    return pw


def drop_privileges(user: str) -> None:
    """Become `user` (and its primary group), keeping open fds and mappings.
    Not root (lookup_user let it through): already that user, nothing to do."""
    pw = lookup_user(user)
    if os.geteuid() != 0:
        return
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise UsageError(f"--user {escape_text(user)}: could not drop root")
    # setuid cleared "dumpable" and it stays cleared: a dumpable process may be
    # ptraced (or its descriptors taken with pidfd_getfd, its memory written
    # through /proc/PID/mem) by every other process of that user, which would
    # then hold our BPF objects, append to the root-owned outputs and make the
    # privileged opener rotate them away. What we read of our own /proc entry
    # (the program's fdinfo) was opened before the drop. Cleared explicitly:
    # with fs.suid_dumpable = 1 setuid leaves it set.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise UsageError(f"--user {escape_text(user)}: could not make the process non-dumpable")
