"""The `kernel` source: live events from the sock:inet_sock_set_state tracepoint."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from tcpstates.api import Aggregates, KernelConstraints, RunContext, Source
from tcpstates.errors import UsageError
from tcpstates.events import Event, connection_of
from tcpstates.options import option
from tcpstates.plugins.kernel.pushdown import MAX_RULES


@dataclasses.dataclass
class KernelOptions:
    buffer: str = option("auto", "auto, ring (BPF ring buffer, Linux >= 5.8) or perf (perf buffer)",
                         choices=("auto", "ring", "perf"))
    buffer_pages: int = option(2048, "kernel buffer size in pages, a power of two (ring: total; perf: per CPU)",
                              min=1, max=1 << 18)
    max_sockets: int = option(65536, "sockets tracked for durations (LRU map entries)",
                              min=1024, max=1 << 24)
    # 512: a batch's objects stay in the CPU caches from decoding to the sink
    # (measured in a 2-thread storm, JSON Lines with the owner: 8192 -> 512 took
    # ≈ 2.1 -> 1.75 µs/event, with 40x fewer page faults; text unchanged)
    batch_size: int = option(512, "most events read per batch", min=1, max=1 << 20)
    wakeup: str = option("timer", "timer: the kernel never wakes the reader, which polls every "
                         "poll_ms (cheapest for the traced load); adaptive: woken per batch (lowest latency)",
                         choices=("timer", "adaptive"))
    poll_ms: int = option(50, "reader poll interval with wakeup = \"timer\" (latency bound)",
                          min=1, max=1000)
    mode: str = option("transitions", "transitions: one record per state change; connections: one "
                       "record per connection when it closes, accumulated in the kernel (--connections)",
                       choices=("transitions", "connections"))
    aggregates: str = option("auto", "auto: when a sink takes aggregates (--summary, metrics), count "
                             "histograms in the kernel (and send no records at all when nothing needs "
                             "them); off: such sinks count from the records in user space",
                             choices=("auto", "off"))
    attach: str = option("auto", "how the program attaches to the tracepoint: auto (a raw tracepoint where "
                         "the kernel's BTF gives the socket's layout, else tracepoint), raw, or tracepoint "
                         "(perf-event: skips a state change that interrupts another tracing program, "
                         "counted as a kernel miss)", choices=("auto", "raw", "tracepoint"))
    crosscheck: bool = option(True, "count the tracepoint's hits independently in the kernel (a private "
                              "ftrace instance) and report every event neither seen nor counted as "
                              "'unaccounted'")

    def validate(self) -> None:
        if self.buffer_pages & (self.buffer_pages - 1):
            raise ValueError(f"buffer_pages: expected a power of two, got {self.buffer_pages}")


CFLAG = re.compile(r"-D[A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.+-]*)?")


def merge_constraints(constraints: list[KernelConstraints]) -> KernelConstraints:
    """AND every filter's constraints together (intersection of port sets,
    address and process rules side by side: the kernel tests each)."""
    merged = KernelConstraints()
    for c in constraints:
        for attr in ("local_ports", "remote_ports", "transitions"):
            mine, theirs = getattr(merged, attr), getattr(c, attr)
            if theirs is not None:
                setattr(merged, attr, theirs if mine is None else mine & theirs)
        if c.family is not None:
            if merged.family is not None and merged.family != c.family:
                raise UsageError("the chain keeps only IPv4 and only IPv6 at once: nothing could "
                                 "pass; drop one of the family filters (-4/-6)")
            merged.family = c.family
        # each filter's address/process test is one more rule the kernel ANDs
        merged.address_rules += c.address_rules
        merged.process_rules += c.process_rules
        if c.min_span_ns is not None:
            merged.min_span_ns = max(merged.min_span_ns or 0, c.min_span_ns)
        if c.span_ranges is not None:     # per state: the tighter bound of each side
            ranges = dict(merged.span_ranges or {})
            for state, (lo, hi) in c.span_ranges.items():
                have = ranges.get(state)
                ranges[state] = (lo, hi) if have is None else (max(have[0], lo), min(have[1], hi))
            merged.span_ranges = ranges
        for flag in c.cflags:    # optional parts asked for by chain stages (union)
            if not CFLAG.fullmatch(flag):
                raise UsageError(f"a chain stage asked the kernel stage for {flag!r}: "
                                 f"only -DNAME or -DNAME=VALUE switches are accepted")
            if flag.startswith("-DTCPSTATES_TEST_"):
                # the test suite's fault injection loses events on purpose: only the
                # environment turns it on, and the tracer then says so
                raise UsageError(f"a chain stage asked the kernel stage for {flag!r}: a test-only "
                                 f"fault-injection switch; remove it from the plugin")
            if flag not in merged.cflags:
                merged.cflags += (flag,)
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
        self._final_notes: dict[str, int] = {}
        self._aggregates = False      # request_aggregates: histograms in the kernel
        self._no_events = False       # ... and no records at all
        # connection records whose ->CLOSE the kernel never ran the program for
        # (closed = False): the exit summary names them beside the lost state
        # changes that explain them, so neither is taken for the other
        self._unclosed = 0
        if options.mode == "connections":
            context.records = "connection"

    def request_aggregates(self, *, events_needed: bool) -> bool:
        # connection records carry their own per-state times: no aggregates there
        if self.options.aggregates == "off" or self.options.mode == "connections":
            return False
        self._aggregates = True
        self._no_events = not events_needed
        self.context.aggregates = True
        return True

    def aggregates(self) -> Aggregates | None:
        if self.probe is None or self.probe.aggregates is None:
            return None
        return self.probe.aggregates.snapshot()

    def start(self, constraints: list[KernelConstraints]) -> None:
        from tcpstates.plugins.kernel.probe import KernelProbe

        merged = merge_constraints(constraints)
        o = self.options
        if max(len(merged.address_rules), len(merged.process_rules)) > MAX_RULES and self._aggregates:
            # the rules beyond MAX_RULES stay in user space: the kernel's counts
            # would include what they drop, so the sinks count from the events
            # (they read context.aggregates when they open, after this)
            self._aggregates = self._no_events = self.context.aggregates = False
        self.probe = KernelProbe(ring_pages=o.buffer_pages, max_sockets=o.max_sockets,
                                 buffer=o.buffer, local_ports=merged.local_ports,
                                 remote_ports=merged.remote_ports, family=merged.family,
                                 transitions=merged.transitions, min_span_ns=merged.min_span_ns,
                                 span_ranges=merged.span_ranges,
                                 crosscheck=o.crosscheck, warn=self.context.warn,
                                 batch_size=o.batch_size, timer_wakeup=o.wakeup == "timer",
                                 poll_s=o.poll_ms / 1000, extra_cflags=list(merged.cflags),
                                 connections=o.mode == "connections",
                                 address_rules=merged.address_rules,
                                 process_rules=merged.process_rules,
                                 aggregates=self._aggregates, no_events=self._no_events,
                                 attach=o.attach)
        if self._wakeup_fd is not None:
            self.probe.add_wakeup_fd(self._wakeup_fd)
        # measured after the (slow) compile so drift over the run starts small
        self.context.clock_offset_ns = self.context.measure_clock_offset()

    def wakeup_fd(self, fd: int) -> None:
        self._wakeup_fd = fd
        if self.probe is not None:
            self.probe.add_wakeup_fd(fd)

    def read(self, timeout: float) -> list[Event] | None:
        batch = self.probe.read(timeout)
        if batch and self.probe.connections:
            for e in batch:     # connection records are few: one per connection
                c = connection_of(e)
                if c is not None and not c.closed:
                    self._unclosed += 1
        return batch

    def loss_counters(self) -> dict[str, int]:
        return self.probe.loss_counters() if self.probe is not None else {}

    def notes(self) -> dict[str, int]:
        if self.probe is None:
            return self._final_notes
        counts = self.probe.kernel_counts()
        notes = {"via_spill_buffer": counts["spilled"], "filtered_in_kernel": counts["filtered"]}
        if self.probe.attachment.raw:
            notes["rescued_when_nested"] = counts["rescued"]
            # skips the kernel counted that were no TCP socket's (MPTCP's, SCTP's):
            # not losses, and not among the kernel misses either
            notes["not_tcp_when_nested"] = counts["not_tcp_when_nested"]
        if self.probe.connections:
            notes["connections_with_close_unseen"] = self._unclosed
        if self.probe.aggregates is not None:
            notes["aggregated_in_kernel"] = self.probe.aggregates.events()
        return notes

    def status(self) -> str:
        if self.probe is None:
            return "not attached"
        what = "connection records, " if self.probe.connections else ""
        if self._aggregates:
            what += "in-kernel histograms only, " if self._no_events else "in-kernel histograms, "
        return (f"tracing sock:inet_sock_set_state ({what}{self.probe.attachment.label}, "
                f"{self.probe.buffer} buffer); BPF compiled by a "
                f"helper process, peak RSS {self.probe.loaded.helper_peak_rss_kb // 1024} MB")

    def close(self) -> None:
        if self.probe is not None:
            self._final_notes = self.notes()   # the summary is made after close
            self.probe.close()
            self.probe = None
