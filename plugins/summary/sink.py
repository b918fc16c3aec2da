"""The `summary` sink (`--summary`): log2 histograms of the time spent in each
state, the busiest local and remote ports, printed to stderr at exit and on
SIGUSR1 — the way bcc's histogram tools print — plus a live status line
(events/s, drops) while stderr is a terminal and stdout is not.

From the live kernel the figures are the kernel's own aggregates (counted in
BPF maps, `write_aggregates`): nothing per event in user space. From a source
without aggregates (replay, connection records) they are counted per event.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import sys
import time
from typing import Any, TextIO

from tcpstates.api import Aggregates, RunContext, Sink
from tcpstates.events import STATE_NAMES, Event, connection_of
from tcpstates.options import option


# histograms kept apart by state; beyond them (state numbers only a replayed
# file has) the time in any new state is counted under "other"
MAX_STATES = 64
OTHER_STATE = -1


def log2_histogram(counts: dict[int, int], unit: str = "usecs") -> list[str]:
    """bcc's print_log2_hist layout: bucket i holds values in [2^i, 2^(i+1)-1]."""
    if not counts:
        return []
    top = max(counts)
    peak = max(counts.values())
    lines = ["     %-19s : count     distribution" % unit]
    for i in range(top + 1):
        low = (1 << i) >> 1
        high = (1 << i) - 1
        if i == 0:
            low = high = 0
        n = counts.get(i, 0)
        stars = int(n * 40 / peak) if peak else 0
        lines.append("%10d -> %-10d : %-8d |%-40s|" % (low, high, n, "*" * stars))
    return lines


@dataclasses.dataclass
class SummaryOptions:
    top_ports: int = option(10, "how many of the busiest local and remote ports to list", min=0, max=1000)
    status: str = option("auto", "live status line on stderr: auto (terminal, stdout not), on, off",
                         choices=("auto", "on", "off"))


class SummarySink(Sink):
    """Histograms of time per state and busiest ports (--summary)."""

    name = "summary"
    description = "log2 histograms of time in each state and busiest ports, at exit and on SIGUSR1"
    Options = SummaryOptions
    # live kernel: the histograms and port counts come from the kernel's
    # aggregates (write_aggregates), nothing is counted per event here
    consumes_aggregates = True

    def __init__(self, options: Any, context: RunContext, stream: TextIO | None = None) -> None:
        super().__init__(options, context)
        self.stream = stream
        self.hists: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self.lports: collections.Counter[int] = collections.Counter()
        self.rports: collections.Counter[int] = collections.Counter()
        self.events = 0
        self.loss: dict[str, int] = {}
        err = sys.stderr
        if options.status == "on":
            self.live = True
        elif options.status == "off":
            self.live = False
        else:
            self.live = _isatty(err) and not _isatty(sys.stdout)
        self._last_status = 0.0
        self._last_events = 0

    def write_aggregates(self, snapshot: Aggregates) -> None:
        if self.context.records == "connection":
            return
        # cumulative totals: each snapshot replaces the figures
        self.hists = collections.defaultdict(collections.Counter)
        for state, hist in snapshot.states.items():
            self.hists[state] = collections.Counter(hist.as_counts())
        self.lports = collections.Counter(snapshot.local_ports)
        self.rports = collections.Counter(snapshot.remote_ports)
        self.events = snapshot.events
        if self.live:
            self._status()

    def write(self, batch: list[Event]) -> None:
        if self.context.aggregates and self.context.records != "connection":
            return            # counted in the kernel (write_aggregates)
        hists, lports, rports = self.hists, self.lports, self.rports
        if self.context.records == "connection":
            # connection records carry the time of every state they passed
            # through: the same histograms; ports count connections
            for e in batch:
                conn = connection_of(e)
                if conn is not None:
                    for state, ns in conn.state_ns.items():
                        hists[state][(ns // 1000).bit_length()] += 1
                if e.sport:
                    lports[e.sport] += 1
                if e.dport:
                    rports[e.dport] += 1
            self.events += len(batch)
            if self.live:
                self._status()
            return
        for e in batch:
            if e.span_ns is not None:
                state = e.oldstate
                if state not in hists and len(hists) >= MAX_STATES:
                    # a replayed file may carry any state number (up to 2^31): one
                    # histogram each would grow memory and the report without end
                    state = OTHER_STATE
                hists[state][(e.span_ns // 1000).bit_length()] += 1
            if e.sport:
                lports[e.sport] += 1
            if e.dport:
                rports[e.dport] += 1
        self.events += len(batch)
        if self.live:
            self._status()

    def write_loss(self, kind: str, count: int, total: int) -> None:
        self.loss[kind] = total

    def _status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < 0.5:
            return
        rate = (self.events - self._last_events) / (now - self._last_status) if self._last_status else 0
        self._last_status, self._last_events = now, self.events
        # a status line that finds stderr full (a stopped terminal) is skipped:
        # the next one says the same, newer
        self.context.warner.write_block(
            f"\r\x1b[Ktcpstates: {self.events} events, {rate:,.0f}/s, "
            f"{self.loss.get('dropped', 0)} dropped, {self.loss.get('kernel_misses', 0)} kernel misses",
            stream=self.stream, timeout=0, counted=False)

    def report(self) -> None:
        lines = []
        if self.live:
            lines.append("\r\x1b[K")          # the status line disappears
        for state in sorted(self.hists, key=lambda s: _state_name(s)):
            lines.append(f"\nstate = {_state_name(state)} (time spent in it)")
            lines.extend(log2_histogram(self.hists[state]))
        for title, counter in (("LPORT", self.lports), ("RPORT", self.rports)):
            if self.options.top_ports and counter:
                lines.append(f"\n{title:<7s} {'CONNECTIONS' if self.context.records == 'connection' else 'EVENTS'}")
                lines.extend(f"{port:<7d} {n}" for port, n in counter.most_common(self.options.top_ports))
        # at most REPORT_WAIT_S for a stderr nobody reads: never blocked for good
        # (SIGTERM could not end that wait). Not written is this sink's failure
        # (its only output): a run that delivered nothing else is not a success
        if not self.context.warner.write_block("\n".join(lines).lstrip("\n") + "\n", stream=self.stream):
            raise OSError(errno.EIO, "the report could not be written to stderr (full, stopped or closed)")

    def close(self) -> None:
        self.report()


def _state_name(state: int) -> str:
    return "other" if state == OTHER_STATE else STATE_NAMES.get(state, str(state))


def _isatty(stream: Any) -> bool:
    try:
        return stream is not None and os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
