"""bench/netns.py: each benchmark run's own network namespace, and with
time_wait "none" no TIME_WAIT in it (checked with real loopback connections
closed by their client, in a child process: the namespace is the process's)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

CHILD = r"""
import socket, sys
sys.path.insert(0, sys.argv[1])
import netns
host_tw = netns.time_wait_count()
netns.enter_fresh(sys.argv[2])
fresh_tw = netns.time_wait_count()
with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    for _ in range(3):
        c = socket.create_connection(listener.getsockname())
        a, _ = listener.accept()
        c.close()                   # the client closes first: its socket would wait
        a.recv(1)
        a.close()
print(host_tw, fresh_tw, netns.time_wait_count())
"""


def _run(mode: str) -> list[int]:
    p = subprocess.run([sys.executable, "-c", CHILD, str(BENCH), mode], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return [int(x) for x in p.stdout.split()]


@pytest.mark.kernel
def test_a_fresh_namespace_starts_without_time_wait_and_keeps_the_kernels_default():
    _host, fresh_at_start, after = _run("fresh")
    assert fresh_at_start == 0
    assert after == 3               # each client close left one, as the host's namespace does


@pytest.mark.kernel
def test_time_wait_none_leaves_no_time_wait():
    assert _run("none")[1:] == [0, 0]


def test_an_unknown_mode_is_refused():
    p = subprocess.run([sys.executable, "-c", CHILD, str(BENCH), "sometimes"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "one of fresh, none, host" in p.stderr


HOST_PORT_CHILD = r"""
import socket, sys
sys.path.insert(0, sys.argv[1])
import netns
port = int(sys.argv[2])
netns.enter_fresh("fresh")
with socket.socket() as s:          # free in the fresh namespace ...
    s.bind(("127.0.0.1", port))
print(netns.host_port_in_use(port), netns.host_port_in_use(1))
"""


@pytest.mark.kernel
def test_a_port_the_host_uses_is_seen_from_a_fresh_namespace():
    """The truth count and the tracer see every namespace's events for a port:
    a port free in the run's namespace but used in the host's must not be
    taken (review of c4b2a8b)."""
    with socket.socket() as host:
        host.bind(("127.0.0.1", 0))
        host.listen(1)
        port = host.getsockname()[1]
        p = subprocess.run([sys.executable, "-c", HOST_PORT_CHILD, str(BENCH), str(port)],
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    # ... but not in the host's; port 1 (tcpmux) is nobody's here
    assert p.stdout.split() == ["True", "False"]
