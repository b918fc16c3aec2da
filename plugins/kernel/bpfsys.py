"""The CPU count BPF per-CPU and per-CPU-indexed maps are sized by, without bcc.

(The tracer process never loads bcc (see loader.py) and needs no bpf()
syscall either: it reads the ring buffer, the perf buffers and the per-CPU
counters (cpustate.py) through their memory mappings.)
"""

from __future__ import annotations

import os


def possible_cpus() -> int:
    """Per-CPU map values come in one slot per *possible* CPU."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n
