"""Owner accuracy on the server designs that run most TCP, on the real kernel.

Each test runs the real CLI in a subprocess, a real server process tree and
real clients on loopback, and judges every event of its own port against what
the processes themselves report (who accepted/served which client port). An
event is right when owner_pid is the process that held the socket, or — for a
connection still in the accept queue of a listener held by several processes —
when it says "shared" and names exactly those processes. Wrong means a
specific owner_pid that is not the holder: there must be none. bcc's on-CPU
C-PID is judged on the same events for comparison (printed, README table).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading

import orjson
import pytest
from servers import (CLIENT, DISPATCHER, DISPATCHER_LAST_CLOSE, HEIR_CLOSES, PID_REUSE,
                     PREEXISTING_CLIENT, PREFORK, REUSEPORT, THREADED)
from traffic import free_port, wait_port_settled

pytestmark = pytest.mark.kernel
N = 60
PRE_ACCEPT = {("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")}


SPAWNED: list[subprocess.Popen] = []


def spawn(code: str, *args: str) -> subprocess.Popen:
    # its own process group: a watchdog, and the clean-up after each test,
    # end the whole tree (forked children hold its stdout too)
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    SPAWNED.append(p)
    return p


def _kill_tree(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _no_tree_outlives_its_test():
    yield
    while SPAWNED:
        p = SPAWNED.pop()
        _kill_tree(p)
        p.wait(10)


def read_lines(p: subprocess.Popen, until: str | None = None, count: int = 0,
               timeout: float = 60) -> list[list[str]]:
    """Lines up to the one starting with `until`, or `count` lines; a tree
    that says nothing for `timeout` seconds is killed, so the read ends and
    the test fails instead of hanging."""
    watchdog = threading.Timer(timeout, _kill_tree, (p,))
    watchdog.start()
    lines: list[list[str]] = []
    try:
        while True:
            line = p.stdout.readline()
            assert line, f"process ended (or said nothing for {timeout}s) before {until or count}: {lines}"
            lines.append(line.split())
            if (until is not None and lines[-1][0] == until) or len(lines) == count:
                return lines
    finally:
        watchdog.cancel()


def read_until(p: subprocess.Popen, word: str) -> list[list[str]]:
    return read_lines(p, until=word)


def clients(port: int, n: int, processes: int = 1) -> list[tuple[int, int]]:
    """(client port, client PID) per connection in the order made, after every
    connection is done (the processes run one after another)."""
    out = []
    for _ in range(processes):
        c = spawn(CLIENT, str(port), str(n // processes))
        out += [(int(w[1]), c.pid) for w in read_until(c, "done")[:-1]]
        assert c.wait(20) == 0
    return out


def trace(tracer, tmp_path, *extra: str):
    out = tmp_path / "e.jsonl"
    return tracer("--sink", "jsonl", "-o", f"sinks.jsonl.path={out}", *extra), out


def records(t, out, port):
    assert not wait_port_settled(port), "the connections never settled"
    rc, _, err = t.stop()
    assert rc == 0, err
    return [r for r in (orjson.loads(line) for line in out.read_bytes().splitlines())
            if port in (r["lport"], r["rport"])]


def _truths(recs, port, served, clients_in_order, holders, servers) -> dict[int, set[int]]:
    """The holder(s) of each record's socket, by id(record).

    Loopback reuses a client port soon (tcp_tw_reuse), so a port names a
    connection only together with its turn: the k-th connection seen on a
    port is the k-th the clients (or the servers' "served" lines) reported
    on it. Records come in kernel order, one connection per socket at a time
    (it starts at its first record and ends at ->CLOSE)."""
    by_port_client, by_port_server = collections.defaultdict(collections.deque), collections.defaultdict(
        collections.deque)
    for lport, pid in clients_in_order:
        by_port_client[lport].append(pid)
    for peer, pid in served:
        by_port_server[peer].append(pid)
    truth: dict[int, set[int]] = {}
    client_conn: dict[str, list] = {}     # skaddr → [pid or None, its records while unknown]
    server_conn: dict[str, int] = {}      # skaddr → the PID that served it
    for r in recs:
        sk, closing = r["skaddr"], r["newstate"] == "CLOSE"
        if r["rport"] == port:                          # client side
            # connect's CLOSE->SYN_SENT comes before the local port is chosen:
            # it learns its connection's client from the socket's next record
            conn = client_conn.setdefault(sk, [None, []])
            if conn[0] is None and r["lport"] != 0:
                queue = by_port_client[r["lport"]]
                conn[0] = queue.popleft() if queue else -1
                for earlier in conn[1]:
                    truth[id(earlier)] = {conn[0]}
            if conn[0] is None:
                conn[1].append(r)
            truth[id(r)] = {conn[0] if conn[0] is not None else -1}
            if closing:
                del client_conn[sk]
        elif r["rport"] == 0:                           # the listener: any of its holders
            truth[id(r)] = set(servers)
        else:                                           # an accepted socket
            if sk not in server_conn:
                queue = by_port_server[r["rport"]]
                server_conn[sk] = queue.popleft() if queue else -1
            pre = (r["oldstate"], r["newstate"]) in PRE_ACCEPT
            truth[id(r)] = set(holders) if pre else {server_conn[sk]}
            if closing:
                del server_conn[sk]
    return truth


def judge(recs, port, served, clients_in_order, holders, servers):
    """(right, wrong, on-CPU right, total); served: (client port, server PID)
    per connection, clients_in_order: (client port, client PID) per connection,
    both in the order the connections were made."""
    right = wrong = cpu = 0
    bad = []
    truths = _truths(recs, port, served, clients_in_order, holders, servers)
    for r in recs:
        truth = truths[id(r)]
        pid = r.get("owner_pid")
        cpu += r["pid"] in truth if len(truth) == 1 or r["rport"] == 0 else False
        if pid is not None and pid in truth and (len(truth) == 1 or r["rport"] == 0):
            right += 1
        elif pid is None and r["owner_source"] == "shared" and set(r["owner_candidates"]) == truth:
            right += 1
        elif pid is None:
            bad.append(("unknown", r["oldstate"], r["newstate"], r["owner_source"], r.get("owner_candidates"), truth))
        else:
            wrong += 1
            bad.append((r["oldstate"], r["newstate"], r["lport"], r["rport"], pid, r["owner_source"], truth))
    print(f"\nowner right {right}/{len(recs)}, wrong {wrong}; bcc on-CPU C-PID right {cpu}/{len(recs)}")
    assert wrong == 0, [b for b in bad if b[0] != "unknown"][:5]
    assert right / len(recs) >= 0.99, (right, len(recs), bad[:5])
    return right, wrong, cpu, len(recs)


def _served(lines) -> list[tuple[int, int]]:
    """(client port, server PID) per "served" line, in order."""
    return [(int(w[2]), int(w[1])) for w in lines if w[0] == "served"]


def run_design(tracer, tmp_path, code, holders_of, *, before=None, processes=1, extra=(), judged=None):
    port = free_port()
    srv = spawn(code, str(port))
    ready = read_until(srv, "ready")
    holders = servers = holders_of(ready)
    t, out = trace(tracer, tmp_path, *extra)
    if before:
        holders = before(srv, holders)
    client_pids = clients(port, N, processes)
    lines = read_lines(srv, count=N)
    recs = records(t, out, port)        # while the server still runs (as servers do)
    srv.stdin.close()
    srv.wait(10)
    assert len([r for r in recs if r["rport"] != 0]) == 10 * N
    return (judged or judge)(recs, port, _served(lines), client_pids, holders, servers)


# The send/recv probes attach as raw tracepoints where BTF allows (the
# default); "tracepoint" is their perf-event form, used without BTF
PROBES = {"raw": (), "tracepoint": ("-o", 'chain=[{use="owner", kernel_io_probe="tracepoint"}]')}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_prefork_children_accept_on_a_shared_listener(tracer, tmp_path, probe):
    run_design(tracer, tmp_path, PREFORK, lambda ready: [int(x) for x in ready[-1][1:]], extra=PROBES[probe])


def test_reuseport_group_with_a_member_leaving(tracer, tmp_path):
    def leave(srv, holders):
        srv.stdin.write("leave\n")
        srv.stdin.flush()
        gone = int(read_until(srv, "left")[-1][1])
        return [h for h in holders if h != gone]
    run_design(tracer, tmp_path, REUSEPORT, lambda ready: [int(x) for x in ready[-1][1:]], before=leave)


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_dispatcher_hands_sockets_to_a_worker_over_scm_rights(tracer, tmp_path, probe):
    run_design(tracer, tmp_path, DISPATCHER, lambda ready: [int(ready[-1][1])], extra=PROBES[probe])


def test_dispatcher_closing_its_copy_last_does_not_become_the_owner(tracer, tmp_path):
    run_design(tracer, tmp_path, DISPATCHER_LAST_CLOSE, lambda ready: [int(ready[-1][1])])


def test_a_socket_closed_by_its_heir_after_the_io_owner_exited_names_the_heir(tracer, tmp_path):
    """Review3 #6 case B: the process that used the socket forks and exits; its
    child inherited the socket and closes it without using it. The close and
    everything after it name the child — the owner that exited is gone."""
    from tcpstates.plugins.owner.kernel import owner_support
    if not owner_support(1024).exits:
        pytest.skip("this kernel has no sched:sched_process_exit group_dead field (Linux >= 6.13)")
    port = free_port()
    srv = spawn(HEIR_CLOSES, str(port))
    read_until(srv, "ready")
    t, out = trace(tracer, tmp_path)
    n = 20
    cli = spawn(CLIENT, str(port), str(n), "wait")
    client_ports = [int(w[1]) for w in read_until(cli, "done")[:-1]]
    heirs = {int(w[2]): int(w[1]) for w in read_lines(srv, count=n)}
    recs = records(t, out, port)
    srv.stdin.close()
    closes = [r for r in recs if r["lport"] == port and r["rport"] in client_ports
              and (r["oldstate"], r["newstate"]) == ("ESTABLISHED", "FIN_WAIT1")]
    assert len(closes) == n, recs
    wrong = [(r["rport"], r["owner_pid"], heirs[r["rport"]]) for r in closes if r["owner_pid"] != heirs[r["rport"]]]
    assert not wrong, wrong
    after = [r for r in recs if r["lport"] == port and r["rport"] in client_ports
             and r["oldstate"] in ("FIN_WAIT1", "FIN_WAIT2")]
    assert after and all(r["owner_pid"] == heirs[r["rport"]] for r in after), after
    judged = closes + after
    print(f"\nowner right {sum(r['owner_pid'] == heirs[r['rport']] for r in judged)}/{len(judged)}; "
          f"bcc on-CPU C-PID right {sum(r['pid'] == heirs[r['rport']] for r in judged)}/{len(judged)}")


@pytest.mark.parametrize("mode", ["exit", "io"])
def test_a_reused_pid_neither_hides_an_exited_owner_nor_inherits_its_identity(tracer, tmp_path, mode):
    """The I/O owner exits and its PID is reused (ns_last_pid) by a process
    that got the socket. "exit": that process exits without using it, the
    heir closes: the close names the heir. "io": it sends on the socket and
    lives on: it is the owner (its own start time, not the exited one's)."""
    from tcpstates.plugins.owner.kernel import owner_support
    if not owner_support(1024).exits:
        pytest.skip("this kernel has no sched:sched_process_exit group_dead field (Linux >= 6.13)")
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("/proc/sys/kernel/ns_last_pid is not writable: PID reuse cannot be arranged")
    port = free_port()
    srv = spawn(PID_REUSE, str(port), mode)
    read_until(srv, "ready")
    t, out = trace(tracer, tmp_path)
    cli = spawn(CLIENT, str(port), "1", "wait")
    lines = read_lines(srv, count=2)
    read_until(cli, "done")
    said = {w[0]: w[1:] for w in lines}
    assert said["expect"][0] != "none", "the PID was not reused in 50 forks"
    first_owner, expected, peer = int(said["owner"][0]), int(said["expect"][0]), int(said["expect"][1])
    recs = records(t, out, port)
    srv.stdin.close()
    mine = [r for r in recs if r["lport"] == port and r["rport"] == peer]
    close = [r for r in mine if (r["oldstate"], r["newstate"]) == ("ESTABLISHED", "FIN_WAIT1")]
    assert len(close) == 1 and close[0]["owner_pid"] == expected, (mode, first_owner, expected, mine)
    if mode == "io":
        # the same PID as the exited owner, but its own identity
        assert close[0]["owner_source"] == "io" and close[0]["owner_start"] == int(said["expect"][2]), mine


def test_threaded_server(tracer, tmp_path):
    run_design(tracer, tmp_path, THREADED, lambda ready: [int(ready[-1][1])])


def test_short_lived_clients(tracer, tmp_path):
    run_design(tracer, tmp_path, THREADED, lambda ready: [int(ready[-1][1])], processes=N)


def test_preexisting_connections(tracer, tmp_path):
    port = free_port()
    srv = spawn(THREADED, str(port))
    holders = [int(read_until(srv, "ready")[-1][1])]
    cli = spawn(PREEXISTING_CLIENT, str(port), str(N))
    client_pids = [(int(w[1]), cli.pid) for w in read_until(cli, "ready")[:-1]]
    t, out = trace(tracer, tmp_path)             # the connections exist before tracing
    cli.stdin.write("go\n")
    cli.stdin.flush()
    read_until(cli, "done")
    lines = read_lines(srv, count=N)
    recs = records(t, out, port)
    srv.stdin.close()
    srv.wait(10)
    assert len([r for r in recs if r["rport"] != 0]) == 6 * N     # no handshakes traced
    judge(recs, port, _served(lines), client_pids, holders, holders)


def test_refused_connects(tracer, tmp_path):
    port = free_port()
    t, out = trace(tracer, tmp_path)
    code = ("import socket,sys\nfor i in range(int(sys.argv[2])):\n    c=socket.socket()\n"
            "    try: c.connect(('127.0.0.1', int(sys.argv[1])))\n    except ConnectionRefusedError: pass\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(port), str(N)])
    assert p.wait(20) == 0
    recs = records(t, out, port)
    assert len(recs) == 2 * N
    assert all(r["owner_pid"] == p.pid and r["owner_source"] == "syscall" for r in recs), recs[0]
    print(f"\nowner right {len(recs)}/{len(recs)}; bcc on-CPU C-PID right "
          f"{sum(r['pid'] == p.pid for r in recs)}/{len(recs)}")


NAMED_CONNECT = r"""
import socket, sys
open("/proc/self/comm", "w").write(sys.argv[2])
c = socket.socket()
try:
    c.connect(("127.0.0.1", int(sys.argv[1])))
except ConnectionRefusedError:
    pass
"""


def _named(port: int, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NAMED_CONNECT, str(port), name])


def test_reused_pid_never_carries_the_old_process_name(tracer, tmp_path):
    port = free_port()
    t, out = trace(tracer, tmp_path)
    old = _named(port, "oldproc")
    assert old.wait(10) == 0
    for _ in range(50):       # ask the kernel for the same PID again (root PID namespace)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(old.pid - 1))
        new = _named(port, "newproc")
        assert new.wait(10) == 0
        if new.pid == old.pid:
            break
    else:
        pytest.fail("could not get the PID reused (other processes kept taking it)")
    recs = records(t, out, port)
    by_name = {}
    for r in recs:
        assert r["owner_pid"] == old.pid
        by_name.setdefault(r["owner_comm"], set()).add(r["owner_start"])
    # the last connection is the new process's: its own name and start time
    assert recs[-1]["owner_comm"] == "newproc" and recs[0]["owner_comm"] == "oldproc"
    assert by_name["oldproc"].isdisjoint(by_name["newproc"])


# The fallback of kernels before 6.4 (no sock:sock_send_length/sock_recv_length,
# e.g. Debian 12's and Ubuntu 22.04's own kernels), forced on this one
NO_IO = ("-o", 'chain=[{use="owner", kernel_io=false}]')
HOLDERS = {"prefork": (PREFORK, lambda ready: [int(x) for x in ready[-1][1:]], 1),
           "threaded": (THREADED, lambda ready: [int(ready[-1][1])], 1),
           "short-lived": (THREADED, lambda ready: [int(ready[-1][1])], N)}


@pytest.mark.parametrize("design", sorted(HOLDERS))
def test_without_send_recv_tracking_designs_without_hand_off_stay_right(tracer, tmp_path, design):
    """Compiled, loaded and as right as with send/recv tracking where nothing
    is handed off: the owner is learnt at connect, listen, accept and close."""
    code, holders_of, processes = HOLDERS[design]
    run_design(tracer, tmp_path, code, holders_of, processes=processes, extra=NO_IO)


def test_without_send_recv_tracking_a_hand_off_is_unknown_until_the_close(tracer, tmp_path):
    """The fallback of kernels without the send/recv tracepoints: the kernel
    sees the accept, then the dispatcher's close() of its own descriptor while
    the worker still holds the socket (syscalls:sys_enter_close), so between
    the hand-off and the worker's close the socket is `unknown` — never its
    accepter, which no longer holds it (it did name the accepter before); the
    worker's close and everything after it name the worker."""
    def unknown_until_close(recs, port, served, clients_in_order, holders, servers):
        truths = _truths(recs, port, served, clients_in_order, holders, servers)
        judged = 0
        for r in recs:
            if r["rport"] in (0, port) or (r["oldstate"], r["newstate"]) in PRE_ACCEPT:
                continue
            worker = truths[id(r)]
            if r["oldstate"] in ("CLOSE_WAIT", "LAST_ACK") or r["newstate"] == "LAST_ACK":
                assert r["owner_pid"] in worker, r
            else:
                # the dispatcher closed its copy before the worker served: gone
                assert (r["owner_pid"], r["owner_source"]) == (None, "unknown"), r
                judged += 1
        assert judged >= N
    run_design(tracer, tmp_path, DISPATCHER, lambda ready: [int(ready[-1][1])], extra=NO_IO,
               judged=unknown_until_close)
