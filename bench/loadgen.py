#!/usr/bin/env python3
"""Loopback TCP connection storm: each connection makes exactly 10 state changes.

Client: CLOSE→SYN_SENT→ESTABLISHED→FIN_WAIT1→FIN_WAIT2→CLOSE; server child:
LISTEN→SYN_RECV→ESTABLISHED→CLOSE_WAIT→LAST_ACK→CLOSE. Plus the listener's
CLOSE→LISTEN and LISTEN→CLOSE once per run. Bounded by --connections and
--seconds. Prints one JSON line: connections made, seconds, rate.

Data mode (--messages N, N >= 1): while established, each connection makes N
round trips of a --size-byte message (client send, server recv, server send,
client recv), so each connection also makes 2N TCP sends and 2N TCP receives
(the sock:sock_send_length / sock:sock_recv_length tracepoints fire for each).
The state changes stay exactly 10 per connection.

    loadgen.py --port 18500 --connections 20000 [--rate 5000] [--threads 1] [--messages 10]
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time


def recv_exact(s: socket.socket, n: int) -> None:
    """Read exactly n bytes (loopback rarely splits a small message, but may)."""
    while n > 0:
        got = len(s.recv(n))
        if not got:
            raise ConnectionError("peer closed mid-message")
        n -= got


class OwnAccept:
    """accept() the server side of *this* client: with several threads on one
    listener, a plain accept() may return another thread's connection, and the
    data exchange must talk to its own peer. The connection is already in the
    accept queue when connect() returns (loopback), so accepting under the lock
    until it shows up cannot block forever."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.lock = threading.Lock()
        self.pending: dict[int, socket.socket] = {}

    def __call__(self, client: socket.socket) -> socket.socket:
        want = client.getsockname()[1]
        with self.lock:
            while want not in self.pending:
                a, addr = self.listener.accept()
                self.pending[addr[1]] = a
            return self.pending.pop(want)


def worker(port: int, count: int, rate: float, deadline: float, listener: socket.socket,
           done: list[int], messages: int = 0, size: int = 64, own: OwnAccept | None = None) -> None:
    interval = 1.0 / rate if rate > 0 else 0.0
    start = time.monotonic()
    made = 0
    connect = socket.create_connection
    addr = ("127.0.0.1", port)
    while made < count:
        if interval:
            due = start + made * interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
        if (made & 63) == 0 and time.monotonic() > deadline:
            break
        c = connect(addr)
        # connect-only keeps the plain accept (its figures stay comparable
        # with earlier runs); data mode needs this thread's own server side
        a = own(c) if own is not None else listener.accept()[0]
        if messages:
            payload = b"x" * size
            for _ in range(messages):     # one round trip: 2 sends, 2 receives
                c.sendall(payload)
                recv_exact(a, size)
                a.sendall(payload)
                recv_exact(c, size)
        c.close()        # client closes first: FIN_WAIT1/2 on the client,
        a.close()        # CLOSE_WAIT/LAST_ACK on the server child
        made += 1
    done.append(made)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=10000, help="total, at most 5,000,000")
    p.add_argument("--rate", type=float, default=0, help="connections/s in all (0: as fast as possible)")
    p.add_argument("--threads", type=int, default=1, help="concurrent load threads (1..16)")
    p.add_argument("--seconds", type=float, default=120, help="stop after this long anyway (max 3600)")
    p.add_argument("--messages", type=int, default=0,
                   help="round trips per connection (0: connect and close only; max 10000)")
    p.add_argument("--size", type=int, default=64, help="bytes per message (1..65536)")
    a = p.parse_args()
    if (not 1 <= a.connections <= 5_000_000 or not 1 <= a.threads <= 16 or not 0 < a.seconds <= 3600
            or not 0 <= a.messages <= 10_000 or not 1 <= a.size <= 65536):
        p.error("out of bounds: connections 1..5000000, threads 1..16, seconds 0..3600, "
                "messages 0..10000, size 1..65536")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", a.port))
    listener.listen(4096)
    deadline = time.monotonic() + a.seconds
    done: list[int] = []
    per = [a.connections // a.threads + (1 if i < a.connections % a.threads else 0) for i in range(a.threads)]
    rate = a.rate / a.threads if a.rate else 0
    own = OwnAccept(listener) if a.messages else None
    # one listener shared: each thread accepts the connection it just made
    # (accept order may differ across threads, which does not matter here)
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(a.port, n, rate, deadline, listener, done,
                                                          a.messages, a.size, own))
               for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    listener.close()
    made = sum(done)
    print(json.dumps({"connections": made, "seconds": round(took, 4), "rate": round(made / took, 1),
                      "events": made * 10 + 2, "messages": made * a.messages,
                      "sends": made * a.messages * 2, "recvs": made * a.messages * 2}))


if __name__ == "__main__":
    main()
