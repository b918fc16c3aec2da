#!/usr/bin/env python3
"""Loopback TCP connection storm: each connection makes exactly 10 state changes.

Client: CLOSE→SYN_SENT→ESTABLISHED→FIN_WAIT1→FIN_WAIT2→CLOSE; server child:
LISTEN→SYN_RECV→ESTABLISHED→CLOSE_WAIT→LAST_ACK→CLOSE. Plus the listener's
CLOSE→LISTEN and LISTEN→CLOSE once per run. Bounded by --connections and
--seconds. Prints one JSON line: connections made, seconds, rate.

    loadgen.py --port 18500 --connections 20000 [--rate 5000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time


def worker(port: int, count: int, rate: float, deadline: float, listener: socket.socket,
           done: list[int]) -> None:
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
        a, _ = listener.accept()
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
    a = p.parse_args()
    if not 1 <= a.connections <= 5_000_000 or not 1 <= a.threads <= 16 or not 0 < a.seconds <= 3600:
        p.error("out of bounds: connections 1..5000000, threads 1..16, seconds 0..3600")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", a.port))
    listener.listen(4096)
    deadline = time.monotonic() + a.seconds
    done: list[int] = []
    per = [a.connections // a.threads + (1 if i < a.connections % a.threads else 0) for i in range(a.threads)]
    rate = a.rate / a.threads if a.rate else 0
    # one listener shared: each thread accepts the connection it just made
    # (accept order may differ across threads, which does not matter here)
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(a.port, n, rate, deadline, listener, done))
               for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    listener.close()
    made = sum(done)
    print(json.dumps({"connections": made, "seconds": round(took, 4), "rate": round(made / took, 1),
                      "events": made * 10 + 2}))


if __name__ == "__main__":
    main()
