"""Every benchmark run in a network namespace of its own: the same TIME_WAIT state.

A loopback connection closed by its client leaves a TIME_WAIT socket for 60 s,
and a network namespace keeps at most net.ipv4.tcp_max_tw_buckets of them
(131072 here); past that a close leaves none. Below that cap this VM's
untraced connect load ran at ~14,400 connections/s, at the cap at ~25,400
(bench/README.md, "TIME_WAIT, not the VM"): so the runs of one benchmark,
each adding ~30,000 TIME_WAIT sockets to the same namespace, changed speed
1.8x as soon as the earlier runs had filled it, and a traced run could be
compared with an untraced one made in the other state. Each run here gets a
fresh namespace (loopback up, nothing left by earlier runs), which the
tracer and the load share, as on a host (the tracer's own namespace is the
load's: its listener look-ups in /proc see the load's sockets).

`time_wait = "none"` also sets tcp_max_tw_buckets to 0 in that namespace: no
close leaves a TIME_WAIT, as on a host whose table is full — the cheapest
connections, so the tracer's share of each is at its largest.

A new namespace has the kernel's defaults for its per-namespace settings (the
ephemeral port range, somaxconn, tcp_* sysctls, loopback's RPS mask), not the
host's: a tuned host measures differently with `host`. The tracepoint and the
truth count see every namespace: a port is chosen free in the host's too
(`host_port_in_use`). Tearing the previous namespace down (its ~14,400
TIME_WAIT sockets purged on a kernel worker) overlaps the next run's start;
the untraced rates of fresh namespaces were within 0.5 % of a run in the
host's namespace with an empty table (results-2026-12-04-time-wait.txt).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from pathlib import Path

from portstate import row_ports, tcp_rows

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
TW_BUCKETS = Path("/proc/sys/net/ipv4/tcp_max_tw_buckets")
MODES = ("fresh", "none", "host")
_libc = ctypes.CDLL(None, use_errno=True)


def enter_fresh(mode: str) -> None:
    """Move this process (and so every process it starts afterwards) into a new
    network namespace with loopback up; mode "none": no TIME_WAIT in it.
    mode "host": stay where it is (the TIME_WAIT state is then whatever the
    host's is). Raises OSError when the kernel refuses."""
    if mode == "host":
        return
    if mode not in MODES:
        raise ValueError(f"time-wait mode {mode!r}: one of {', '.join(MODES)}")
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    with socket.socket() as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    if mode == "none":
        TW_BUCKETS.write_text("0")      # this namespace's own setting; the host's is untouched


def host_port_in_use(port: int) -> bool:
    """Does any socket of the host's namespace (PID 1's) use `port`, locally or
    as its peer's? (False where that namespace cannot be read.)"""
    return any(port in row_ports(f) for f in tcp_rows("/proc/1/net"))


def time_wait_count() -> int:
    """TIME_WAIT sockets of this namespace now (its /proc/net/tcp and tcp6)."""
    return sum(1 for f in tcp_rows("/proc/net") if f[3:4] == ["06"])   # TCP_TIME_WAIT
