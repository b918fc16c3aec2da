"""The `replay` source: recorded JSON Lines back through the same pipeline.

No root, no bcc: for plugin authors' tests and for re-processing traces.
Records other than state changes (e.g. `lost`) are passed over; a record
that cannot be read is skipped, counted and reported with its line number
(fatal with --strict). Lines longer than `max_line_bytes` are skipped too.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import select
import stat
import sys
from typing import Any

import orjson

from tcpstates import interrupt
from tcpstates.api import KernelConstraints, RunContext, Source
from tcpstates.errors import UsageError
from tcpstates.events import Event
from tcpstates.options import option
from tcpstates.records import RecordError, record_event

REPORTED_SKIPS = 5
MAX_TIME_NS = (1 << 63) - 1   # as the records' own time_ns
CHUNK = 1 << 16


class LineReader:
    """Lines from a descriptor, every wait interruptible by a stop request.

    Pipes, FIFOs and terminals are polled (with the stop pipe) before each
    read; regular files and devices check for a stop between chunks, so
    /dev/zero or a huge corrupt file cannot keep the tracer from stopping.
    """

    def __init__(self, fd: int, own: bool) -> None:
        self.fd = fd
        self.own = own
        mode = os.fstat(fd).st_mode
        self.pollable = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)
        self.buf = b""
        self.pos = 0
        self.eof = False

    def readline(self, limit: int, timeout: float | None = None) -> bytes | None:
        """Up to and including the next newline, at most `limit` bytes; b"" at the end;
        None when a pipe had nothing more to read within `timeout` seconds."""
        while True:
            end = self.buf.find(b"\n", self.pos, self.pos + limit)
            if end >= 0:
                line, self.pos = self.buf[self.pos:end + 1], end + 1
                return line
            if len(self.buf) - self.pos >= limit or self.eof:
                line = self.buf[self.pos:self.pos + limit]
                self.pos += len(line)
                return line
            if self.pollable:
                if not interrupt.wait(self.fd, select.POLLIN, timeout):
                    return None
            elif interrupt.requested():
                raise interrupt.StopRequested()
            chunk = os.read(self.fd, CHUNK)
            if not chunk:
                self.eof = True
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0

    def close(self) -> None:
        if self.own:
            os.close(self.fd)


@dataclasses.dataclass
class ReplayOptions:
    path: str = option("-", "JSON Lines file to replay, '-' for stdin")
    batch_size: int = option(4096, "records per batch", min=1, max=1 << 20)
    max_line_bytes: int = option(1 << 20, "longer lines are skipped and counted", min=64, max=1 << 30)

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path: empty; give a file or '-' for stdin")


class ReplaySource(Source):
    """Events from a JSON Lines recording (the jsonl sink's format)."""

    name = "replay"
    description = "recorded JSON Lines events (the jsonl sink's format), no root needed"
    Options = ReplayOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.stream: LineReader | None = None
        self.line_no = 0
        self.skipped = 0
        self._offset_set = False
        self._fatal: UsageError | None = None

    def start(self, constraints: list[KernelConstraints]) -> None:
        if self.options.path == "-":
            if sys.stdin is None:
                raise UsageError("--replay -: there is no standard input to read")
            self.stream = LineReader(sys.stdin.fileno(), own=False)
            return
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer here (the
            # reads wait, interruptibly); cleared again for plain reads
            fd = os.open(self.options.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.close(fd)
                raise IsADirectoryError
            self.stream = LineReader(fd, own=True)
        except FileNotFoundError:
            raise UsageError(f"{self.options.path}: replay file not found") from None
        except IsADirectoryError:
            raise UsageError(f"{self.options.path}: is a directory; give a .jsonl file") from None
        except OSError as exc:
            raise UsageError(f"{self.options.path}: cannot read ({exc.strerror})") from None

    def _skip(self, why: str) -> None:
        self.skipped += 1
        message = f"{self.options.path}:{self.line_no}: skipped record: {why}"
        if self.context.strict:
            # records before this one still go out; the run ends on the next read
            self._fatal = UsageError(message)
            return
        if self.skipped <= REPORTED_SKIPS:
            self.context.warn(message + (" (further skips are only counted)" if self.skipped == REPORTED_SKIPS else ""))

    def read(self, timeout: float) -> list[Event] | None:
        try:
            return self._read(timeout)
        except interrupt.StopRequested:
            self.close()            # stopped mid-input: what was read is processed, no more
            return None
        except OSError as exc:
            raise UsageError(f"{self.options.path}: cannot read ({exc.strerror})") from None

    def _read(self, timeout: float) -> list[Event] | None:
        stream = self.stream
        if self._fatal is not None:
            raise self._fatal
        if stream is None:
            return None
        out: list[Event] = []
        limit = self.options.max_line_bytes
        while len(out) < self.options.batch_size and self._fatal is None:
            # a live pipe: hand over what we have rather than wait for a full batch
            line = stream.readline(limit + 1, timeout=0 if out else timeout)
            if line is None:
                break
            if not line:
                if not out:
                    return None
                break
            self.line_no += 1
            if len(line) > limit and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):   # discard the rest of the line
                    line = stream.readline(limit + 1)   # type: ignore[assignment]
                self._skip(f"line longer than {limit} bytes")
                continue
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                self._skip(f"not valid JSON ({exc})")
                continue
            kind = rec.get("type", "state_change") if isinstance(rec, dict) else None
            if kind == "connection":
                # a --connections recording: not an event stream; say so, never drop silently
                self._skip("a connection record (--connections); only state changes are replayed")
                continue
            if kind is not None and kind != "state_change":
                continue   # in-band notices (e.g. "lost") describe the recording, not events
            try:
                event = record_event(rec)
            except RecordError as exc:
                self._skip(str(exc))
                continue
            if not self._offset_set:
                self.context.clock_offset_ns = rec["time_ns"] - event.ts_ns
                self._offset_set = True
            elif not 0 <= event.ts_ns + self.context.clock_offset_ns <= MAX_TIME_NS:
                # each event's wall time is its mono_ns on the first record's clock:
                # one outside the epoch's range would be written as a negative or
                # 65-bit time_ns, which no schema reader (nor replay) accepts
                self._skip(f"field 'mono_ns' {event.ts_ns} puts the event outside 0..{MAX_TIME_NS} ns "
                           f"since the epoch on the recording's clock (the first record's time_ns - mono_ns)")
                continue
            out.append(event)
        return out

    def loss_counters(self) -> dict[str, int]:
        return {"replay_skipped": self.skipped} if self.skipped else {}

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.stream = None
