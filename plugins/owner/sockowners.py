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

from tcpstates.plugins.owner import diag

Tuple4 = tuple[int, str, int, str, int]   # family, laddr, lport, raddr, rport
LISTEN_STATE = 0x0A
PROC = Path("/proc")


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


def socket_holders(proc: Path = Path("/proc"), inodes: set[int] | None = None) -> dict[int, set[int]]:
    """socket inode → every PID holding it (only `inodes` when given)."""
    holders: dict[int, set[int]] = {}
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
                    if inodes is None or inode in inodes:
                        holders.setdefault(inode, set()).add(pid)
    return holders


CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 10**9 // CLK_TCK


def process_identity(pid: int, proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, comm) of a live process, from one
    read of /proc/PID/stat: PID + start time is its identity (PIDs are reused)."""
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    head, _, rest = raw.rpartition(b")")
    fields = rest.split()
    if len(fields) < 20 or b"(" not in head:
        return None
    comm = head.split(b"(", 1)[1].decode("utf-8", "replace")
    return int(fields[19]), comm


Holder = tuple[int, int, str]   # pid, start ticks, comm


def _identities(pids: set[int], proc: Path) -> list[Holder]:
    out = []
    for pid in sorted(pids):
        ident = process_identity(pid, proc)
        if ident is not None:
            out.append((pid, ident[0], ident[1]))
    return out


def snapshot(proc: Path = Path("/proc")) -> dict[Tuple4, list[Holder]]:
    """4-tuple → the processes holding that (non-listening) socket now."""
    sockets = tcp_sockets(proc)
    holders = socket_holders(proc)
    return {t4: _identities(holders[inode], proc) for inode, (t4, state) in sockets.items()
            if state != LISTEN_STATE and inode in holders}


def listener_holders(port: int, proc: Path = Path("/proc")) -> dict[tuple[int, str], list[Holder]]:
    """(family, local address) → processes holding a socket listening on `port`
    (several for a pre-fork server or an SO_REUSEPORT group)."""
    # sock_diag answers with listeners only; /proc/net/tcp lists every socket
    # (a storm's TIME_WAIT too), so it is only the fallback
    inodes = diag.listeners(port) if proc == PROC else None
    if inodes is None:
        inodes = {inode: (t4[0], t4[1]) for inode, (t4, state) in tcp_sockets(proc).items()
                  if state == LISTEN_STATE and t4[2] == port}
    if not inodes:
        return {}
    by_addr: dict[tuple[int, str], set[int]] = {}
    for inode, pids in socket_holders(proc, set(inodes)).items():
        by_addr.setdefault(inodes[inode], set()).update(pids)
    return {key: _identities(pids, proc) for key, pids in by_addr.items()}
