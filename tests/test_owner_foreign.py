"""Sockets that are not TCP but carry protocol number 6 never get an owner
entry: a netlink socket of family NETLINK_XFRM (6), which any user may open,
passes the send/recv probes' `protocol == IPPROTO_TCP` test. Its sends filled
the owner LRU (max_sockets) with entries for sockets that never change TCP
state, so an unprivileged user could evict the owners of real connections:
their later records said "unknown". The close probe had the same hole: closing
a second descriptor of such a socket made an entry (an owner letting go). So does
a raw IPPROTO_TCP socket, which any user may open in a user namespace of their own
(family AF_INET, protocol 6): the perf-event send/recv probes, which see only the
family and protocol, now read the socket's type too where BTF gives its offset.
The real CLI, a real server and client on loopback, the flood as nobody."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest
from traffic import free_port, wait_port_settled

pytestmark = pytest.mark.kernel

SERVER = r"""
import socket, sys
port = int(sys.argv[1])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(8)
print("ready", flush=True)
c, _ = ls.accept()
c.recv(10); c.sendall(b"pong")
print("served", flush=True)
sys.stdin.readline()                 # the flood is done, the client closes
assert c.recv(10) == b""             # the client's FIN: ESTABLISHED -> CLOSE_WAIT here
c.close()
print("closed", flush=True)
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.sendall(b"ping"); c.recv(10)
print("connected", flush=True)
sys.stdin.readline()
c.close()
print("closed", flush=True)
"""

# as nobody: many netlink sockets of protocol 6, each sending once
FLOOD = r"""
import os, resource, socket, sys
n = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))
held = []
for _ in range(n):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)    # NETLINK_XFRM
    for _ in range(2):         # the second send finds the entry: referenced, as a busy socket's
        try:
            s.sendto(b"\0" * 16, (0, 0))
        except OSError:
            pass                                                # refused or not: it was traced
    try:
        s.connect((0, 0))            # connected (state 1): an unconnected one reads TCP_CLOSE (7)
    except OSError:
        pass
    for _ in range(2):               # a descriptor closed while another holds it: the close probe
        os.close(os.dup(s.fileno())) # (the second close finds the entry: referenced)
    held.append(s)
print("sent", len(held), flush=True)
sys.stdin.readline()                 # held open (distinct sockets) until the test is done
"""

# as nobody, in a user and network namespace of its own (where it holds CAP_NET_RAW):
# raw sockets of protocol IPPROTO_TCP, which carry family AF_INET and protocol 6 like TCP
FLOOD_RAW = r"""
import ctypes, fcntl, os, resource, socket, struct, sys
n = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x40000000) != 0:          # CLONE_NEWUSER | CLONE_NEWNET
    print("no user namespace:", os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(0)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))
held = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    for _ in range(2):         # the second send finds the entry: referenced, as a busy socket's
        try:
            s.sendto(b"\0" * 20, ("127.0.0.1", 0))
        except OSError:
            pass               # lo is down: refused, but traced (and no packet reaches any socket)
    held.append(s)
# lo up (SIOCGIFFLAGS, SIOCSIFFLAGS | IFF_UP), so that a connect() succeeds; nothing is sent after
ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sh22x", fcntl.ioctl(ctl, 0x8913, struct.pack("16sh22x", b"lo", 0)))[1]
fcntl.ioctl(ctl, 0x8914, struct.pack("16sh22x", b"lo", flags | 1))
for s in held:
    s.connect(("127.0.0.1", 0))      # TCP_ESTABLISHED: an unconnected one reads TCP_CLOSE
    for _ in range(2):               # a descriptor closed while another holds it: the close probe
        os.close(os.dup(s.fileno()))
print("sent", len(held), flush=True)
sys.stdin.readline()                 # held open (distinct sockets) until the test is done
"""
FLOOD_SCRIPTS = {"netlink": FLOOD, "raw-in-userns": FLOOD_RAW}

FLOODS, PER_FLOOD = 4, 16384   # 64 times max_sockets
# close-only: no send/recv probes, so only the close probe could make the flood's entries
PROBES = {"raw": (), "tracepoint": ('kernel_io_probe="tracepoint", ',), "close-only": ("kernel_io=false, ",)}


@pytest.mark.parametrize("flood", sorted(FLOOD_SCRIPTS))
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_protocol_6_sockets_that_are_not_tcp_do_not_evict_owners(tracer, tmp_path, probe, flood):
    out = tmp_path / "e.jsonl"
    extra = "".join(PROBES[probe])
    t = tracer("--sink", "jsonl", "-o", f"sinks.jsonl.path={out}",
               "-o", f'chain=[{{use="owner", {extra}max_sockets=1024}}]')
    port = free_port()
    py = [sys.executable, "-c"]
    srv = subprocess.Popen([*py, SERVER, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cli = None
    floods: list[subprocess.Popen] = []
    try:
        assert srv.stdout.readline() == "ready\n"
        cli = subprocess.Popen([*py, CLIENT, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
        assert cli.stdout.readline() == "connected\n"
        assert srv.stdout.readline() == "served\n"
        # the descriptor limit (20000 here) caps one process: several, all holding theirs
        for _ in range(FLOODS):
            # the system's Python: nobody cannot reach a venv in a clone under /root (0700)
            f = subprocess.Popen([os.path.realpath(sys.executable), "-c", FLOOD_SCRIPTS[flood], str(PER_FLOOD)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
                                 user=65534, group=65534, extra_groups=[])
            floods.append(f)
            line = f.stdout.readline()
            if line.startswith("no user namespace"):
                pytest.skip(f"an unprivileged user cannot make a user namespace here ({line.strip()}): "
                            f"allow them (sysctl user.max_user_namespaces > 0) to run this case")
            assert line == f"sent {PER_FLOOD}\n"
        cli.stdin.write("\n")
        cli.stdin.flush()
        assert cli.stdout.readline() == "closed\n"
        srv.stdin.write("\n")
        srv.stdin.flush()
        assert srv.stdout.readline() == "closed\n"
        assert not wait_port_settled(port), "the connection never settled"
    finally:
        for p in (srv, cli, *floods):
            if p is not None:
                p.kill()
                p.wait()
    rc, _, err = t.stop()
    assert rc == 0, err
    recs = [r for r in (orjson.loads(line) for line in out.read_bytes().splitlines())
            if r["lport"] == port and r["rport"] != 0]
    close_wait = [r for r in recs if r["newstate"] == "CLOSE_WAIT"]
    assert len(close_wait) == 1, recs
    # the peer's FIN arrives in the client's context: only the kernel's entry names the
    # server (accept; the listener's holders, which user space falls back to when the
    # entry is gone, would name it too, as "listener")
    assert close_wait[0].get("owner_pid") == srv.pid, close_wait[0]
    assert close_wait[0].get("owner_source") in ("accept", "io"), close_wait[0]
