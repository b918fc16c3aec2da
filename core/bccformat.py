"""bcc tcpstates' text and CSV layouts, byte for byte (upstream HEAD).

Header and row strings are bcc's own `%` formats (see docs/bcc-compat.md).
Formatting works on a whole batch and caches the HH:MM:SS string per second.
"""

from __future__ import annotations

import time
from typing import Callable

from tcpstates.events import AF_INET, STATE_NAMES, Event

HEADER_ARGS = ("SKADDR", "C-PID", "C-COMM", "IP", "LADDR", "LPORT", "RADDR", "RPORT",
               "OLDSTATE", "NEWSTATE", "MS")

DEFAULT_HEADER = "%-16s %-5s %-10.10s %s%-15s %-5s %-15s %-5s %-11s -> %-11s %s"
DEFAULT_ROW = "%-16x %-5d %-10.10s %s%-15s %-5d %-15s %-5d %-11s -> %-11s %.3f"
WIDE_HEADER = "%-16s %-5s %-16.16s %-2s %-39s %-5s %-39s %-5s %-11s -> %-11s %s"
WIDE_ROW = "%-16x %-5d %-16.16s %-2s %-39s %-5s %-39s %-5d %-11s -> %-11s %.3f"
CSV_HEADER = "%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s"
CSV_ROW = "%x,%d,%s,%s,%s,%s,%s,%d,%s,%s,%.3f"

# bcc prints an unknown state number as str(n); precompute all 256.
_STATE = [STATE_NAMES.get(i) or str(i) for i in range(256)]


def csv_field(value: str) -> str:
    """RFC 4180 quoting, only where a value needs it (bcc never quotes)."""
    if "," in value or '"' in value or "\n" in value or "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    return value


class BccFormatter:
    """Renders events as bcc tcpstates lines for one output.

    `relative_to` state for -t lives here: TIME(s) counts from the first
    event this formatter printed, as bcc counts from its first printed event.
    `wall_ns` converts an event's monotonic time to wall-clock ns for -T.
    """

    def __init__(self, *, csv: bool, wide: bool, time_col: bool, timestamp_col: bool,
                 wall_ns: Callable[[int], int]) -> None:
        self.csv = csv
        self.wide = wide and not csv    # bcc: -s wins over -w
        self.time_col = time_col
        self.timestamp_col = timestamp_col
        self.wall_ns = wall_ns
        self.first_ts_us: int | None = None
        self._clock_sec = -1
        self._clock_text = ""

    def header(self) -> str:
        prefix = ""
        if self.csv:
            if self.time_col:
                prefix += "TIME,"
            if self.timestamp_col:
                prefix += "TIME(s),"
            return prefix + CSV_HEADER % HEADER_ARGS
        if self.time_col:
            prefix += "%-8s " % "TIME"
        if self.timestamp_col:
            prefix += "%-9s " % "TIME(s)"
        if self.wide:
            return prefix + WIDE_HEADER % HEADER_ARGS
        args = HEADER_ARGS[:3] + ("",) + HEADER_ARGS[4:]
        return prefix + DEFAULT_HEADER % args

    def _clock(self, ts_ns: int) -> str:
        sec = self.wall_ns(ts_ns) // 1_000_000_000
        if sec != self._clock_sec:
            self._clock_sec = sec
            self._clock_text = time.strftime("%H:%M:%S", time.localtime(sec))
        return self._clock_text

    def lines(self, batch: list[Event]) -> list[str]:
        out = []
        append = out.append
        state = _STATE
        csv, wide, tcol, tscol = self.csv, self.wide, self.time_col, self.timestamp_col
        for e in batch:
            span_us = (e.span_ns // 1000) if e.span_ns is not None else 0
            ms = span_us / 1000
            ip = "4" if e.family == AF_INET else "6"
            old, new = state[e.oldstate & 255], state[e.newstate & 255]
            if csv:
                line = CSV_ROW % (e.skaddr, e.pid, csv_field(e.comm), ip, e.saddr, e.sport,
                                  e.daddr, e.dport, old, new, ms)
            elif wide:
                line = WIDE_ROW % (e.skaddr, e.pid, e.comm, ip, e.saddr, e.sport,
                                   e.daddr, e.dport, old, new, ms)
            else:
                line = DEFAULT_ROW % (e.skaddr, e.pid, e.comm, "", e.saddr, e.sport,
                                      e.daddr, e.dport, old, new, ms)
            if tscol or tcol:
                prefix = ""
                if tcol:
                    prefix = (self._clock(e.ts_ns) + ",") if csv else ("%-8s " % self._clock(e.ts_ns))
                if tscol:
                    ts_us = e.ts_ns // 1000
                    if self.first_ts_us is None:
                        self.first_ts_us = ts_us
                    delta = (ts_us - self.first_ts_us) / 1000000
                    prefix += ("%.6f," % delta) if csv else ("%-9.6f " % delta)
                line = prefix + line
            append(line)
        return out
