"""Loopback TCP traffic with known shape, on ports the test chooses.

The shape follows the bcc fixtures: the client holds the connection
`hold` seconds then closes first; the server closes `server_delay` later;
the listener closes `listener_delay` after that.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# one implementation for the tests and the benchmark
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from portstate import free_port, wait_port_settled  # noqa: E402,F401


def session(family: int, port: int, hold: float = 0.1, server_delay: float = 0.05,
            listener_delay: float = 0.02) -> int:
    """One full connection; returns the client's ephemeral port."""
    addr = "127.0.0.1" if family == socket.AF_INET else "::1"
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(8)
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(16)
        conn.sendall(b"hi")
        conn.recv(16)          # returns b"" once the client has closed
        time.sleep(server_delay)
        conn.close()
        done.set()

    t = threading.Thread(target=serve, name="tcps-srv")
    t.start()
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect((addr, port))
    cport = client.getsockname()[1]
    client.sendall(b"hello")
    client.recv(16)
    time.sleep(hold)
    client.close()
    done.wait(10)
    t.join(10)
    time.sleep(listener_delay)
    listener.close()
    # the last transitions may still be on their way (softirq); a test that
    # keeps other sockets on the port only waits the bound out
    wait_port_settled(port, timeout=2.0)
    return cport


def client_closes_first(port: int, n: int, hold: float = 0.0,
                        between: Callable[[], None] | None = None) -> list[int]:
    """n loopback connections to a fresh listener on `port`, one at a time:
    the client closes first (after `hold` seconds in ESTABLISHED), the server
    after reading its FIN; `between` runs after each. Returns the clients' ports."""
    ports = []
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(64)
        for _ in range(n):
            client = socket.create_connection(("127.0.0.1", port))
            accepted, _ = srv.accept()
            ports.append(client.getsockname()[1])
            if hold:
                time.sleep(hold)      # the time in ESTABLISHED under test, not a wait for readiness
            client.close()
            assert accepted.recv(16) == b""      # the client's FIN has arrived
            accepted.close()
            if between:
                between()
    return ports


def refused(port: int, family: int = socket.AF_INET) -> None:
    addr = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as c:
        try:
            c.connect((addr, port))
        except ConnectionRefusedError:
            return
    raise AssertionError(f"connect to {addr}:{port} was not refused")


def parse_csv(text: str) -> list[dict[str, str]]:
    lines = [l for l in text.splitlines() if l]
    if not lines:
        return []
    header = lines[0].split(",")
    return [dict(zip(header, l.split(","))) for l in lines[1:]]


def by_socket(rows: list[dict], ports: set[int]) -> list[list[dict]]:
    """Rows touching `ports`, grouped into socket lifetimes (SKADDR until CLOSE)."""
    open_: dict[str, list[dict]] = {}
    out: list[list[dict]] = []
    for r in rows:
        if int(r["LPORT"]) not in ports and int(r["RPORT"]) not in ports:
            continue
        life = open_.setdefault(r["SKADDR"], [])
        life.append(r)
        if r["NEWSTATE"] == "CLOSE":
            out.append(open_.pop(r["SKADDR"]))
    out.extend(open_.values())
    return out


def transitions(life: list[dict]) -> list[str]:
    return [life[0]["OLDSTATE"]] + [r["NEWSTATE"] for r in life]


def order_violations(rows: list[dict], ports: set[int]) -> list[str]:
    """Rows of a socket (SKADDR) touching `ports` that do not continue its
    previous row: each change must leave the state the last one entered, and
    a socket life starts from CLOSE (connect/listen) or LISTEN (accepted child)."""
    last: dict[str, str] = {}
    bad = []
    for i, r in enumerate(rows):
        if int(r["LPORT"]) not in ports and int(r["RPORT"]) not in ports:
            continue
        prev = last.get(r["SKADDR"], "CLOSE")
        ok = r["OLDSTATE"] == prev or (prev == "CLOSE" and r["OLDSTATE"] == "LISTEN")
        if not ok:
            bad.append(f"row {i}: {r['SKADDR']} {r['OLDSTATE']}->{r['NEWSTATE']} after ->{prev}")
        last[r["SKADDR"]] = r["NEWSTATE"]
    return bad
