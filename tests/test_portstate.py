"""bench/portstate.py's free_port on the real kernel's ephemeral range: the
port a test listens on must never be one the kernel can give a client as its
local port (tests filter records by it)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# run in a network namespace of its own: the range is per namespace
PICK = """
import subprocess, sys
subprocess.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=" + sys.argv[1]], check=True)
sys.path.insert(0, sys.argv[2])
from portstate import free_port
print(*(free_port() for _ in range(20)))
"""


@pytest.mark.root
@pytest.mark.parametrize("low,high", [(1024, 65535), (10000, 65535), (32768, 60999)])
def test_free_port_is_never_ephemeral_even_when_the_range_covers_most_ports(low, high):
    ns = f"tcps-pr-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10)
        done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PICK, f"{low} {high}",
                               str(ROOT / "bench")], capture_output=True, text=True, timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert done.returncode == 0, done.stderr
    ports = [int(p) for p in done.stdout.split()]
    assert len(ports) == 20 and all(0 < p < 65536 for p in ports), done.stdout
    assert not [p for p in ports if low <= p <= high], (low, high, ports)
