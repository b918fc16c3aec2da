"""Small shared pieces of the fault tests: a replayable record, a bounded wait,
a line count."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import orjson


def replay_record(seq: int = 1, **fields: Any) -> bytes:
    """One JSON Lines state_change record as the jsonl sink writes it (fields override)."""
    rec = {"type": "state_change", "v": 1, "seq": seq, "time": "t", "time_ns": 1795766400 * 10**9,
           "mono_ns": 10**9 + seq, "host": "h", "skaddr": "ff", "family": "ipv4", "laddr": "10.0.0.1",
           "lport": 1, "raddr": "10.0.0.2", "rport": 2, "oldstate": "LISTEN", "newstate": "CLOSE",
           "span_us": 5, "pid": 1, "tid": 1, "comm": "x", "cgroup_id": 0}
    rec.update(fields)
    return orjson.dumps(rec) + b"\n"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0
