"""Separate server and client processes for ownership tests (not threads:
the point is two PIDs), each reporting readiness on stdout."""

from __future__ import annotations

import subprocess
import sys

SERVER = r"""
import socket, sys
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(128)
print("ready", flush=True)
for line in sys.stdin:          # one line per connection to serve; EOF ends
    c, _ = s.accept()
    while c.recv(64):
        pass                    # until the client closes
    c.close()
    print("served", flush=True)
s.close()
"""

CLIENT = r"""
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()            # go
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"x")
    time.sleep(0.002)
    c.close()
    time.sleep(0.002)
print("done", flush=True)
"""


def start(code: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p
