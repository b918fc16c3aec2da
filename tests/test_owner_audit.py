"""Owner workloads the design tests do not cover (audit of issue 12), on the real kernel.

Each case is a real process tree on loopback with the real CLI, and each
names the truth it knows:

  * the I/O owner forks an heir and exits; the *client* closes first, so the
    FIN arrives (ESTABLISHED->CLOSE_WAIT, in softirq) while only the heir
    holds the socket: the exited process must not be named;
  * the same, with the exited owner's PID reused by a process in another
    (real, made-up) container before the FIN: neither the old PID nor the new
    process's container may be given;
  * the same, with more processes exiting before the FIN than the kernel
    remembers exited ones (owner_gone is an LRU): still not named;
  * exec after accept: the process's name after exec is its name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from cgroupfs import CgroupMaker, unique
from servers import COMMON
from traffic import free_port, wait_port_settled

pytestmark = pytest.mark.kernel

# The I/O owner A accepts, serves the request, forks heir H and exits. H says
# `heir <H> <peer> <A>` once A is gone, waits (poll, no I/O) for the client's
# FIN, then closes.
HEIR_KEEPS = COMMON + r"""
import select
s = listener()
say("ready", os.getpid())
c, _ = s.accept()
s.close()
if os.fork() == 0:                           # A
    peer = c.getpeername()[1]
    c.recv(4); c.sendall(b"ok")
    A = os.getpid()
    r, w = os.pipe()
    if os.fork() == 0:                       # H
        os.close(w); os.read(r, 1)           # EOF: A has exited
        while True:
            try:
                st = open(f"/proc/{A}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if st in ("Z", "X"):
                break
            time.sleep(0.01)
        say("heir", os.getpid(), peer, A)
        p = select.poll(); p.register(c, select.POLLIN); p.poll()   # the FIN, without a recv
        c.close()
        say("closed")
        os._exit(0)
    os._exit(0)
c.close()
os.wait()
sys.stdin.read()
"""

# argv: port. Connects, sends, gets "ok", says `conn <port>`, closes when told.
CLIENT_TOLD = r"""
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.sendall(b"req!"); assert c.recv(2) == b"ok"
print(f"conn {c.getsockname()[1]}", flush=True)
sys.stdin.readline()
c.close()
print("done", flush=True)
"""

# exec after accept: named "preexec" before, execs a fresh interpreter that
# serves the request and closes after the client.
EXEC_AFTER_ACCEPT = COMMON + r"""
open("/proc/self/comm", "w").write("preexec")
s = listener()
say("ready", os.getpid())
c, _ = s.accept()
s.close()
c.recv(4)
os.set_inheritable(c.fileno(), True)
code = '''
import os, socket, sys
c = socket.socket(fileno=int(sys.argv[1]))
c.sendall(b"ok")
comm = open("/proc/self/comm").read().strip()
os.write(1, f"served {os.getpid()} {c.getpeername()[1]} {comm}\\n".encode())
while c.recv(64):
    pass
c.close()
os.write(1, b"closed\\n")
sys.stdin.read()
'''
os.execv(sys.executable, [sys.executable, "-c", code, str(c.fileno())])
"""


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)


def said(p: subprocess.Popen, word: str) -> list[str]:
    while True:
        line = p.stdout.readline()
        assert line, f"ended before {word}"
        if line.split()[0] == word:
            return line.split()


def tell(p: subprocess.Popen) -> None:
    p.stdin.write("go\n")
    p.stdin.flush()


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def _records(t, out, port):
    assert not wait_port_settled(port)
    rc, _, err = t.stop()
    assert rc == 0, err
    return [r for r in (orjson.loads(line) for line in out.read_bytes().splitlines())
            if r["lport"] == port and r["rport"] != 0]


def _needs_exits() -> None:
    from tcpstates.plugins.owner.kernel import owner_support
    if not owner_support(1024).exits:
        pytest.skip("no sched:sched_process_exit group_dead (Linux >= 6.13)")


def _served(tracer, tmp_path, procs, server: str, word: str, pid_max: int | None = None):
    """`server` started and ready, the tracer started (with kernel.pid_max =
    `pid_max` meanwhile), a CLIENT_TOLD connected: (tracer, output, port,
    client, server, the server's `word` line as ints)."""
    port = free_port()
    srv = spawn(server, str(port))
    procs.append(srv)
    said(srv, "ready")
    out = tmp_path / "e.jsonl"
    with _pid_max(pid_max):
        t = tracer("--owner", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
    cli = spawn(CLIENT_TOLD, str(port))
    procs.append(cli)
    said(cli, "conn")
    return t, out, port, cli, srv, [int(x) for x in said(srv, word)[1:]]


def _closed(t, out, port, cli, srv, peer: int) -> list[dict]:
    """The client closes, the server side after it: the records of that connection."""
    tell(cli)
    said(cli, "done")
    said(srv, "closed")
    return [r for r in _records(t, out, port) if r["rport"] == peer]


def _of(recs: list[dict], old: str, new: str) -> list[dict]:
    return [r for r in recs if (r["oldstate"], r["newstate"]) == (old, new)]


@contextlib.contextmanager
def _pid_max(value: int | None):
    """kernel.pid_max = value while the tracer starts (None: unchanged): above
    65,536 the kernel stage's per-PID-slot exit counters are shared by several
    PIDs, so a moved count no longer proves whose exit it was."""
    path = Path("/proc/sys/kernel/pid_max")
    old = path.read_text()
    if value is not None:
        path.write_text(str(value))
    try:
        yield
    finally:
        path.write_text(old)


def _reuse_pid(pid: int, cgroup_procs: list) -> subprocess.Popen | None:
    """A live process with PID `pid` (ns_last_pid), moved into `cgroup_procs`."""
    for _ in range(100):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
        if p.pid == pid:
            for procs_file in cgroup_procs:
                procs_file.write_text(str(p.pid))
            return p
        p.stdin.close()
        p.wait(10)
    return None


@pytest.mark.parametrize("reuse", [False, True], ids=["heir", "heir-pid-reused-in-a-container"])
def test_fin_after_the_io_owner_exited_never_names_it(tracer, tmp_path, procs, reuse):
    _needs_exits()
    if reuse and not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("ns_last_pid not writable")
    t, out, port, cli, srv, (heir, peer, exited) = _served(tracer, tmp_path, procs, HEIR_KEEPS, "heir")
    maker = CgroupMaker()
    try:
        newcomer = None
        if reuse:
            cid = unique()
            dirs = [maker.make(f"docker/{cid}")] + maker.make_v1(f"docker/{cid}")
            newcomer = _reuse_pid(exited, [d / "cgroup.procs" for d in dirs])
            if newcomer is None:
                pytest.skip("the PID was not reused in 100 forks")
        recs = _closed(t, out, port, cli, srv, peer)
    finally:
        if reuse and newcomer is not None:
            newcomer.kill()
            newcomer.wait(10)
        maker.cleanup()
    fin = _of(recs, "ESTABLISHED", "CLOSE_WAIT")
    assert len(fin) == 1, recs
    if reuse:       # the process now holding the exited owner's PID is not the owner
        assert "container_id" not in fin[0], fin[0]
    # the truth is the heir; a process that has exited is confidently wrong
    assert fin[0]["owner_pid"] in (heir, None), (exited, heir, orjson.dumps(fin[0]).decode())
    close = _of(recs, "CLOSE_WAIT", "LAST_ACK")
    assert len(close) == 1 and close[0]["owner_pid"] == heir, close


def test_exec_after_accept_names_the_program_it_became(tracer, tmp_path, procs):
    port = free_port()
    srv = spawn(EXEC_AFTER_ACCEPT, str(port))
    procs.append(srv)
    said(srv, "ready")
    out = tmp_path / "e.jsonl"
    t = tracer("--owner", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
    cli = spawn(CLIENT_TOLD, str(port))
    procs.append(cli)
    said(cli, "conn")
    _, pid, peer, comm = said(srv, "served")
    tell(cli)
    said(cli, "done")
    said(srv, "closed")
    recs = [r for r in _records(t, out, port) if r["rport"] == int(peer)]
    after = [r for r in recs if r["oldstate"] in ("ESTABLISHED", "CLOSE_WAIT", "LAST_ACK")]
    assert len(after) == 3, recs
    wrong = [(r["oldstate"], r["newstate"], r["owner_pid"], r["owner_comm"]) for r in after
             if r["owner_pid"] != int(pid) or r["owner_comm"] != comm]
    assert not wrong, (pid, comm, wrong)


CHURN = r"""
import os, sys
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
"""


# slot-per-pid: this machine's pid_max (32,768): the moved exit count proves the
# exit; shared-slots: pid_max 4,194,304 at the tracer's start (as systemd sets it):
# the kernel says "maybe" and user space finds the owner gone
@pytest.mark.parametrize("pid_max", [None, 1 << 22], ids=["slot-per-pid", "shared-slots"])
def test_fin_after_the_owner_exited_and_many_exits_since_never_names_it(tracer, tmp_path, procs, pid_max):
    from tcpstates.plugins.owner.kernel import GEN_SLOTS
    _needs_exits()
    if pid_max is None and int(Path("/proc/sys/kernel/pid_max").read_text()) > GEN_SLOTS:
        pytest.skip("pid_max here is above 65,536: the shared-slots case covers it")
    t, out, port, cli, srv, (heir, peer, exited) = _served(tracer, tmp_path, procs, HEIR_KEEPS, "heir", pid_max)
    # more exits than owner_gone remembers (16,384), e.g. a busy build host
    subprocess.run([sys.executable, "-c", CHURN, "20000"], check=True, timeout=120)
    recs = _closed(t, out, port, cli, srv, peer)
    fin = _of(recs, "ESTABLISHED", "CLOSE_WAIT")
    assert len(fin) == 1, recs
    assert fin[0]["owner_pid"] in (heir, None), (exited, heir, fin[0])
    close = _of(recs, "CLOSE_WAIT", "LAST_ACK")
    assert len(close) == 1 and close[0]["owner_pid"] == heir, (exited, heir, close)


# A serves, shuts its sending side down (ESTABLISHED->FIN_WAIT1, a close-type
# transition in A), forks heir H and exits: H still holds the socket.
SHUTDOWN_THEN_HEIR = HEIR_KEEPS.replace('c.recv(4); c.sendall(b"ok")',
                                        'c.recv(4); c.sendall(b"ok"); c.shutdown(socket.SHUT_WR)')


def test_shutdown_then_exit_never_names_the_exited_owner(tracer, tmp_path, procs):
    _needs_exits()
    assert SHUTDOWN_THEN_HEIR != HEIR_KEEPS
    t, out, port, cli, srv, (heir, peer, exited) = _served(tracer, tmp_path, procs, SHUTDOWN_THEN_HEIR, "heir")
    recs = _closed(t, out, port, cli, srv, peer)
    late = [r for r in recs if r["oldstate"] == "FIN_WAIT2"]
    assert late, recs
    wrong = [(r["oldstate"], r["newstate"], r["owner_pid"]) for r in late if r["owner_pid"] not in (heir, None)]
    assert not wrong, (exited, heir, wrong)


# argv: port. Accepts one connection, serves it, says `served <pid> <peer>`,
# closes after the client does (its FIN seen by poll, no recv after it).
SERVES_THEN_WAITS = COMMON + r"""
import select
s = listener()
say("ready", os.getpid())
c, _ = s.accept()
c.recv(4); c.sendall(b"ok")
say("served", os.getpid(), c.getpeername()[1])
p = select.poll(); p.register(c, select.POLLIN); p.poll()
c.close()
say("closed")
sys.stdin.read()
"""


def test_a_live_owner_sharing_its_exit_counter_stays_named(tracer, tmp_path, procs):
    """pid_max above 65,536: another PID of the owner's counter slot exits, so
    the kernel can only say "maybe gone"; the owner is alive, so user space
    names it (not needlessly unknown)."""
    from tcpstates.plugins.owner.kernel import GEN_SLOTS
    _needs_exits()
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("ns_last_pid not writable")
    port = free_port()
    srv = spawn(SERVES_THEN_WAITS, str(port))
    procs.append(srv)
    owner = int(said(srv, "ready")[1])
    out = tmp_path / "e.jsonl"
    with _pid_max(1 << 22):
        t = tracer("--owner", "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}")
        cli = spawn(CLIENT_TOLD, str(port))
        procs.append(cli)
        said(cli, "conn")
        peer = int(said(srv, "served")[2])
        sharer = _reuse_pid(owner + GEN_SLOTS, [])     # same slot, another process
        assert sharer is not None, "could not get PID owner + 65,536"
        sharer.stdin.close()
        sharer.wait(10)                                 # its exit moves the slot's count
    recs = _closed(t, out, port, cli, srv, peer)
    fin = _of(recs, "ESTABLISHED", "CLOSE_WAIT")
    assert len(fin) == 1 and fin[0]["owner_pid"] == owner, fin


# HEIR_KEEPS whose server does not reap A until told: A stays a zombie, and a
# zombie's /proc/PID/stat still shows its PID and start time
HEIR_KEEPS_ZOMBIE = HEIR_KEEPS.replace("c.close()\nos.wait()\nsys.stdin.read()",
                                       "c.close()\nsys.stdin.readline()\nos.wait()\nsys.stdin.read()")


def test_an_unreaped_exited_owner_is_not_named_as_alive(tracer, tmp_path, procs):
    """pid_max above 65,536, the owner's exit pushed out of owner_gone: the
    kernel says "maybe gone", and the owner is a zombie (exited, its parent has
    not waited): its /proc entry is still there with its start time, but it
    has exited: naming it is confidently wrong."""
    _needs_exits()
    assert HEIR_KEEPS_ZOMBIE != HEIR_KEEPS
    t, out, port, cli, srv, (heir, peer, exited) = _served(tracer, tmp_path, procs, HEIR_KEEPS_ZOMBIE, "heir",
                                                           1 << 22)
    subprocess.run([sys.executable, "-c", CHURN, "20000"], check=True, timeout=120)
    state = Path(f"/proc/{exited}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "Z", state               # exited, not reaped
    recs = _closed(t, out, port, cli, srv, peer)
    tell(srv)                                # now A is reaped
    fin = _of(recs, "ESTABLISHED", "CLOSE_WAIT")
    assert len(fin) == 1, recs
    assert fin[0]["owner_pid"] in (heir, None), (exited, heir, fin[0])
