"""How a connection ended, on the real tracepoint: the socket's error read in
the kernel at its ->CLOSE (sock.sk_err at the running kernel's BTF offset)
tells a refused connect from one that timed out, one an ICMP error ended, and
one its own process gave up; a RST received from an abort on our side."""

from __future__ import annotations

import errno
import dataclasses
import json
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from traffic import free_port, refused, wait_port_settled

LINGER_0 = struct.pack("ii", 1, 0)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
BTF = Path("/sys/kernel/btf/vmlinux")

needs_btf = pytest.mark.skipif(not BTF.exists(),
                               reason="no kernel BTF (/sys/kernel/btf/vmlinux): the error is not read; "
                                      "tests/test_connections.py covers the `failed` fallback")


def _records(out: str) -> list[dict]:
    """The connection records of a JSON Lines output (an in-band loss notice, a
    record of its own type, may stand between them when the host lost events)."""
    recs = (json.loads(line) for line in out.splitlines() if line.strip())
    return [r for r in recs if r.get("type") == "connection"]


class FullListener:
    """A listener whose accept queue is full (backlog 0, one connection
    queued and never accepted): the kernel drops every further SYN, so a
    connect to it gets no answer at all."""

    def __init__(self, port: int) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(0)
        self.first = socket.create_connection(("127.0.0.1", port))

    def close(self) -> None:
        self.first.close()
        self.srv.close()


def timed_out_connect(port: int) -> int:
    """A connect nobody answers, given up by the kernel: TCP_USER_TIMEOUT
    100 ms ends it at the first SYN retransmission (~1 s). Returns its port."""
    c = socket.socket()
    c.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, 100)
    c.bind(("127.0.0.1", 0))
    cport = c.getsockname()[1]
    c.settimeout(10)
    with pytest.raises(OSError) as exc:
        c.connect(("127.0.0.1", port))
    # the premise, checked: the kernel's own verdict was a timeout
    assert exc.value.errno == 110 or isinstance(exc.value, TimeoutError), exc.value
    c.close()
    return cport


def abandoned_connect(port: int) -> int:
    """A connect its own process closes while the SYN is unanswered."""
    c = socket.socket()
    c.bind(("127.0.0.1", 0))
    cport = c.getsockname()[1]
    c.setblocking(False)
    assert c.connect_ex(("127.0.0.1", port)) == 115        # EINPROGRESS
    time.sleep(0.05)                                         # SYN_SENT for a while
    c.close()
    return cport


def reset_by_peer(port: int) -> tuple[int, int]:
    """An established connection the server aborts (SO_LINGER 0): the client
    receives the RST while it still holds the socket. (client port, server port)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = srv.accept()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        accepted.close()
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        cport = client.getsockname()[1]
        client.close()
    return cport, port


def half_closed(port: int, end: str) -> int:
    """A client that shuts down its sending side and, once in FIN_WAIT2 (its
    FIN acknowledged, the server's end still open), ends as `end` says:
    "linger0" (SO_LINGER 0 and close: an abort, a RST sent), "unread" (close
    with the server's answer unread: an abort), "linger2" (TCP_LINGER2 -1 and
    close: the kernel orphans it, then aborts it, a RST sent, instead of
    keeping a FIN_WAIT2 timewait), "orphan" (a plain close: the
    kernel keeps it as a FIN_WAIT2 timewait) or "peer_fin" (the server closes
    first, then the client). Returns the client's port."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = srv.accept()
        client.shutdown(socket.SHUT_WR)
        assert accepted.recv(1) == b""                     # the client's FIN is in
        # the premise: the client is in FIN_WAIT2 (tcp_info's first byte) —
        # once the server's ACK of the FIN, which may be delayed, is in
        deadline = time.monotonic() + 5
        while client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != 5:
            assert time.monotonic() < deadline, "the client never reached FIN_WAIT2"
            time.sleep(0.005)
        cport = client.getsockname()[1]
        if end == "linger0":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        elif end == "linger2":
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, -1)
        elif end == "unread":
            accepted.sendall(b"answer")
            assert select.select([client], [], [], 5)[0], "the answer never arrived"
        elif end == "peer_fin":
            accepted.close()
            client.settimeout(5)
            assert client.recv(1) == b""                   # the server's FIN is in
        client.close()
        if end == "linger2":
            # the premise: it was an abort (the server's CLOSE_WAIT ends, by the RST)
            deadline = time.monotonic() + 5
            while accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != 7:
                assert time.monotonic() < deadline, "no RST from the TCP_LINGER2 -1 close"
                time.sleep(0.005)
        accepted.close()
    return cport


@needs_btf
@pytest.mark.kernel
def test_an_abort_after_shutdown_is_a_reset_an_orderly_end_normal(tracer):
    """FIN_WAIT2->CLOSE is an orderly end (the peer's FIN, or the socket's own
    close) or an abort by its own side, which stores no error: told apart by
    the socket's flags at the close."""
    ports = {end: free_port() for end in ("linger0", "unread", "linger2", "orphan", "peer_fin")}
    t = tracer("--connections", "--sink", "jsonl", "-D", ",".join(map(str, ports.values())))
    clients = {end: half_closed(port, end) for end, port in ports.items()}
    for port in ports.values():
        wait_port_settled(port, timeout=2.0)
    rc, out, err = t.stop()
    assert rc == 0, err
    got = {end: [(r["ending"], r["error"], r["last_state"]) for r in _records(out)
                 if (r["lport"], r["rport"]) == (clients[end], ports[end])] for end in ports}
    assert got == {"linger0": [("reset", None, "FIN_WAIT2")], "unread": [("reset", None, "FIN_WAIT2")],
                   "linger2": [("reset", None, "FIN_WAIT2")], "orphan": [("normal", None, "FIN_WAIT2")], "peer_fin": [("normal", None, "FIN_WAIT2")]}, got


@needs_btf
@pytest.mark.kernel
def test_refused_timed_out_abandoned_and_reset_are_told_apart(tracer):
    dead, silent, server = free_port(), free_port(), free_port()
    # no port filter: the aborting server's record has the client's port as its remote one
    t = tracer("--connections", "--sink", "jsonl")
    refused(dead)
    full = FullListener(silent)
    try:
        timed_out = timed_out_connect(silent)
        gave_up = abandoned_connect(silent)
    finally:
        full.close()
    client, _ = reset_by_peer(server)
    for port in (dead, silent, server):
        wait_port_settled(port, timeout=2.0)
    rc, out, err = t.stop()
    assert rc == 0, err
    assert "sk_err" not in err, err          # the offset was found: no warning
    ours = {dead, silent, server}
    recs = [r for r in _records(out) if r["rport"] in ours or r["lport"] in ours]
    by_lport = {r["lport"]: r for r in recs}

    (ref,) = [r for r in recs if r["rport"] == dead]
    assert (ref["ending"], ref["error"], ref["last_state"]) == ("refused", "ECONNREFUSED", "SYN_SENT"), ref

    to = by_lport[timed_out]
    assert (to["ending"], to["error"], to["last_state"]) == ("timeout", "ETIMEDOUT", "SYN_SENT"), to
    # it waited for the SYN retransmission: about a second in SYN_SENT
    assert 0.5e6 < to["states_us"]["SYN_SENT"] < 5e6, to

    ab = by_lport[gave_up]
    assert (ab["ending"], ab["error"], ab["last_state"]) == ("abandoned", None, "SYN_SENT"), ab

    rs = by_lport[client]
    assert (rs["ending"], rs["error"], rs["last_state"]) == ("reset", "ECONNRESET", "ESTABLISHED"), rs
    # the aborting side itself had no error: still a reset (an abort)
    (aborter,) = [r for r in recs if r["lport"] == server and r["rport"] == client]
    assert (aborter["ending"], aborter["error"]) == ("reset", None), aborter


@needs_btf
@pytest.mark.kernel
def test_csv_and_text_carry_the_ending_and_error(tracer):
    dead = free_port()
    t = tracer("--connections", "-s", "-D", str(dead))
    refused(dead)
    wait_port_settled(dead, timeout=2.0)
    rc, out, err = t.stop()
    assert rc == 0, err
    head, *rows = out.splitlines()
    cols = head.split(",")
    (row,) = [dict(zip(cols, r.split(","))) for r in rows if r.split(",")[cols.index("RPORT")] == str(dead)]
    assert (row["END"], row["ERROR"]) == ("refused", "ECONNREFUSED"), row


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclasses.dataclass
class NetnsPair:
    client: str
    router: str
    router_dev: str


@pytest.fixture
def icmp_router():
    """Two network namespaces joined by a veth pair: `client` (10.77.0.1,
    fd77::1) routes 10.78.0.0/24 and fd78::/64 through `router` (10.77.0.2,
    fd77::2), which forwards and has an `unreachable` route for them, so a SYN
    there is answered with an ICMP host unreachable (ICMPv6 no route) — the
    only way to get an ICMP error on this machine."""
    if shutil.which("ip") is None:
        pytest.fail("no `ip` command: apt-get install iproute2 (./test.sh installs it)")
    tag = uuid.uuid4().hex[:6]
    client, router = f"tcps-c-{tag}", f"tcps-r-{tag}"
    _ip("netns", "add", client)
    try:
        _ip("netns", "add", router)
        _ip("link", "add", f"tc{tag}", "netns", client, "type", "veth", "peer", "name", f"tr{tag}",
            "netns", router)
        _ip("-n", client, "addr", "add", "10.77.0.1/24", "dev", f"tc{tag}")
        _ip("-n", router, "addr", "add", "10.77.0.2/24", "dev", f"tr{tag}")
        # nodad: usable at once, not after duplicate address detection
        _ip("-n", client, "-6", "addr", "add", "fd77::1/64", "dev", f"tc{tag}", "nodad")
        _ip("-n", router, "-6", "addr", "add", "fd77::2/64", "dev", f"tr{tag}", "nodad")
        for ns, dev in ((client, f"tc{tag}"), (router, f"tr{tag}")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", client, "route", "add", "10.78.0.0/24", "via", "10.77.0.2")
        _ip("-n", router, "route", "add", "unreachable", "10.78.0.0/24")
        _ip("-n", client, "-6", "route", "add", "fd78::/64", "via", "fd77::2")
        _ip("-n", router, "-6", "route", "add", "unreachable", "fd78::/64")
        subprocess.run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                        "net.ipv6.conf.all.forwarding=1"], check=True, capture_output=True, timeout=10)
        yield NetnsPair(client, router, f"tr{tag}")
    finally:
        for ns in (client, router):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


# A blocking connect (no timeout: Python would poll and read SO_ERROR, which
# clears the error). The first SYN's ICMP error comes back inside connect()
# itself, while the process holds the socket: the kernel keeps it as a soft
# error and retries. The retransmitted SYN's error arrives in softirq, with
# the socket free, and ends the connect with it (sk_err) about a second later.
CONNECT = """
import signal, socket, sys
signal.alarm(20)
addr = sys.argv[2]
c = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
try:
    c.connect((addr, int(sys.argv[1])))
except OSError as exc:
    print(c.getsockname()[1], exc.errno, flush=True)
"""


# the router's unreachable route answers IPv4 with "host unreachable" and
# IPv6 with "no route to destination", which the kernel maps to ENETUNREACH
@needs_btf
@pytest.mark.kernel
@pytest.mark.parametrize("addr,app_errno", [("10.78.0.5", errno.EHOSTUNREACH),
                                            ("fd78::5", errno.ENETUNREACH)])
def test_a_connect_ended_by_an_icmp_error_is_unreachable(tracer, icmp_router, addr, app_errno):
    port = free_port()
    t = tracer("--connections", "--sink", "jsonl", "-D", str(port))
    # the premise: the application saw the ICMP error's errno
    r = _client_record(t, icmp_router.client, CONNECT, [str(port), addr], port, app_errno)
    assert r["raddr"] == addr
    assert (r["ending"], r["error"], r["last_state"]) == (
        "unreachable", errno.errorcode[app_errno], "SYN_SENT"), r


def _client_record(t, netns: str, script: str, args: list[str], port: int, app_errno: int) -> dict:
    """Run a client script in netns (it prints its local port and the errno
    it got), stop the tracer and return the client's connection record,
    after checking the application saw app_errno."""
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script, *args],
                          capture_output=True, text=True, timeout=30)
    rc, out, err = t.stop()
    assert rc == 0, err
    cport, seen = (int(x) for x in done.stdout.split())
    assert seen == app_errno, done
    (r,) = [r for r in _records(out) if r["lport"] == cport and r["rport"] == port]
    return r


def test_without_btf_the_error_is_not_read_and_says_so(tmp_path):
    """No kernel BTF (or one without sock.sk_err of 4 bytes): no -D flag, and
    the reason names what is lost; the records then say `failed` for a connect
    that did not complete (tests/test_connections.py, ending unit tests)."""
    from tcpstates.plugins.kernel.probe import connection_error_cflags
    cflags, why = connection_error_cflags(str(tmp_path / "no-vmlinux"))
    assert cflags == [] and "sk_err" in why and "`failed`" in why
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\0" * 64)                      # not BTF at all
    cflags, why = connection_error_cflags(str(bad))
    assert cflags == [] and "bad magic" in why
    if BTF.exists():
        cflags, why = connection_error_cflags()
        assert why is None and [f.partition("=")[0] for f in cflags] == [
            "-DTCPSTATES_OFF_SOCK_SK_ERR", "-DTCPSTATES_OFF_TCP_SOCK_SEGS_OUT", "-DTCPSTATES_OFF_SOCK_SK_FLAGS",
            "-DTCPSTATES_OFF_TCP_SOCK_LINGER2"]


@needs_btf
def test_a_kernel_without_sk_flags_still_reads_the_error(monkeypatch):
    """A kernel whose BTF names no sock.sk_flags (an older layout than this
    machine's, which cannot exist here: the member lookup is made to fail for
    it alone) keeps sk_err and segs_out; only the FIN_WAIT2 abort goes."""
    from tcpstates.btf import BTF as Btf
    from tcpstates.btf import BTFError
    from tcpstates.plugins.kernel.probe import connection_error_cflags
    member = Btf.member

    def no_flags(self, struct_name: str, path: str):
        if path.endswith("flags"):
            raise BTFError(f"struct {struct_name} has no member {path!r}")
        return member(self, struct_name, path)

    monkeypatch.setattr(Btf, "member", no_flags)
    cflags, why = connection_error_cflags()
    assert why is None and [f.partition("=")[0] for f in cflags] == [
        "-DTCPSTATES_OFF_SOCK_SK_ERR", "-DTCPSTATES_OFF_TCP_SOCK_SEGS_OUT"]


# Ephemeral ports run out (a namespace of its own: its port range is two
# ports, both held): connect() fails with EADDRNOTAVAIL inside the kernel's
# own connect, after it moved the socket to SYN_SENT and before any SYN. The
# errno goes to the caller alone (sk_err stays 0), as it does when a process
# closes its own connect: only whether the SYN left tells them apart.
EXHAUST_CONNECT = """
import signal, socket, subprocess
signal.alarm(20)
subprocess.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40001"], check=True)
srv = socket.socket(); srv.bind(("127.0.0.1", 7000)); srv.listen(16)
held = [socket.create_connection(("127.0.0.1", 7000)) for _ in range(2)]
c = socket.socket()
try:
    c.connect(("127.0.0.1", 7000))
    print("connected", flush=True)
except OSError as exc:
    print(exc.errno, flush=True)
"""


@needs_btf
@pytest.mark.kernel
def test_a_connect_that_fails_inside_connect_is_failed_not_abandoned(tracer):
    tag = uuid.uuid4().hex[:6]
    ns = f"tcps-p-{tag}"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        t = tracer("--connections", "--sink", "jsonl", "-D", "7000")
        done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", EXHAUST_CONNECT],
                              capture_output=True, text=True, timeout=30)
        rc, out, err = t.stop()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert rc == 0, err
    assert done.stdout.split() == [str(errno.EADDRNOTAVAIL)], done     # the premise
    recs = [r for r in _records(out) if r["raddr"] == "127.0.0.1" and r["rport"] == 7000]
    # the failed one never had a local port: the only record with none
    (failed,) = [r for r in recs if r["lport"] == 0]
    assert (failed["ending"], failed["error"], failed["last_state"]) == ("failed", None, "SYN_SENT"), failed


# An established connection whose peer goes silent (its link goes down: the
# segments vanish, no ICMP comes back): the data is retransmitted until
# TCP_USER_TIMEOUT (300 ms) runs out and the kernel ends it with ETIMEDOUT.
SERVER = """
import signal, socket, sys
signal.alarm(30)
s = socket.socket()
s.bind(("10.77.0.2", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
a, _ = s.accept()
a.recv(16)
signal.pause()
"""
SILENCED = """
import signal, socket, subprocess, sys
signal.alarm(20)
port, router, dev = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = socket.create_connection(("10.77.0.2", port), timeout=5)
c.settimeout(None)
c.sendall(b"hi")
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 300)
subprocess.run(["ip", "-n", router, "link", "set", dev, "down"], check=True)
try:
    while True:
        c.send(b"x" * 1024)
        c.recv(1)
except OSError as exc:
    print(c.getsockname()[1], exc.errno, flush=True)
"""


@needs_btf
@pytest.mark.kernel
def test_an_established_connection_whose_peer_went_silent_is_a_timeout(tracer, icmp_router):
    port = free_port()
    t = tracer("--connections", "--sink", "jsonl", "-D", str(port))
    server = subprocess.Popen(["ip", "netns", "exec", icmp_router.router, sys.executable, "-c", SERVER,
                               str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "listening\n"
        # the premise: the application saw ETIMEDOUT
        r = _client_record(t, icmp_router.client, SILENCED,
                           [str(port), icmp_router.router, icmp_router.router_dev], port, errno.ETIMEDOUT)
    finally:
        server.kill()
        server.wait(10)
    assert (r["ending"], r["error"], r["last_state"]) == ("timeout", "ETIMEDOUT", "ESTABLISHED"), r
