"""Who owns which TCP socket right now, from the kernel's own tables (as `ss -p`).

Used once at start so sockets that existed before tracing get an owner:
/proc/net/tcp{,6} gives each socket's 4-tuple and inode, /proc/PID/fd gives
which process holds that inode. And for listeners (who holds the socket a
connection is queued on), kept current by PortHolders.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Mapping
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


def _pids(proc: Path) -> set[int]:
    return {int(entry.name) for entry in os.scandir(proc) if entry.name.isdigit()}


def _held(proc: Path, pid: int, inodes: set[int] | None) -> dict[int, int] | None:
    """The socket inodes (only `inodes` when given) process `pid` holds, each
    with one fd number that holds it; None when its fd table cannot be read
    (exited, or not ours to read)."""
    try:
        fds = os.scandir(f"{proc}/{pid}/fd")
    except OSError:
        return None
    held: dict[int, int] = {}
    with fds:
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if (inodes is None or inode in inodes) and inode not in held:
                    held[inode] = int(fd.name)
    return held


def _still_held(proc: Path, pid: int, mine: dict[int, int]) -> bool:
    """Does `pid` still hold each inode at the fd it was found at? One
    readlink per inode instead of reading the whole fd table (a busy
    server's holds thousands of connections)."""
    for inode, fd in mine.items():
        try:
            if os.readlink(f"{proc}/{pid}/fd/{fd}") != f"socket:[{inode}]":
                return False
        except OSError:
            return False
    return True


def socket_holders(proc: Path = Path("/proc"), inodes: set[int] | None = None) -> dict[int, set[int]]:
    """socket inode → every PID holding it (only `inodes` when given)."""
    holders: dict[int, set[int]] = {}
    for pid in _pids(proc):
        for inode in _held(proc, pid, inodes) or ():
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
    if fields[0] in (b"Z", b"X"):
        # exited, not yet reaped: its PID and start time are still shown, but
        # it is not live (it holds no files, and an owner that is a zombie
        # has left its sockets to whoever inherited them)
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


# a holder found at start: pid, start ticks, comm, and where it held the socket
# (inode, one fd number holding it) so that a later use can check it still does
SnapHolder = tuple[int, int, str, int, int]


def snapshot(proc: Path = Path("/proc")) -> dict[Tuple4, list[SnapHolder]]:
    """4-tuple → the processes holding that (non-listening) socket now."""
    sockets = tcp_sockets(proc)
    held: dict[int, dict[int, int]] = {}       # inode → pid → an fd holding it
    for pid in _pids(proc):
        for inode, fd in (_held(proc, pid, None) or {}).items():
            held.setdefault(inode, {})[pid] = fd
    out: dict[Tuple4, list[SnapHolder]] = {}
    for inode, (t4, state) in sockets.items():
        if state == LISTEN_STATE or inode not in held:
            continue
        fds = held[inode]
        out[t4] = [(pid, start, comm, inode, fds[pid]) for pid, start, comm in _identities(set(fds), proc)]
    return out


def still_alive(holders: list[SnapHolder], proc: Path = Path("/proc")) -> list[Holder]:
    """The snapshot's holders of one socket that are still alive (the same PID
    and start time). One that exited since (after a fork left the socket to a
    child) must not be named for it; who holds it instead is not known here.
    A holder that closed its descriptor while another process holds the socket
    (a hand-off) is seen by the kernel's close probe, whose record then names
    no one: this list is not consulted. Its fd is not read again here: the
    record is handled after the event, and a holder that closes the socket in
    answer to the event (the usual end of a connection) held it at the event."""
    out = []
    for pid, start, comm, _inode, _fd in holders:
        ident = process_identity(pid, proc)
        if ident is not None and ident[0] == start:
            out.append((pid, start, comm))
    return out


def _listener_inodes(port: int, proc: Path) -> dict[int, tuple[int, str]]:
    """inode → (family, local address) of the sockets listening on `port`."""
    # sock_diag answers with listeners only; /proc/net/tcp lists every socket
    # (a storm's TIME_WAIT too), so it is only the fallback
    inodes = diag.listeners(port) if proc == PROC else None
    if inodes is None:
        inodes = {inode: (t4[0], t4[1]) for inode, (t4, state) in tcp_sockets(proc).items()
                  if state == LISTEN_STATE and t4[2] == port}
    return inodes


def _by_addr(inodes: dict[int, tuple[int, str]], held: Mapping[int, Iterable[int]],
             proc: Path) -> dict[tuple[int, str], list[Holder]]:
    by_addr: dict[tuple[int, str], set[int]] = {}
    for pid, mine in held.items():
        for inode in mine:
            by_addr.setdefault(inodes[inode], set()).add(pid)
    return {key: _identities(pids, proc) for key, pids in by_addr.items()}


def listener_holders(port: int, proc: Path = Path("/proc")) -> dict[tuple[int, str], list[Holder]]:
    """(family, local address) → processes holding a socket listening on `port`
    (several for a pre-fork server or an SO_REUSEPORT group)."""
    inodes = _listener_inodes(port, proc)
    if not inodes:
        return {}
    held: dict[int, set[int]] = {}
    for inode, pids in socket_holders(proc, set(inodes)).items():
        for pid in pids:
            held.setdefault(pid, set()).add(inode)
    return _by_addr(inodes, held, proc)


class PortHolders:
    """listener_holders(port), kept current without reading every process's fd
    table each time (that read is most of a look-up's cost).

    A full read happens first, whenever the port's listening sockets change
    (sock_diag gives their inodes, cheaply), and at least every `full_every`
    seconds. In between only the fd tables that can have changed the answer
    are read: the processes that appeared since the last look-up (a fork
    inherits the listener; a new server binds it) and a current holder whose
    fd no longer holds the listener (checked with one readlink of the fd it
    was found at: a busy server's table of thousands of connections is not
    read every time). Processes that are gone are dropped, and every
    holder's identity (start time) is read again, so a reused PID never keeps
    an old holder's place. What the partial read cannot see — an existing
    process that was handed the listener (SCM_RIGHTS, pidfd_getfd) — is seen
    at the next full read, or at once when that process accepts: the caller
    then calls invalidate()."""

    def __init__(self, port: int, full_every: float, proc: Path = PROC) -> None:
        self.port, self.full_every, self.proc = port, full_every, proc
        self.inodes: dict[int, tuple[int, str]] = {}
        self.pids: set[int] = set()          # the processes that existed at the last look-up
        # holder PID → the port's listener inodes it holds, each with an fd holding it
        self.held: dict[int, dict[int, int]] = {}
        self.full_at: float | None = None

    def invalidate(self) -> None:
        self.full_at = None

    def lookup(self, now: float) -> dict[tuple[int, str], list[Holder]]:
        """(family, address) → the listener's holders now (see the class)."""
        inodes = _listener_inodes(self.port, self.proc)
        # the process list before the fd tables: a process born after this
        # listing is new at the next look-up, so it is read then
        pids = _pids(self.proc)
        if self.full_at is None or now - self.full_at >= self.full_every or inodes != self.inodes:
            scan, self.held, self.full_at = pids, {}, now
        else:
            self.held = {pid: mine for pid, mine in self.held.items() if pid in pids}
            # a holder that still has each listener where it was needs no
            # reading of its fd table; one that moved or closed it is read whole
            kept = {pid for pid, mine in self.held.items() if _still_held(self.proc, pid, mine)}
            scan = (pids - self.pids) | (set(self.held) - kept)
        self.inodes, self.pids = inodes, pids
        if not inodes:
            self.held = {}
            return {}
        wanted = set(inodes)
        for pid in scan:
            mine = _held(self.proc, pid, wanted)
            if mine:
                self.held[pid] = mine
            else:
                self.held.pop(pid, None)
        return _by_addr(inodes, self.held, self.proc)
