"""Owner never confidently wrong where the process that had the socket let it go,
or where the socket is in another network namespace — on the real kernel.

Each test runs the real CLI in a subprocess and a real process tree on
loopback, on its own port, and judges every event of that port:

* a forking server (inetd, sshd: the parent accepts, forks, closes its copy)
  and a dispatcher handing the socket to a worker over SCM_RIGHTS and closing
  its copy, with the client's FIN arriving before the child/worker touched the
  socket: `ESTABLISHED->CLOSE_WAIT` must not name the parent/dispatcher (it no
  longer holds the socket); the child's/worker's close names it;
* a host process listening on 0.0.0.0:P and a process in its own network
  namespace listening on 127.0.0.1:P: the namespace's connections, still in
  its accept queue, must not be named after the host's listener (tcpstates
  reads listeners of its own namespace only); a connection to the host
  listener still is;
* a socket from before tracing whose holder at the start (tcpstates' /proc
  snapshot) exited after a fork, or handed it over SCM_RIGHTS and closed its
  copy: the FIN must not name that first holder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import orjson
import pytest
from traffic import free_port, wait_port_settled

pytestmark = pytest.mark.kernel
N = 20
PRE_ACCEPT = {("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")}

# The server tree: the main process is the client too (client-side records are
# not judged: only lport == P, the server's sockets). Per connection it
# accepts, gives the socket to a child (fork) or a worker (SCM_RIGHTS), closes
# its own copy, and only then sends and closes the client side: the FIN
# reaches a socket its accepter no longer holds and its holder has not used.
# The holder then reads, closes and says `served <pid> <client port>`.
LET_GO = r"""
import array, os, socket, sys
port, mode, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(16)
def say(*w):
    os.write(1, (" ".join(map(str, w)) + "\n").encode())
def serve(s, go):
    os.read(go, 1)                       # not before the client's FIN is in
    peer = s.getpeername()[1]
    s.recv(16); s.close()
    say("served", os.getpid(), peer)
if mode == "scm":
    a, b = socket.socketpair(socket.AF_UNIX)
    go_r, go_w = os.pipe()
    worker = os.fork()
    if worker == 0:
        ls.close(); a.close(); os.close(go_w)
        for _ in range(n):
            _, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
            serve(socket.socket(fileno=array.array("i", anc[0][2])[0]), go_r)
        os._exit(0)
    say("accepter", os.getpid())
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = ls.accept()
    if mode == "fork":
        go_r, go_w = os.pipe()
        child = os.fork()
        if child == 0:
            ls.close(); c.close(); os.close(go_w)
            serve(s, go_r)
            os._exit(0)
        os.close(go_r)
    else:
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
    s.close()                             # the accepter lets go
    c.sendall(b"hello"); c.close()        # FIN: ESTABLISHED->CLOSE_WAIT on the server side
    os.write(go_w, b"g")
    if mode == "fork":
        os.close(go_w); os.waitpid(child, 0)
if mode == "scm":
    os.waitpid(worker, 0)
say("done")
"""


def _run(code: str, *args: str, timeout: float = 60) -> list[list[str]]:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=timeout, start_new_session=True)
    assert p.returncode == 0, p.stderr
    return [line.split() for line in p.stdout.splitlines()]


def _records(t, out, port: int) -> list[dict]:
    rc, _, err = t.stop()
    assert rc == 0, err
    return [r for r in map(orjson.loads, out.read_bytes().splitlines()) if r["lport"] == port]


# "separate": the accept and close probes read each kernel member on their own
# (TCPSTATES_TEST_SEPARATE_READS), as where this kernel's neighbours are parted
@pytest.mark.parametrize("mode,reads", [("fork", "combined"), ("scm", "combined"), ("scm", "separate")])
def test_accepter_that_let_go_is_never_named(tracer, tmp_path, mode, reads):
    port = free_port()
    out = tmp_path / "e.jsonl"
    env = {"TCPSTATES_TEST_SEPARATE_READS": "1" if reads == "separate" else "0"}   # "0": not inherited
    t = tracer("--sink", "jsonl", "-o", f"sinks.jsonl.path={out}", env=env)
    lines = _run(LET_GO, str(port), mode, str(N))
    assert not wait_port_settled(port), "the connections never settled"
    recs = _records(t, out, port)
    served = {int(w[2]): int(w[1]) for w in lines if w[0] == "served"}
    assert len(served) == N, lines
    holders = set(served.values())
    accepter = {r["owner_pid"] for r in recs if r["oldstate"] == "CLOSE" and r["newstate"] == "LISTEN"}
    assert len(accepter) == 1, recs
    fins = [r for r in recs if (r["oldstate"], r["newstate"]) == ("ESTABLISHED", "CLOSE_WAIT")]
    closes = [r for r in recs if (r["oldstate"], r["newstate"]) == ("CLOSE_WAIT", "LAST_ACK")]
    assert len(fins) == N and len(closes) == N, recs
    wrong = [r for r in fins if r["owner_pid"] is not None and r["owner_pid"] != served[r["rport"]]]
    # the accepter closed its copy before the FIN: never named for it
    assert not wrong, (accepter, wrong[:3])
    # nobody had used the socket yet: who holds it is not known to the kernel
    assert all(r["owner_source"] == "unknown" for r in fins), fins[:3]
    # the holder's own close names it
    assert all(r["owner_pid"] == served[r["rport"]] for r in closes), closes[:3]
    assert holders.isdisjoint(accepter)


# A process in a network namespace of its own (unshare(CLONE_NEWNET), loopback
# brought up with an ioctl): it listens on 127.0.0.1:P, connects N times and
# lets each connection sit in the accept queue until the tracer could see it.
NETNS = r"""
import ctypes, fcntl, os, socket, struct, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:      # CLONE_NEWNET
    sys.exit("unshare: " + os.strerror(ctypes.get_errno()))
s = socket.socket()
flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))                            # SIOCSIFFLAGS: up
s.close()
ls = socket.socket(); ls.bind(("127.0.0.1", port)); ls.listen(n)
print("netns", os.getpid(), os.readlink("/proc/self/ns/net"), flush=True)
clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
for _ in range(n):
    a, _ = ls.accept(); a.send(b"x"); a.close()
for c in clients:
    c.recv(1); c.close()
"""


def _listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(8)
    return s


def test_connection_in_another_netns_is_not_named_after_this_netns_listener(tracer, tmp_path):
    port = free_port()
    out = tmp_path / "e.jsonl"
    host = _listener(port)            # held by this process alone: "listener" names it
    try:
        t = tracer("--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
        lines = _run(NETNS, str(port), str(N))
        assert lines[0][0] == "netns" and lines[0][2] != os.readlink("/proc/self/ns/net"), lines
        # one connection to this namespace's listener, queued until accepted
        with socket.create_connection(("127.0.0.1", port)) as c:
            home_port = c.getsockname()[1]
            a, _ = host.accept()
            a.close()
        assert not wait_port_settled(port), "the connections never settled"
        recs = _records(t, out, port)
    finally:
        host.close()
    me = os.getpid()
    queued = [r for r in recs if (r["oldstate"], r["newstate"]) in PRE_ACCEPT]
    in_netns = [r for r in queued if r["rport"] != home_port]
    at_home = [r for r in queued if r["rport"] == home_port]
    assert len(in_netns) == 2 * N, queued
    # never this namespace's listener for the other namespace's connections
    assert not [r for r in in_netns if r["owner_pid"] == me], in_netns[:3]
    assert all(r["owner_source"] == "unknown" for r in in_netns), in_netns[:3]
    # this namespace's own queued connection still gets its listener
    assert len(at_home) == 2 and all((r["owner_pid"], r["owner_source"]) == (me, "listener")
                                     for r in at_home), at_home



# Before the tracer starts: S accepts a connection from the main process's
# client socket and holds it (tcpstates' start-up snapshot names S, "proc").
# On "go": S hands it on — fork: forks W and exits; scm: sends it to a waiting
# W over SCM_RIGHTS and closes its copy. On "fin" the client closes (the FIN:
# ESTABLISHED->CLOSE_WAIT, nobody's I/O seen since the start), then W closes.
PREEXISTING = r"""
import array, os, socket, sys
port, mode = int(sys.argv[1]), sys.argv[2]
def say(*w):
    os.write(1, (" ".join(map(str, w)) + "\n").encode())
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(4)
a, b = socket.socketpair(socket.AF_UNIX)
go_r, go_w = os.pipe()
done_r, done_w = os.pipe()
c = socket.create_connection(("127.0.0.1", port))
def worker(s):
    os.read(go_r, 1)                    # after the FIN
    s.close(); say("W", os.getpid()); os._exit(0)
if mode == "scm" and os.fork() == 0:
    c.close(); ls.close()               # only the main process holds the client side
    _, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
    worker(socket.socket(fileno=array.array("i", anc[0][2])[0]))
spid = os.fork()
if spid == 0:
    c.close()
    s, _ = ls.accept(); ls.close()
    say("S", os.getpid())
    os.read(0, 3)                       # "go": the tracer is up
    if mode == "fork":
        if os.fork() == 0:
            worker(s)
        os.write(done_w, b"d"); os._exit(0)     # S exits; W holds the socket
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
    s.close()                           # S lets go, W holds the socket
    os.write(done_w, b"d"); os.read(go_r, 1); os._exit(0)
ls.close()
os.read(done_r, 1)
if mode == "fork":
    # S's exit closes its files only after its write: until it is reaped, it
    # may still hold the socket, and W's close would not be the last one
    # (S's exit would then close it, rightly named as the closer)
    os.waitpid(spid, 0)
say("handed")
os.read(0, 4)                           # "fin"
c.close()
os.write(go_w, b"gg")
"""


@pytest.mark.parametrize("mode", ["fork", "scm"])
def test_socket_from_before_tracing_handed_on_is_not_named_after_its_first_holder(tracer, tmp_path, mode):
    port = free_port()
    out = tmp_path / "e.jsonl"
    p = subprocess.Popen([sys.executable, "-c", PREEXISTING, str(port), mode], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, start_new_session=True)
    try:
        first = p.stdout.readline().split()
        assert first[0] == b"S", first
        holder = int(first[1])
        t = tracer("--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == [b"handed"]
        p.stdin.write(b"fin\n")
        p.stdin.flush()
        worker = p.stdout.readline().split()
        assert worker[0] == b"W", worker
        assert p.wait(20) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert not wait_port_settled(port), "the connections never settled"
    recs = _records(t, out, port)
    fins = [r for r in recs if (r["oldstate"], r["newstate"]) == ("ESTABLISHED", "CLOSE_WAIT")]
    assert len(fins) == 1, [(r["oldstate"], r["newstate"], r["lport"], r["rport"]) for r in recs]
    # S held it at the start, and no longer at the FIN: not named (who holds it is not known)
    assert (fins[0]["owner_pid"], fins[0]["owner_source"]) == (None, "unknown"), (holder, fins[0])
    closes = [r for r in recs if (r["oldstate"], r["newstate"]) == ("CLOSE_WAIT", "LAST_ACK")]
    assert [r["owner_pid"] for r in closes] == [int(worker[1])], (
        holder, worker, [(r["owner_pid"], r["owner_source"], r["pid"], r["comm"]) for r in closes])
