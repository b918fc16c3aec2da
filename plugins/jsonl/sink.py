"""The `jsonl` sink: one JSON object per line (orjson), schema in docs/events.md.

Every record carries a sequence number that increases by one per record
(state changes and in-band `lost` records alike), so a consumer sees gaps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from tcpstates import speedups
from tcpstates.api import RunContext, Sink
from tcpstates.events import Event
from tcpstates.options import option
from tcpstates.outputs import LineOutput
from tcpstates.records import CORE_FIELDS, FAMILY_NAMES, Rfc3339, event_record, loss_record
from tcpstates.events import STATE_NAMES

_c_encode = speedups.load("tcpstates.plugins.jsonl._encode")   # optional (setup.py); the Python path is the reference
C_ENCODER_AVAILABLE = _c_encode is not None
# JSON of every state and family number as event_record renders it
_STATES = tuple(orjson.dumps(STATE_NAMES.get(i) or str(i)) for i in range(256))
_FAMILIES = tuple(orjson.dumps(FAMILY_NAMES.get(i, str(i))) for i in range(256))
CORE = frozenset(CORE_FIELDS)


@dataclasses.dataclass
class JsonlOptions:
    path: str = option("-", "file to append to (created 0640, never through a symlink), '-' for stdout")
    max_bytes: int = option(0, "rotate to PATH.1 ... before the file would exceed this size (0: never)",
                            min=0, max=1 << 50)
    keep: int = option(5, "rotated files to keep", min=1, max=1000)
    rotate_names: str = option("shift", "shift: PATH is the live file, rotated ones are renamed "
                               "PATH.1, PATH.2 ... (as logrotate); numbered: the live file is PATH.N, "
                               "N rising, never renamed (a tailer on PATH.* reads each line once)",
                               choices=["shift", "numbered"])
    stall_timeout: float = option(1.0, "seconds the reader may take nothing before a batch fails for this "
                                  "sink alone (counted as not written; the other sinks go on)",
                                  min=0.01, max=3600.0)

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path: empty; give a file path or '-' for stdout")
        if self.rotate_names == "numbered" and self.path == "-":
            raise ValueError("rotate_names: numbered needs a file path, not '-' (stdout)")


class JsonlSink(Sink):
    """JSON Lines for machines and log shippers (Fluent Bit tail/stdin)."""

    name = "jsonl"
    description = "JSON Lines, one object per event, with in-band lost-event records"
    Options = JsonlOptions
    structured = True

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        # with --user, rotations after the drop go through the privileged opener
        # (tcpstates.outputs.start_opener), which creates the new files as root
        self.output = LineOutput(options.path, max_bytes=options.max_bytes, keep=options.keep,
                                 notice=context.warn, stall_timeout=options.stall_timeout,
                                 numbered=options.rotate_names == "numbered")
        self.seq = 0
        self.rfc3339 = Rfc3339()
        self.use_c = True
        self._bad = 0
        self._host_json = orjson.dumps(context.hostname)

    def open(self) -> None:
        self.output.open()

    def write(self, batch: list[Event]) -> int | None:
        if _c_encode is not None and self.use_c:
            # the C encoder: byte-identical to write_python; events it cannot
            # render exactly come back to _one (orjson)
            self._bad = 0
            data, self.seq = _c_encode.encode(batch, self.seq, self.context.clock_offset_ns,
                                              self._host_json, _STATES, _FAMILIES, CORE, self._one)
            self.output.write(data)
            return len(batch) - self._bad if self._bad else None
        return self.write_python(batch)

    def _one(self, e: Event, seq: int) -> bytes:
        try:
            return orjson.dumps(event_record(e, seq, e.ts_ns + self.context.clock_offset_ns,
                                             self.context.hostname, self.rfc3339),
                                option=orjson.OPT_APPEND_NEWLINE)
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad += 1
            self._warn_bad(exc)
            return b""

    def _warn_bad(self, exc: Exception) -> None:
        self.context.warn(f"jsonl sink: an event could not be encoded ({exc}); it is "
                          f"skipped, counted as not written, further ones silently",
                          once_key="jsonl-encode")

    def write_python(self, batch: list[Event]) -> int | None:
        """The reference path (orjson over one dict per event)."""
        dumps, nl = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        offset = self.context.clock_offset_ns
        host, fmt = self.context.hostname, self.rfc3339
        seq = self.seq
        bad = 0
        # Appending each line to one bytearray and dropping orjson's bytes at
        # once is 5-30x faster than keeping them for a join (glibc malloc
        # behaves badly with many live ~1 KiB buffers that orjson shrinks).
        buf = bytearray()
        for e in batch:
            seq += 1
            try:
                buf += dumps(event_record(e, seq, e.ts_ns + offset, host, fmt), option=nl)
            except (TypeError, ValueError, OverflowError) as exc:
                # one record orjson cannot encode (an integer above 2^64 from a
                # replayed field, ...) costs only itself: its seq stays a gap
                bad += 1
                self._warn_bad(exc)
        # advanced before writing: events a failing write loses leave a visible gap
        self.seq = seq
        self.output.write(buf)
        return len(batch) - bad if bad else None

    def write_loss(self, kind: str, count: int, total: int) -> None:
        import time
        self.seq += 1
        rec = loss_record(kind, count, total, self.seq, time.time_ns(), self.context.hostname,
                          self.rfc3339)
        self.output.write(orjson.dumps(rec) + b"\n")

    def reopen(self) -> None:
        self.output.reopen()

    def close(self) -> None:
        self.output.close()

    def unfinished(self) -> int:
        return self.output.unfinished
