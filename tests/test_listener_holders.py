"""Who holds a listener (the owner enricher's answer for connections still in
an accept queue), kept current cheaply: real processes, real sockets, the
real /proc. No kernel tracing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tcpstates.plugins.owner import sockowners

# a holder that inherited the listener (its fd in argv), keeps many other
# files open (a busy server's connections) and obeys one command per line
CHILD = r"""
import os, sys
fd = int(sys.argv[1])
spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(400)]
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "move":          # the listener to another fd, the old one reused
        new = os.dup(fd)
        os.dup2(spare[0], fd)
        print("moved", new, flush=True)
    elif cmd[0] == "close":       # closes every copy it has
        for fd in map(int, cmd[1:]):
            os.close(fd)
        print("closed", flush=True)
"""


@pytest.fixture
def holder():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(listener.fileno())], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, pass_fds=(listener.fileno(),))
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield listener, proc
    finally:
        proc.kill()
        proc.wait()
        listener.close()


def tell(proc: subprocess.Popen, cmd: str) -> str:
    proc.stdin.write(cmd + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def pids_of(found: dict, listener: socket.socket) -> list[int]:
    return sorted(h[0] for h in found.get((socket.AF_INET, "127.0.0.1"), []))


def test_a_holder_keeping_its_listener_costs_no_fd_table_read(holder, monkeypatch):
    listener, proc = holder
    port = listener.getsockname()[1]
    watch = sockowners.PortHolders(port, full_every=3600)
    assert pids_of(watch.lookup(time.monotonic()), listener) == sorted([os.getpid(), proc.pid])
    listed: list[str] = []
    real = os.scandir

    def counting(path):
        listed.append(str(path))
        return real(path)
    monkeypatch.setattr(sockowners.os, "scandir", counting)
    for _ in range(3):
        assert pids_of(watch.lookup(time.monotonic()), listener) == sorted([os.getpid(), proc.pid])
    # /proc itself is listed (new processes), no holder's fd table is
    assert not [p for p in listed if p.endswith("/fd")], listed


def test_a_listener_moved_to_another_fd_is_found_and_a_closed_one_is_dropped(holder):
    listener, proc = holder
    port = listener.getsockname()[1]
    watch = sockowners.PortHolders(port, full_every=3600)
    watch.lookup(time.monotonic())
    assert watch.held[proc.pid] == {listener_inode(listener): listener.fileno()}
    new_fd = int(tell(proc, "move").split()[1])
    found = watch.lookup(time.monotonic())
    assert pids_of(found, listener) == sorted([os.getpid(), proc.pid])
    assert watch.held[proc.pid] == {listener_inode(listener): new_fd}
    assert tell(proc, f"close {new_fd}") == "closed"
    # the listener still exists (this process holds it): only a partial look-up
    # can notice that the child let go
    found = watch.lookup(time.monotonic())
    assert pids_of(found, listener) == [os.getpid()]
    assert proc.pid not in watch.held


def listener_inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino
