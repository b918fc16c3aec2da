"""The host side of cgroups: where v2 is mounted, a cgroup id → its path, and a
process's cgroups read under its identity.

* `CgroupIdResolver` maps the cgroup v2 id the kernel captured
  (bpf_get_current_cgroup_id: the kernfs node id) to a path in O(1) with
  open_by_handle_at(FILEID_KERNFS) — the kernel looks the id up itself, no
  tree walk. A removed cgroup answers ESTALE and is remembered as
  unresolvable (negative cache). Where handles are not available, it falls
  back to walking the tree at most once per `rescan_interval`; since kernfs
  ids only grow, an id below the largest one seen in a walk that did not
  find it is gone for good.
* `read_process(pid)` opens /proc/PID once and reads `stat` (start time,
  field 22) and `cgroup` through that directory descriptor, so both come from
  the same process: (pid, start time) is the identity caches are keyed by.
"""

from __future__ import annotations

import collections
import ctypes
import os
import struct
import time
from pathlib import Path
from typing import Any

from tcpstates.plugins.container.layouts import CgroupInfo, classify, classify_proc, parse_proc_cgroup

__all__ = ["CgroupInfo", "classify", "classify_proc", "proc_cgroup_path", "cgroup2_root", "host_is_v1_or_hybrid",
           "CgroupIdResolver", "ProcessCgroups", "read_process"]

FILEID_KERNFS = 0xFE
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cgroup2_root(mounts_path: str = "/proc/self/mounts") -> Path | None:
    """Where cgroup v2 is mounted: /sys/fs/cgroup (unified) or .../unified (hybrid)."""
    try:
        with open(mounts_path) as f:
            mounts = f.read().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def host_is_v1_or_hybrid(self_cgroup: str = "/proc/self/cgroup") -> bool:
    """Does this host have v1 hierarchies (so the v2 id alone may not tell)?"""
    try:
        with open(self_cgroup) as f:
            _v2, v1 = parse_proc_cgroup(f.read())
    except OSError:
        return True
    return bool(v1)


class LRU(collections.OrderedDict):
    """A bounded mapping; the least recently put entry goes first."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)


class CgroupIdResolver:
    """cgroup v2 id → path relative to the v2 root; None when unresolvable."""

    def __init__(self, root: Path | None = None, *, limit: int = 16384, rescan_interval: float = 1.0,
                 use_handles: bool = True) -> None:
        self.root = root if root is not None else cgroup2_root()
        self.paths: LRU = LRU(limit)
        self.missing: LRU = LRU(limit)          # the negative cache
        self.rescan_interval = rescan_interval
        # what resolving cost (tests/test_cgroup_resolver.py): tree walks, and
        # ids asked of the kernel (open_by_handle_at); a cached answer, found
        # or unresolvable, adds to neither
        self.walks = 0
        self.handle_lookups = 0
        self._last_walk = -1e18
        self._max_seen = 0
        self._mount_fd = -1
        self._open_by_handle: Any = None
        if self.root is not None and use_handles:
            try:
                self._mount_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                libc = ctypes.CDLL(None, use_errno=True)
                self._open_by_handle = libc.open_by_handle_at
            except (OSError, AttributeError):
                self._open_by_handle = None

    def close(self) -> None:
        if self._mount_fd >= 0:
            os.close(self._mount_fd)
            self._mount_fd = -1

    def _by_handle(self, cgroup_id: int) -> str | None | bool:
        """The path, None when the cgroup is gone, False when handles do not work here."""
        self.handle_lookups += 1
        handle = ctypes.create_string_buffer(struct.pack("=IiQ", 8, FILEID_KERNFS, cgroup_id))
        fd = self._open_by_handle(self._mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            # ESTALE/ENOENT: no such cgroup (removed); anything else: no handle support
            return None if err in (116, 2) else False
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        finally:
            os.close(fd)
        root = str(self.root).rstrip("/")
        if target != root and not target.startswith(root + "/"):
            return False
        return target[len(root):] or "/"

    def _walk(self) -> None:
        self.walks += 1
        self._last_walk = time.monotonic()
        root = str(self.root)
        for dirpath, _dirs, _files in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            self._max_seen = max(self._max_seen, ino)
            self.paths.put(ino, dirpath[len(root):] or "/")

    def path(self, cgroup_id: int) -> str | None:
        if not cgroup_id or self.root is None:
            return None
        found = self.paths.get(cgroup_id)
        if found is not None:
            return found
        if cgroup_id in self.missing:
            return None
        if self._open_by_handle is not None:
            got = self._by_handle(cgroup_id)
            if got is None:
                self.missing.put(cgroup_id, True)
                return None
            if isinstance(got, str):
                self.paths.put(cgroup_id, got)
                return got
            self._open_by_handle = None         # not supported here: walk from now on
        if cgroup_id <= self._max_seen:
            # ids only grow: a walk after this id existed did not find it
            self.missing.put(cgroup_id, True)
            return None
        if time.monotonic() - self._last_walk >= self.rescan_interval:
            self._walk()
            found = self.paths.get(cgroup_id)
            if found is not None:
                return found
            if cgroup_id <= self._max_seen:
                self.missing.put(cgroup_id, True)
        return None


class ProcessCgroups:
    """One process as read through its /proc/PID directory descriptor."""

    __slots__ = ("pid", "start_ticks", "text")

    def __init__(self, pid: int, start_ticks: int, text: str) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.text = text

    @property
    def identity(self) -> tuple[int, int]:
        return (self.pid, self.start_ticks)

    def started_ns(self) -> int:
        """Start time on CLOCK_BOOTTIME, in ns."""
        return self.start_ticks * 1_000_000_000 // CLK_TCK


def _read_at(dir_fd: int, name: str, limit: int = 1 << 16) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, limit).decode("utf-8", "replace")
    finally:
        os.close(fd)


def read_process(pid: int, proc: Path = Path("/proc")) -> ProcessCgroups | None:
    """stat's start time and the cgroup text of one live process; None if it is gone."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        dir_fd = os.open(proc / str(pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None   # exited: not an error
    try:
        stat = _read_at(dir_fd, "stat")
        text = _read_at(dir_fd, "cgroup")
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    # comm (field 2) may hold spaces and parentheses: split after the last ')'
    rest = stat[stat.rfind(")") + 2:].split()
    try:
        start = int(rest[19])      # field 22 overall; field 3 is rest[0]
    except (IndexError, ValueError):
        return None
    return ProcessCgroups(pid, start, text)


def proc_cgroup_path(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The path of the most telling line of the process's /proc/PID/cgroup."""
    p = read_process(pid, proc)
    if p is None:
        return None
    info = classify_proc(p.text)
    return info.path if info is not None else None
