"""Connection records (--connections) on the real tracepoint: how a connection
aborted in FIN_WAIT1 ended, and a local-port filter matching a connect's
ephemeral port (which the connect's first change does not carry yet)."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest
from traffic import free_port, refused, wait_port_settled

TCP_FIN_WAIT1 = 4
LINGER_0 = struct.pack("ii", 1, 0)


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _tcp_state(s: socket.socket) -> int:
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def fin_wait1_abort(port: int, peer_resets: bool) -> int:
    """A client stuck in FIN_WAIT1 (its FIN queued behind data the server's
    full receive window does not take, so nothing can acknowledge it), then
    aborted: by the peer's RST (`peer_resets`) or by its own close with
    SO_LINGER 0. Returns the client's port."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.connect(("127.0.0.1", port))
        accepted, _ = srv.accept()
        client.setblocking(False)
        try:
            while True:               # until the server's window and our buffer are full
                client.send(b"x" * 65536)
        except BlockingIOError:
            pass
        client.shutdown(socket.SHUT_WR)
        # the test's premise, checked: FIN_WAIT1 with the FIN not acknowledged
        assert _tcp_state(client) == TCP_FIN_WAIT1
        cport = client.getsockname()[1]
        if peer_resets:
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            accepted.close()
            deadline = time.monotonic() + 5
            while _tcp_state(client) == TCP_FIN_WAIT1 and time.monotonic() < deadline:
                time.sleep(0.001)     # the RST is delivered in softirq
            client.close()
        else:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            client.close()
            accepted.close()
    wait_port_settled(port, timeout=2.0)
    return cport


@pytest.mark.kernel
def test_a_connection_aborted_in_fin_wait1_ended_in_a_reset(tracer):
    """FIN_WAIT1 -> CLOSE is never an orderly close (an ACK of the FIN goes to
    FIN_WAIT2 first): a RST received there, or an abort, is `reset`."""
    port_peer, port_self = free_port(), free_port()
    t = tracer("--connections", "--sink", "jsonl", "-D", f"{port_peer},{port_self}")
    by_peer = fin_wait1_abort(port_peer, peer_resets=True)
    by_self = fin_wait1_abort(port_self, peer_resets=False)
    rc, out, err = t.stop()
    assert rc == 0, err
    recs = {r["lport"]: r for r in _records(out)}
    assert set(recs) == {by_peer, by_self}, recs
    for r in recs.values():
        assert r["last_state"] == "FIN_WAIT1", r
        assert r["ending"] == "reset", r


@pytest.mark.kernel
def test_a_local_port_filter_keeps_a_connects_whole_record(tracer, tmp_path: Path):
    """The connect's CLOSE->SYN_SENT has local port 0 (bound after it): a
    local-port filter that the connection's port passes must not cut its start
    off (complete, first state CLOSE, its SYN_SENT time), as a record is
    judged by its ports at the close. Connections it does not pass make no
    record, not even an unclosed one when their socket's memory is reused."""
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    server, other = free_port(), free_port()
    config = tmp_path / "ports.toml"
    config.write_text(f'[[chain]]\nuse = "ports"\nlocal = ["{low}-{high}"]\n')
    t = tracer("--connections", "--sink", "jsonl", "--config", str(config))
    clients = []
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", server))
        srv.listen(8)
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", server))
            a, _ = srv.accept()
            clients.append(c.getsockname()[1])
            c.close()
            assert a.recv(1) == b""
            a.close()
    refused(other)
    wait_port_settled(server, timeout=2.0)
    rc, out, err = t.stop()
    assert rc == 0, err
    recs = [r for r in _records(out) if r["rport"] in (server, other)]
    normal = sorted((r for r in recs if r["rport"] == server), key=lambda r: r["lport"])
    assert [r["lport"] for r in normal] == sorted(clients), recs
    gone = [r for r in recs if r["rport"] == other]
    assert len(gone) == 1, recs
    for r in normal + gone:
        assert (r["complete"], r["closed"], r["first_state"]) == (True, True, "CLOSE"), r
        assert "SYN_SENT" in r["states_us"], r
        assert r["duration_us"] == pytest.approx(sum(r["states_us"].values()), abs=len(r["states_us"])), r
    assert [r["ending"] for r in normal] == ["normal"] * 3 and gone[0]["ending"] == "refused"
