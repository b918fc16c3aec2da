"""The few bpf(2) and perf calls the reader needs, without bcc.

The tracer process never loads bcc (see loader.py): it reads the ring
buffer and perf buffers through their memory mappings and needs the
syscall only to read the per-CPU drop counter.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

BPF_MAP_LOOKUP_ELEM = 1
SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
           "riscv64": 280, "i686": 357}.get(platform.machine(), 321)
_libc = ctypes.CDLL(None, use_errno=True)


def possible_cpus() -> int:
    """Per-CPU map values come in one slot per *possible* CPU."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes:
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value_size)
    # union bpf_attr for map element commands: u32 map_fd, (pad), u64 key, u64 value, u64 flags
    attr = struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value_buf), 0)
    attr_buf = ctypes.create_string_buffer(attr, len(attr))
    if _libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_ELEM, attr_buf, len(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(BPF_MAP_LOOKUP_ELEM): {os.strerror(err)}")
    return value_buf.raw


class PerCpuCounter:
    """A BPF_MAP_TYPE_PERCPU_ARRAY of one u64: the sum over CPUs."""

    def __init__(self, map_fd: int) -> None:
        self.fd = map_fd
        self.ncpu = possible_cpus()

    def total(self) -> int:
        raw = map_lookup(self.fd, struct.pack("<I", 0), 8 * self.ncpu)
        return sum(struct.unpack(f"<{self.ncpu}Q", raw))
