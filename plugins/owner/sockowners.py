"""Who owns which TCP socket right now, from the kernel's own tables (as `ss -p`).

Used once at start so sockets that existed before tracing get an owner:
/proc/net/tcp{,6} gives each socket's 4-tuple and inode, /proc/PID/fd gives
which process holds that inode.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

Tuple4 = tuple[int, str, int, str, int]   # family, laddr, lport, raddr, rport
LISTEN_STATE = 0x0A


def _addr(hexaddr: str, family: int) -> str:
    raw = bytes.fromhex(hexaddr)
    # the kernel prints each 32-bit word in host order
    words = struct.unpack("<" + "I" * (len(raw) // 4), raw)
    return socket.inet_ntop(family, struct.pack(">" + "I" * len(words), *words))


def tcp_sockets(proc: Path = Path("/proc")) -> dict[int, tuple[Tuple4, int]]:
    """inode → (4-tuple, state) for every TCP socket in this network namespace."""
    out: dict[int, tuple[Tuple4, int]] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            (la, lp), (ra, rp) = f[1].split(":"), f[2].split(":")
            inode = int(f[9])
            if inode:
                out[inode] = ((family, _addr(la, family), int(lp, 16), _addr(ra, family), int(rp, 16)),
                              int(f[3], 16))
    return out


def socket_holders(proc: Path = Path("/proc")) -> dict[int, int]:
    """socket inode → PID holding it (the lowest PID when several share it)."""
    holders: dict[int, int] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = os.scandir(f"{proc}/{pid}/fd")
        except OSError:
            continue        # exited, or not ours to read
        with fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if inode not in holders or pid < holders[inode]:
                        holders[inode] = pid
    return holders


def process_comm(pid: int, proc: Path = Path("/proc")) -> str | None:
    # raw but bounded: a name is any 15 bytes its owner chose (not UTF-8, control
    # characters); outputs escape it (tcpstates.text.escape_text)
    try:
        with open(proc / str(pid) / "comm", "rb") as f:
            raw = f.read(64)
    except OSError:
        return None
    return raw.rstrip(b"\n").decode("utf-8", "surrogateescape")


def snapshot(proc: Path = Path("/proc")) -> tuple[dict[Tuple4, int], dict[tuple[int, str, int], int]]:
    """(4-tuple → owner PID, listening (family, laddr, lport) → owner PID)."""
    sockets = tcp_sockets(proc)
    holders = socket_holders(proc)
    by_tuple: dict[Tuple4, int] = {}
    listeners: dict[tuple[int, str, int], int] = {}
    for inode, (t4, state) in sockets.items():
        pid = holders.get(inode)
        if pid is None:
            continue
        by_tuple[t4] = pid
        if state == LISTEN_STATE:
            listeners[(t4[0], t4[1], t4[2])] = pid
    return by_tuple, listeners
