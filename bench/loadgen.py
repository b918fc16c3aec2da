#!/usr/bin/env python3
"""Loopback TCP connection storm: each connection makes exactly 10 state changes.

Client: CLOSE→SYN_SENT→ESTABLISHED→FIN_WAIT1→FIN_WAIT2→CLOSE; server child:
LISTEN→SYN_RECV→ESTABLISHED→CLOSE_WAIT→LAST_ACK→CLOSE. Plus each worker's
listener's CLOSE→LISTEN and LISTEN→CLOSE once per run (--threads N: N worker
processes, each listening on its own loopback address 127.0.0.1..N, same
port). Bounded by --connections and --seconds. Prints one JSON line:
connections made, seconds, rate.

Data mode (--messages N, N >= 1): while established, each connection makes N
round trips of a --size-byte message (client send, server recv, server send,
client recv), so each connection also makes 2N TCP sends and 2N TCP receives
(the sock:sock_send_length / sock:sock_recv_length tracepoints fire for each).
The state changes stay exactly 10 per connection.

    loadgen.py --port 18500 --connections 20000 [--rate 5000] [--threads 1] [--messages 10]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import time


def recv_exact(s: socket.socket, n: int) -> None:
    """Read exactly n bytes (loopback rarely splits a small message, but may)."""
    while n > 0:
        got = len(s.recv(n))
        if not got:
            raise ConnectionError("peer closed mid-message")
        n -= got


def worker(addr: tuple[str, int], count: int, rate: float, deadline: float, listener: socket.socket,
           messages: int = 0, size: int = 64) -> int:
    """One load worker: connect, accept, (exchange), close; returns the connections made.
    The listener is this worker's own, so accept() returns the connection just made."""
    interval = 1.0 / rate if rate > 0 else 0.0
    start = time.monotonic()
    made = 0
    connect = socket.create_connection
    payload = b"x" * size
    while made < count:
        if interval:
            due = start + made * interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
        if (made & 63) == 0 and time.monotonic() > deadline:
            break
        c = connect(addr)
        a = listener.accept()[0]
        for _ in range(messages):     # one round trip: 2 sends, 2 receives
            c.sendall(payload)
            recv_exact(a, size)
            a.sendall(payload)
            recv_exact(c, size)
        c.close()        # client closes first: FIN_WAIT1/2 on the client,
        a.close()        # CLOSE_WAIT/LAST_ACK on the server child
        made += 1
    return made


def die_with_parent(parent: int) -> None:
    """A worker must not outlive a load that was killed (SIGTERM, Ctrl-C, timeout)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)          # PR_SET_PDEATHSIG
    if os.getppid() != parent:                      # the parent died before prctl
        os._exit(1)


def run_workers(port: int, counts: list[int], rate: float, deadline: float,
                messages: int, size: int) -> tuple[int, float]:
    """One process per worker, each with its own listener on its own loopback
    address (127.0.0.1, .2, ...) and the same port. Processes, not threads: two
    Python threads share one interpreter lock, and the untraced rate of a
    2-thread load jumped 2x between identical runs (the lock's hand-off pattern
    of the moment), which made every ratio at 2 load threads a coin toss.
    Returns (connections made, seconds from the start signal to the last exit)."""
    listeners = []
    for i in range(len(counts)):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((f"127.0.0.{i + 1}", port))
        except OSError as e:
            print(f"loadgen: cannot listen on 127.0.0.{i + 1}:{port} ({e.strerror}): "
                  "choose another --port", file=sys.stderr)
            raise SystemExit(2) from None
        s.listen(4096)
        listeners.append(s)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pids = []
    parent = os.getpid()
    for i, n in enumerate(counts):
        pid = os.fork()
        if pid == 0:                                # the worker
            code = 1
            try:
                die_with_parent(parent)
                os.close(go_w)
                os.close(res_r)
                for j, other in enumerate(listeners):
                    if j != i:
                        other.close()
                if os.read(go_r, 1) != b"g":        # the parent is gone: no load
                    raise ConnectionAbortedError("no start signal")
                made = worker((f"127.0.0.{i + 1}", port), n, rate, deadline, listeners[i], messages, size)
                listeners[i].close()
                os.write(res_w, f"{made}\n".encode())
                code = 0
            except BaseException as e:              # noqa: BLE001 - reported, then the worker exits
                os.write(2, f"loadgen worker {i}: {e!r}\n".encode())
            finally:
                os._exit(code)
        pids.append(pid)
    for s in listeners:
        s.close()                                   # the workers hold theirs
    os.close(go_r)
    os.close(res_w)
    t0 = time.monotonic()
    os.write(go_w, b"g" * len(counts))
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    took = time.monotonic() - t0
    os.close(go_w)
    with os.fdopen(res_r) as results:
        made = sum(int(line) for line in results)
    if failed:
        raise SystemExit(f"loadgen: {failed} of {len(counts)} workers failed (see above)")
    return made, took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=10000, help="total, at most 5,000,000")
    p.add_argument("--rate", type=float, default=0, help="connections/s in all (0: as fast as possible)")
    p.add_argument("--threads", type=int, default=1, help="concurrent load workers, one process each (1..16)")
    p.add_argument("--seconds", type=float, default=120, help="stop after this long anyway (max 3600)")
    p.add_argument("--messages", type=int, default=0,
                   help="round trips per connection (0: connect and close only; max 10000)")
    p.add_argument("--size", type=int, default=64, help="bytes per message (1..65536)")
    a = p.parse_args()
    if (not 1 <= a.connections <= 5_000_000 or not 1 <= a.threads <= 16 or not 0 < a.seconds <= 3600
            or not 0 <= a.messages <= 10_000 or not 1 <= a.size <= 65536):
        p.error("out of bounds: connections 1..5000000, threads 1..16, seconds 0..3600, "
                "messages 0..10000, size 1..65536")
    deadline = time.monotonic() + a.seconds
    per = [a.connections // a.threads + (1 if i < a.connections % a.threads else 0) for i in range(a.threads)]
    rate = a.rate / a.threads if a.rate else 0
    made, took = run_workers(a.port, per, rate, deadline, a.messages, a.size)
    print(json.dumps({"connections": made, "seconds": round(took, 4), "rate": round(made / took, 1),
                      "events": made * 10 + 2 * a.threads, "messages": made * a.messages,
                      "sends": made * a.messages * 2, "recvs": made * a.messages * 2}))


if __name__ == "__main__":
    main()
