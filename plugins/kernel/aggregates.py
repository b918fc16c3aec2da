"""The in-kernel aggregates (bpf/aggregates.bpf.h) read from their memory
mappings into a `tcpstates.api.Aggregates` snapshot.

Like cpustate.py, no bpf() syscall: a map syscall holds off the tracepoint
program on its CPU (counted kernel misses), a mapping costs nothing. The
per-CPU rows of `agg` are summed; `agg_ports` is one shared array of
2 x 65536 u64 (local ports, then remote ports), mostly zeros, so only its
non-zero words are decoded.
"""

from __future__ import annotations

import mmap
import re
import struct

from tcpstates.api import Aggregates, Histogram

NSTATES = 16
BUCKETS = 56          # TCPSTATES_AGG_BUCKETS
EXTRA = ("handshake", "lifetime")   # TCPSTATES_AGG_HANDSHAKE, TCPSTATES_AGG_LIFETIME
PORTS = 65536
# struct tcpstates_agg (bpf/tcpstates.h): events, state_sum_ns[16],
# state_hist[16][56], transitions[16][16], extra_sum_ns[2], extra_hist[2][56]
AGG_WORDS = 1 + NSTATES + NSTATES * BUCKETS + NSTATES * NSTATES + len(EXTRA) + len(EXTRA) * BUCKETS
AGG_STRUCT = struct.Struct(f"<{AGG_WORDS}Q")
AGG_SIZE = AGG_STRUCT.size
_NONZERO = re.compile(rb"[^\x00]")


def _mapped_size(size: int) -> int:
    return (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


class AggregateReader:
    """The `agg` (one row per CPU) and `agg_ports` maps, mapped read-only."""

    def __init__(self, agg_fd: int, ports_fd: int, ncpus: int) -> None:
        self.ncpus = ncpus
        self._agg = mmap.mmap(agg_fd, _mapped_size(ncpus * AGG_SIZE), mmap.MAP_SHARED, mmap.PROT_READ)
        self._ports = mmap.mmap(ports_fd, _mapped_size(2 * PORTS * 8), mmap.MAP_SHARED, mmap.PROT_READ)

    def events(self) -> int:
        u64 = struct.Struct("<Q").unpack_from
        return sum(u64(self._agg, i * AGG_SIZE)[0] for i in range(self.ncpus))

    def _sum_rows(self) -> list[int]:
        rows = [AGG_STRUCT.unpack_from(self._agg, i * AGG_SIZE) for i in range(self.ncpus)]
        return [sum(col) for col in zip(*rows)]

    def _ports_read(self) -> tuple[dict[int, int], dict[int, int]]:
        raw = self._ports[:2 * PORTS * 8]
        words = sorted({m.start() >> 3 for m in _NONZERO.finditer(raw)})
        local: dict[int, int] = {}
        remote: dict[int, int] = {}
        for w in words:
            n = struct.unpack_from("<Q", raw, w * 8)[0]
            if w < PORTS:
                local[w] = n
            else:
                remote[w - PORTS] = n
        return local, remote

    def snapshot(self) -> Aggregates:
        v = self._sum_rows()
        pos = 0
        events = v[pos]
        pos += 1
        sums = v[pos:pos + NSTATES]
        pos += NSTATES
        states = {}
        for s in range(NSTATES):
            buckets = v[pos + s * BUCKETS:pos + (s + 1) * BUCKETS]
            if any(buckets):
                states[s] = Histogram(list(buckets), sums[s])
        pos += NSTATES * BUCKETS
        transitions = {}
        for i, n in enumerate(v[pos:pos + NSTATES * NSTATES]):
            if n:
                transitions[(i // NSTATES, i % NSTATES)] = n
        pos += NSTATES * NSTATES
        extra_sums = v[pos:pos + len(EXTRA)]
        pos += len(EXTRA)
        extra = {name: Histogram(list(v[pos + k * BUCKETS:pos + (k + 1) * BUCKETS]), extra_sums[k])
                 for k, name in enumerate(EXTRA)}
        local, remote = self._ports_read()
        return Aggregates(events=events, states=states, transitions=transitions, extra=extra,
                          local_ports=local, remote_ports=remote)

    def close(self) -> None:
        self._agg.close()
        self._ports.close()
