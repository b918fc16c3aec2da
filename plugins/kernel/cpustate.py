"""The per-CPU state the BPF program keeps (struct tcpstates_cpu in bpf/tcpstates.h),
read straight from the memory-mapped array map.

No bpf() syscall: a map syscall holds off tracepoint programs on its CPU
while it copies (the kernel counts those as misses), and a mapping costs
nothing to read. Two uses:
  * counters (drops, records handed over, filtered in the kernel, hits) for
    loss reporting and the exactness cross-check;
  * the in-flight watermark for the time-order merge: a CPU whose `hits`
    differs from its `done` is running the program right now, and its
    `start_ns` is a lower bound of that run's record timestamp.
"""

from __future__ import annotations

import mmap
import struct

# struct tcpstates_cpu: 10 x u64 read, padded to 128 bytes (a row per CPU,
# never sharing a cache line with another CPU's)
CPU_STATE = struct.Struct("<10Q")
CPU_STATE_SIZE = 128
FIELDS = ("hits", "done", "start_ns", "filtered", "ringed", "spilled", "drops")
NESTED_OTHER = 9   # the rescue's rows: skipped changes of sockets other than TCP


class CpuState:
    """The cpu_state array map of `ncpus` entries, mapped read-only."""

    def __init__(self, map_fd: int, ncpus: int) -> None:
        size = ncpus * CPU_STATE_SIZE
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        self.ncpus = ncpus
        self._mm = mmap.mmap(map_fd, size, mmap.MAP_SHARED, mmap.PROT_READ)

    def rows(self) -> list[tuple[int, ...]]:
        mm, unpack = self._mm, CPU_STATE.unpack_from
        return [unpack(mm, i * CPU_STATE_SIZE) for i in range(self.ncpus)]

    def totals(self) -> dict[str, int]:
        rows = self.rows()
        return {name: sum(r[i] for r in rows) for i, name in enumerate(FIELDS) if name != "start_ns"}

    def hits(self) -> int:
        mm, unpack = self._mm, struct.Struct("<Q").unpack_from
        return sum(unpack(mm, i * CPU_STATE_SIZE)[0] for i in range(self.ncpus))

    def in_flight_bound(self) -> int | None:
        """The smallest timestamp a record not yet visible may carry, or None
        when no CPU is running the program.

        Read per CPU in the order done, start_ns, hits (the program writes
        hits, start_ns, ..., done): if a run began after `done` was read,
        `hits` shows it, and the `start_ns` read is that run's or an earlier
        one's — a lower bound either way (one CPU's clock readings only grow).
        """
        mm, u64 = self._mm, struct.Struct("<Q").unpack_from
        bound = None
        for i in range(self.ncpus):
            base = i * CPU_STATE_SIZE
            done = u64(mm, base + 8)[0]
            start = u64(mm, base + 16)[0]
            hits = u64(mm, base)[0]
            if hits != done and (bound is None or start < bound):
                bound = start
        return bound

    def close(self) -> None:
        self._mm.close()
