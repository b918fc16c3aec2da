"""The `kernel` source: live events from the sock:inet_sock_set_state tracepoint."""

from __future__ import annotations

import dataclasses
from typing import Any

from tcpstates.api import KernelConstraints, RunContext, Source
from tcpstates.errors import UsageError
from tcpstates.events import Event
from tcpstates.hookspecs import hookimpl
from tcpstates.options import option


@dataclasses.dataclass
class KernelOptions:
    buffer: str = option("auto", "auto, ring (BPF ring buffer, Linux >= 5.8) or perf (perf buffer)")
    buffer_pages: int = option(2048, "kernel buffer size in pages, a power of two (ring: total; perf: per CPU)")
    max_sockets: int = option(65536, "sockets tracked for durations (LRU map entries)")
    batch_size: int = option(8192, "most events read per batch")
    wakeup: str = option("timer", "timer: the kernel never wakes the reader, which polls every "
                         "poll_ms (cheapest for the traced load); adaptive: woken per batch (lowest latency)")
    poll_ms: int = option(50, "reader poll interval with wakeup = \"timer\" (latency bound)")

    def validate(self) -> None:
        if self.buffer not in ("auto", "ring", "perf"):
            raise ValueError(f"buffer: expected auto, ring or perf, got {self.buffer!r}")
        if self.buffer_pages < 1 or self.buffer_pages & (self.buffer_pages - 1) or self.buffer_pages > 1 << 18:
            raise ValueError(f"buffer_pages: expected a power of two from 1 to 262144, got {self.buffer_pages}")
        if not 1024 <= self.max_sockets <= 1 << 24:
            raise ValueError(f"max_sockets: expected 1024 to 16777216, got {self.max_sockets}")
        if not 1 <= self.batch_size <= 1 << 20:
            raise ValueError(f"batch_size: expected 1 to 1048576, got {self.batch_size}")
        if self.wakeup not in ("timer", "adaptive"):
            raise ValueError(f"wakeup: expected timer or adaptive, got {self.wakeup!r}")
        if not 1 <= self.poll_ms <= 1000:
            raise ValueError(f"poll_ms: expected 1 to 1000, got {self.poll_ms}")


def merge_constraints(constraints: list[KernelConstraints]) -> KernelConstraints:
    """AND every filter's constraints together (intersection of port sets)."""
    merged = KernelConstraints()
    for c in constraints:
        for attr in ("local_ports", "remote_ports"):
            mine, theirs = getattr(merged, attr), getattr(c, attr)
            if theirs is not None:
                setattr(merged, attr, theirs if mine is None else mine & theirs)
        if c.family is not None:
            if merged.family is not None and merged.family != c.family:
                raise UsageError("the chain keeps only IPv4 and only IPv6 at once: nothing could "
                                 "pass; drop one of the family filters (-4/-6)")
            merged.family = c.family
    return merged


class KernelSource(Source):
    """Live TCP state changes from eBPF (bcc)."""

    name = "kernel"
    description = "live TCP state changes from the sock:inet_sock_set_state tracepoint (root, bcc)"
    Options = KernelOptions
    needs_kernel = True

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.probe: Any = None
        self._wakeup_fd: int | None = None

    def start(self, constraints: list[KernelConstraints]) -> None:
        from tcpstates.kernel_probe import KernelProbe

        merged = merge_constraints(constraints)
        o = self.options
        self.probe = KernelProbe(ring_pages=o.buffer_pages, max_sockets=o.max_sockets,
                                 buffer=o.buffer, local_ports=merged.local_ports,
                                 remote_ports=merged.remote_ports, family=merged.family,
                                 batch_size=o.batch_size, timer_wakeup=o.wakeup == "timer",
                                 poll_s=o.poll_ms / 1000)
        if self._wakeup_fd is not None:
            self.probe.add_wakeup_fd(self._wakeup_fd)
        # measured after the (slow) compile so drift over the run starts small
        self.context.clock_offset_ns = self.context.measure_clock_offset()

    def wakeup_fd(self, fd: int) -> None:
        self._wakeup_fd = fd
        if self.probe is not None:
            self.probe.add_wakeup_fd(fd)

    def read(self, timeout: float) -> list[Event] | None:
        return self.probe.read(timeout)

    def loss_counters(self) -> dict[str, int]:
        return self.probe.loss_counters() if self.probe is not None else {}

    def status(self) -> str:
        if self.probe is None:
            return "not attached"
        return (f"tracing sock:inet_sock_set_state ({self.probe.buffer} buffer); BPF compiled by a "
                f"helper process, peak RSS {self.probe.loaded.helper_peak_rss_kb // 1024} MB")

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None


@hookimpl
def tcpstates_register_sources(register: Any) -> None:
    register(KernelSource)
