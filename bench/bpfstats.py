"""In-kernel cost of a tracer's BPF programs: run_cnt / run_time_ns per program.

The kernel counts these only while the sysctl kernel.bpf_stats_enabled is 1
(`enabled()` turns it on and restores the old value on exit). The counters of
a program are read from /proc/PID/fdinfo of the tracer's own program
descriptors (no bpftool needed); its name (the kernel keeps 15 characters) from
BPF_OBJ_GET_INFO_BY_FD on a descriptor opened by the program's id.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Iterator
from pathlib import Path

SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_libc = ctypes.CDLL(None, use_errno=True)


def is_on() -> bool:
    """Whether the kernel counts program run time now (whoever turned it on)."""
    try:
        return SYSCTL.read_text().strip() == "1"
    except OSError:
        return False


@contextlib.contextmanager
def enabled() -> Iterator[bool]:
    """Turn the statistics on for the block; yields False when that is not possible."""
    try:
        old = SYSCTL.read_text().strip()
        SYSCTL.write_text("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        SYSCTL.write_text(old)      # the stats cost every program run host-wide ~75 ns on the test VM: never leave them on


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    return _libc.syscall(_NR_BPF, cmd, attr, len(attr))


def prog_name(prog_id: int) -> str:
    """The program's kernel name, or '?' when it cannot be read."""
    if _NR_BPF is None:
        return "?"
    attr = ctypes.create_string_buffer(struct.pack("<IIII", prog_id, 0, 0, 0), 16)
    fd = _bpf(_BPF_PROG_GET_FD_BY_ID, attr)
    if fd < 0:
        return "?"
    try:
        info = ctypes.create_string_buffer(96)
        attr = ctypes.create_string_buffer(struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)), 16)
        if _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr) < 0:
            return "?"
        return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")   # bpf_prog_info.name
    finally:
        os.close(fd)


def snapshot(pid: int) -> dict[int, tuple[int, int]]:
    """prog id -> (run_cnt, run_time_ns) for every BPF program descriptor of pid."""
    out: dict[int, tuple[int, int]] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd) != "anon_inode:bpf-prog":
                continue
            fields = dict(line.split(":", 1) for line in
                          Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines() if ":" in line)
        except OSError:
            continue        # closed meanwhile
        if "prog_id" in fields and "run_cnt" in fields:
            out[int(fields["prog_id"])] = (int(fields["run_cnt"]), int(fields["run_time_ns"]))
    return out


def delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> list[dict]:
    """Per program over the interval: name, id, runs, ns per run (sorted by runs)."""
    rows = []
    for pid_, (cnt, ns) in after.items():
        c0, n0 = before.get(pid_, (0, 0))
        runs, took = cnt - c0, ns - n0
        rows.append({"prog": prog_name(pid_), "id": pid_, "runs": runs, "ns": took,
                     "ns_per_run": round(took / runs, 1) if runs else None})
    return sorted(rows, key=lambda r: -r["runs"])
