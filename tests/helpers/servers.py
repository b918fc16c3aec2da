"""Server designs for the owner-accuracy tests, each a real process tree.

Every server prints `ready <pid>...` (the processes holding the listener)
once listening, and `served <pid> <client port>` for each connection it
handled, naming the process that really used the socket. The client sends
`req!`, waits for `ok`, then closes, so the server has used the socket before
the client's FIN arrives.
"""

from __future__ import annotations

COMMON = r"""
import os, signal, socket, sys, threading, time
port = int(sys.argv[1])
def say(*words):
    # one write per line: the processes of a tree share stdout, and print()
    # writes word by word when unbuffered (PYTHONUNBUFFERED): lines would mix
    os.write(1, (" ".join(map(str, words)) + "\n").encode())
def listener(reuseport=False):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port)); s.listen(128)
    return s
def serve(c):
    peer = c.getpeername()[1]
    c.recv(4); c.sendall(b"ok")
    while c.recv(64):
        pass
    c.close()
    os.write(1, f"served {os.getpid()} {peer}\n".encode())     # one write: threads
"""

PREFORK = COMMON + r"""
s = listener()
kids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        while True:
            c, _ = s.accept()
            serve(c)
    kids.append(pid)
say("ready", os.getpid(), *kids)
sys.stdin.read()
for k in kids:
    os.kill(k, signal.SIGKILL)
"""

REUSEPORT = COMMON + r"""
kids, pipes = [], []
for i in range(4):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        s = listener(reuseport=True)
        os.write(1, f"listening {os.getpid()}\n".encode())
        if i == 0:                  # this member leaves the group when told
            os.read(r, 1); s.close()
            os.write(1, f"left {os.getpid()}\n".encode())
            signal.pause()
        while True:
            c, _ = s.accept()
            serve(c)
    os.close(r); kids.append(pid); pipes.append(w)
say("ready", *kids)
sys.stdin.readline()                # "leave"
os.write(pipes[0], b"x")
sys.stdin.read()
for k in kids:
    os.kill(k, signal.SIGKILL)
"""

def _dispatcher(close_last: bool) -> str:
    """A dispatcher accepts and hands each socket to a worker over SCM_RIGHTS.
    It closes its own copy at once, and the worker waits for that before it
    serves (the worker's close is then the last, whatever the scheduler does);
    close_last: it closes its own copy only after the worker closed its one,
    so the close (CLOSE_WAIT->LAST_ACK) runs in the dispatcher, which must not
    become the owner of a socket the worker used."""
    return COMMON + r"""
close_last = %s
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
pid = os.fork()
if pid == 0:                        # the worker: gets each socket over SCM_RIGHTS
    a.close()
    while True:
        msg, fds, _, _ = socket.recv_fds(b, 1, 1)
        if not fds:
            os._exit(0)
        if not close_last:
            b.recv(1)               # the dispatcher closed its copy: the worker's close is the last
        serve(socket.socket(fileno=fds[0]))
        if close_last:
            b.send(b"d")            # closed: the dispatcher's copy is the last one
b.close()
s = listener()
say("ready", os.getpid())
threading.Thread(target=lambda: (sys.stdin.read(), os.kill(pid, signal.SIGKILL), os._exit(0)),
                 daemon=True).start()
while True:
    c, _ = s.accept()
    socket.send_fds(a, [b"s"], [c.fileno()])
    if close_last:
        a.recv(1)
    c.close()                       # the dispatcher's copy
    if not close_last:
        a.send(b"c")                # (without this, a dispatcher descheduled before its close
                                    # could close after the worker: then its close is the last)
""" % close_last


DISPATCHER = _dispatcher(close_last=False)
DISPATCHER_LAST_CLOSE = _dispatcher(close_last=True)

THREADED = COMMON + r"""
s = listener()
say("ready", os.getpid())
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# argv: port, connections, and "wait" to close only after the server closed
CLIENT = r"""
import os, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
wait = sys.argv[3:] == ["wait"]
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    print(f"conn {c.getsockname()[1]}", flush=True)
    c.sendall(b"req!")
    assert c.recv(2) == b"ok"
    while wait and c.recv(64):
        pass
    c.close()
print("done", flush=True)
"""

# connections made before tracing starts, closed when told
PREEXISTING_CLIENT = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"req!"); assert c.recv(2) == b"ok"
    conns.append(c)
    print(f"conn {c.getsockname()[1]}", flush=True)
print("ready", flush=True)
sys.stdin.readline()
for c in conns:
    c.close()
print("done", flush=True)
"""

# The I/O owner hands its socket down and exits; the heir closes it without
# using it: the close names the heir (the only holder left), never the
# process that has exited. Per connection: `served <heir pid> <client port>`;
# its clients run CLIENT with "wait" (they close after the server).
HEIR_CLOSES = COMMON + r"""
s = listener()
say("ready", os.getpid())
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
while True:
    c, _ = s.accept()
    # the I/O owner starts once this process dropped its copy of c: else a slow
    # parent (Python 3.12 warns on its first fork of a threaded process) could
    # hold the last reference and so, rightly, be the one that closes it
    go_r, go_w = os.pipe()
    if os.fork() == 0:                      # the I/O owner
        s.close()
        os.close(go_w)
        os.read(go_r, 1)                    # EOF: the parent closed c
        os.close(go_r)
        peer = c.getpeername()[1]
        c.recv(4); c.sendall(b"ok")
        r, w = os.pipe()
        heir = os.fork()
        if heir == 0:                       # inherits c, never uses it
            os.close(w)
            os.read(r, 1)                   # EOF: its parent has exited
            say("served", os.getpid(), peer)
            c.close()
            os._exit(0)
        os._exit(0)                         # exits holding c: the heir's copy stays
    c.close()
    os.close(go_r)
    os.close(go_w)
    os.waitpid(-1, 0)
"""

# PID reuse around an owner's exit (root: /proc/sys/kernel/ns_last_pid picks
# the next PID). The I/O owner A (PID P) hands the socket to its child H and
# exits; H forks C so that C gets P again. argv[2] "exit": C never uses the
# socket and exits, then H closes it -> the close names H (A is gone; C's
# exit must not hide A's). "io": C sends on it, closes its copy and lives on
# while H closes -> C, a live user of the socket, stays its owner (C's I/O
# must replace A's identity although the PID is the same).
# Says `owner P`, then `expect <pid the close must name> <client port> <C's start>`.
PID_REUSE = COMMON + r"""
mode = sys.argv[2]
s = listener()
say("ready", os.getpid())
c, _ = s.accept()
s.close()
peer = c.getpeername()[1]
def gone(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True
if os.fork() == 0:                          # A
    c.recv(4); c.sendall(b"ok")
    P = os.getpid()
    r, w = os.pipe()
    if os.fork() == 0:                      # H
        os.close(w); os.read(r, 1)          # EOF: A has exited
        while not gone(P):
            time.sleep(0.01)
        cr, cw = os.pipe(); hr, hw = os.pipe()
        child = None
        for attempt in range(50):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(P - 1))
            pid = os.fork()
            if pid == 0:                    # C, if it got P
                if os.getpid() != P:
                    os._exit(3)
                if mode == "io":
                    c.send(b"more")
                c.close()
                os.write(cw, b"c")
                if mode == "io":
                    os.read(hr, 1)          # alive until H has closed
                os._exit(0)
            if pid == P:
                child = pid
                break
            os.waitpid(pid, 0)
        if child is None:
            say("expect", "none", peer)
            os._exit(0)
        os.read(cr, 1)
        if mode == "exit":
            os.waitpid(child, 0)
        # C's start time (clock ticks since boot, as owner_start) while it lives
        start = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[19] if mode == "io" else 0
        say("expect", os.getpid() if mode == "exit" else child, peer, start)
        c.close()
        os.write(hw, b"h")
        if mode == "io":
            os.waitpid(child, 0)
        os._exit(0)
    say("owner", P)
    os._exit(0)
c.close()
os.waitpid(-1, 0)
sys.stdin.read()
"""
