"""Listening TCP sockets from the kernel's sock_diag netlink interface (as `ss -lt`).

The kernel filters by state, so the answer holds only listeners: its cost does
not grow with the host's connections. /proc/net/tcp lists every socket (tens
of thousands of TIME_WAIT entries during a connection storm, hundreds of ms to
parse); the owner enricher asks for listeners often, so it asks here first.
"""

from __future__ import annotations

import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_NLMSG = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes)
_REQ = struct.Struct("=BBBxI48x")
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport big-endian,
# src[16], dst[16], if, cookie[2]), expires, rqueue, wqueue, uid, inode
_MSG_SRC = 8
_MSG_INODE = 68
_U32 = struct.Struct("=I")


def listeners(port: int) -> dict[int, tuple[int, str]] | None:
    """inode → (family, local address) of every TCP socket listening on `port`
    in this network namespace, or None when sock_diag is not available."""
    out: dict[int, tuple[int, str]] = {}
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except OSError:
        return None
    with sock:
        sock.settimeout(2.0)      # the kernel answers at once; never hang a batch
        for family in (socket.AF_INET, socket.AF_INET6):
            body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
            try:
                sock.send(_NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY,
                                      NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
                if not _collect(sock, family, port, out):
                    return None
            except OSError:
                return None
    return out


def _collect(sock: socket.socket, family: int, port: int, out: dict[int, tuple[int, str]]) -> bool:
    alen = 4 if family == socket.AF_INET else 16
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                return False
            if kind == NLMSG_DONE:
                return True
            if kind == NLMSG_ERROR:
                return False
            if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSG.size + _MSG_INODE + 4:
                body = off + _NLMSG.size
                fam = data[body]
                sport = int.from_bytes(data[body + 4:body + 6], "big")
                if sport == port and fam == family:
                    addr = socket.inet_ntop(fam, data[body + _MSG_SRC:body + _MSG_SRC + alen])
                    inode = _U32.unpack_from(data, body + _MSG_INODE)[0]
                    if inode:
                        out[inode] = (fam, addr)
            off += (length + 3) & ~3
        if not data:
            return False


__all__ = ["listeners"]
