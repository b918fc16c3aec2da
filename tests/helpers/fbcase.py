"""Shared pieces of the real-Fluent-Bit tests: traces, fixtures, comparisons."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

# the fixture (tests/conftest.py) fails the test if $FLUENT_BIT names a binary that
# cannot run, and skips it, saying why, only if there is none or this OS's C
# library is too old for it
needs_fluent_bit = pytest.mark.usefixtures("fluent_bit_binary")

BASE_NS = 1795766400_123456789


def trace(path: Path, n: int, start: int = 1) -> Path:
    """n recorded events (JSON Lines, the replay format) with distinct nanosecond times."""
    lines = []
    for i in range(start, start + n):
        lines.append(orjson.dumps({
            "type": "state_change", "v": 1, "seq": i, "time": "x", "time_ns": BASE_NS + i * 1001,
            "mono_ns": 10**9 + i, "host": "h", "skaddr": "ffff1", "family": "ipv4", "laddr": "10.0.0.1",
            "lport": 22, "raddr": "10.0.0.2", "rport": 50000 + i % 1000, "oldstate": "ESTABLISHED",
            "newstate": "FIN_WAIT1", "span_us": i, "pid": 1, "tid": 1, "comm": "sshd", "cgroup_id": 0}))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def check_exact(entries: list[tuple[str, int, dict]], n: int, *, tag: str = "tcpstates",
                time_tolerance_ns: int = 0, allow_duplicates: bool = False) -> dict:
    """sent = received by seq, fields and event time intact; the figures for the README."""
    events = [(t, r) for _, t, r in entries if r.get("type") == "state_change"]
    seqs = [r["seq"] for _, r in events]
    missing = set(range(1, n + 1)) - set(seqs)
    dups = len(seqs) - len(set(seqs))
    assert not missing, f"{len(missing)} events lost, e.g. seq {sorted(missing)[:10]}"
    if not allow_duplicates:
        assert dups == 0, f"{dups} duplicates"
    assert {tg for tg, _, _ in entries} == {tag}
    for t_ns, r in events:
        assert r["lport"] == 22 and r["newstate"] == "FIN_WAIT1" and r["span_us"] == r["seq"], r
        assert abs(t_ns - r["time_ns"]) <= time_tolerance_ns, (t_ns, r["time_ns"])
    return {"received": len(seqs), "lost": len(missing), "duplicates": dups}
