"""The `text` and `csv` sinks: bcc tcpstates' output, byte for byte.

CSV adds RFC 4180 quoting only where a value needs it (a command name with a
comma), otherwise it is bcc's `-s` output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tcpstates.api import RunContext, Sink
from tcpstates.plugins.bcc_table.connections import ConnectionFormatter
from tcpstates.plugins.bcc_table.format import BccFormatter
from tcpstates.events import Event
from tcpstates.options import option
from tcpstates.outputs import LineOutput


@dataclasses.dataclass
class CsvOptions:
    path: str = option("-", "file to append to, '-' for stdout")
    time: bool = option(False, "prefix a TIME column, HH:MM:SS (-T)")
    timestamp: bool = option(False, "prefix a TIME(s) column, seconds since the first event (-t)")
    header: bool = option(True, "print the header line first")
    owner: bool = option(False, "add O-PID/O-COMM/WORKLOAD columns: the socket's owner and its pod or container (--owner)")
    stall_timeout: float = option(1.0, "seconds the reader may take nothing before a batch fails for this "
                                  "sink alone (counted as not written; the other sinks go on)",
                                  min=0.01, max=3600.0)

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path: empty; give a file path or '-' for stdout")


@dataclasses.dataclass
class TextOptions(CsvOptions):
    wide: bool = option(False, "wide columns with an IP column, fits IPv6 (-w)")


class _BccSink(Sink):
    csv = False
    default_on_error = "ignore"

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.output = LineOutput(options.path, notice=context.warn,
                                 stall_timeout=options.stall_timeout)
        # connection records (a source in connection mode) have their own table
        cls = ConnectionFormatter if context.records == "connection" else BccFormatter
        self.formatter = cls(csv=self.csv, wide=getattr(options, "wide", False),
                                      time_col=options.time, timestamp_col=options.timestamp,
                                      wall_ns=context.wall_ns, owner=options.owner)

    def open(self) -> None:
        self.output.open()
        if self.options.header:
            self.output.write((self.formatter.header() + "\n").encode())

    def write(self, batch: list[Event]) -> None:
        data = self.formatter.encoded(batch)
        if data:
            self.output.write(data)

    def write_loss(self, kind: str, count: int, total: int) -> None:
        # bcc/libbcc report losses on stderr; stdout stays pure table/CSV.
        if kind == "replay_skipped":
            return   # already reported line by line, and in the exit summary
        what = {"dropped": "records dropped (kernel buffer full)",
                "unread_at_exit": "records still in the kernel buffers when the exit drain ran out of time",
                "unaccounted": "events the tracepoint fired for but tcpstates neither saw nor "
                               "counted (in-kernel cross-check)"}.get(
            kind, "events missed by the kernel (BPF recursion)")
        self.context.warn(f"{count} {what}, {total} in total")

    def reopen(self) -> None:
        self.output.reopen()

    def close(self) -> None:
        self.output.close()

    def unfinished(self) -> int:
        return self.output.unfinished


class TextSink(_BccSink):
    """bcc tcpstates' table: default, -w, -T and -t layouts."""

    name = "text"
    description = "bcc tcpstates table (default, -w wide, -T time, -t timestamp)"
    Options = TextOptions


class CsvSink(_BccSink):
    """bcc tcpstates -s output, with RFC 4180 quoting where needed."""

    name = "csv"
    description = "bcc tcpstates -s comma-separated values (RFC 4180 quoting where needed)"
    Options = CsvOptions
    csv = True
