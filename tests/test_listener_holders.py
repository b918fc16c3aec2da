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


def watched(listener: socket.socket) -> sockowners.PortHolders:
    """A watch of the listener's port after its first (full) look-up: later
    look-ups are partial (no full read for an hour)."""
    watch = sockowners.PortHolders(listener.getsockname()[1], full_every=3600)
    watch.lookup(time.monotonic())
    return watch


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
    # /proc itself is listed (new processes: a process that another job on the
    # machine started meanwhile has its table read, as it should), no holder's is
    holders = {f"/proc/{os.getpid()}/fd", f"/proc/{proc.pid}/fd"}
    assert not [p for p in listed if p in holders], listed


def test_a_listener_moved_to_another_fd_is_found_and_a_closed_one_is_dropped(holder):
    listener, proc = holder
    watch = watched(listener)
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


# -- every change a partial look-up must see (review11) ---------------------------------------
OTHER = r"""
import os, socket, sys
fd = int(sys.argv[1])
mode = sys.argv[2]
if mode == "socket":              # another socket at the fd number the listener had
    s = socket.socket()
    os.dup2(s.fileno(), fd)
print("ready", flush=True)
sys.stdin.readline()
"""


def _spawn(code: str, *args: str, fds: tuple[int, ...] = ()) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, pass_fds=fds)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def _spawn_with_pid(pid: int, code: str, *args: str, fds: tuple[int, ...] = ()) -> subprocess.Popen | None:
    """A process given `pid` (ns_last_pid, root): the reuse of a holder's PID."""
    for _ in range(20):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, pass_fds=fds)
        if proc.pid == pid:
            assert proc.stdout.readline().strip() == "ready"
            return proc
        _stop(proc)           # another fork took it first: try again
    return None


def test_a_forked_holder_is_seen_by_a_partial_lookup(holder):
    listener, proc = holder
    watch = watched(listener)
    child = _spawn(OTHER, str(listener.fileno()), "keep", fds=(listener.fileno(),))
    try:
        assert pids_of(watch.lookup(time.monotonic()), listener) == sorted([os.getpid(), proc.pid, child.pid])
    finally:
        _stop(child)
    assert pids_of(watch.lookup(time.monotonic()), listener) == sorted([os.getpid(), proc.pid])


@pytest.mark.root           # choosing the next PID (ns_last_pid) needs root; CI runs as root
@pytest.mark.parametrize("mode", ["socket", "keep"])
def test_a_reused_pid_is_never_the_old_holder(holder, mode):
    """The holder exits and its PID is given to a new process that has, at the
    same fd number, another socket (dropped) or the listener itself (a holder,
    with its own start time)."""
    listener, proc = holder
    watch = watched(listener)
    old_pid = proc.pid
    old_start = sockowners.process_identity(old_pid)[0]
    _stop(proc)
    time.sleep(0.02)              # one clock tick: a start time of its own
    fds = (listener.fileno(),)
    if mode == "socket":
        fds = ()              # not passed: that fd number is another socket's
    new = _spawn_with_pid(old_pid, OTHER, str(listener.fileno()), mode, fds=fds)
    assert new is not None, f"PID {old_pid} could not be given to a new process (ns_last_pid)"
    try:
        found = watch.lookup(time.monotonic())
        holders = found.get((socket.AF_INET, "127.0.0.1"), [])
        if mode == "socket":
            assert sorted(h[0] for h in holders) == [os.getpid()], holders
        else:
            assert sorted(h[0] for h in holders) == sorted([os.getpid(), old_pid]), holders
            now_start = sockowners.process_identity(old_pid)[0]
            assert now_start != old_start
            assert [h[1] for h in holders if h[0] == old_pid] == [now_start], "the old identity kept"
    finally:
        _stop(new)


def test_another_socket_dup2_over_the_listeners_fd_drops_the_holder(holder):
    listener, proc = holder
    watch = watched(listener)
    child = _spawn(OTHER, str(listener.fileno()), "keep", fds=(listener.fileno(),))
    try:
        assert child.pid in {h[0] for h in watch.lookup(time.monotonic())[(socket.AF_INET, "127.0.0.1")]}
    finally:
        _stop(child)
    # a process whose fd (the listener's number) is another socket from the start
    other = _spawn(OTHER, str(listener.fileno()), "socket")
    try:
        assert other.pid not in {h[0] for h in watch.lookup(time.monotonic())[(socket.AF_INET, "127.0.0.1")]}
    finally:
        _stop(other)


def test_a_reuseport_group_names_every_member_and_a_member_leaving():
    a, b = socket.socket(), socket.socket()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    a.bind(("127.0.0.1", 0))
    port = a.getsockname()[1]
    b.bind(("127.0.0.1", port))
    a.listen()
    b.listen()
    ca = _spawn(OTHER, str(a.fileno()), "keep", fds=(a.fileno(),))
    cb = _spawn(OTHER, str(b.fileno()), "keep", fds=(b.fileno(),))
    a.close()
    b.close()                    # only the children hold them now
    try:
        watch = sockowners.PortHolders(port, full_every=3600)
        got = watch.lookup(time.monotonic())[(socket.AF_INET, "127.0.0.1")]
        assert sorted(h[0] for h in got) == sorted([ca.pid, cb.pid])
        _stop(cb)
        got = watch.lookup(time.monotonic())[(socket.AF_INET, "127.0.0.1")]
        assert [h[0] for h in got] == [ca.pid]
    finally:
        _stop(ca)
        if cb.poll() is None:
            _stop(cb)
