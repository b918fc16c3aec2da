"""The `replay` source: recorded JSON Lines back through the same pipeline.

No root, no bcc: for plugin authors' tests and for re-processing traces.
Records other than state changes (e.g. `lost`) are passed over; a record
that cannot be read is skipped, counted and reported with its line number
(fatal with --strict). Lines longer than `max_line_bytes` are skipped too.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import IO, Any

import orjson

from tcpstates.api import KernelConstraints, RunContext, Source
from tcpstates.errors import UsageError
from tcpstates.events import Event
from tcpstates.options import option
from tcpstates.records import RecordError, record_event

REPORTED_SKIPS = 5


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
        self.stream: IO[bytes] | None = None
        self.line_no = 0
        self.skipped = 0
        self._offset_set = False
        self._fatal: UsageError | None = None

    def start(self, constraints: list[KernelConstraints]) -> None:
        if self.options.path == "-":
            self.stream = sys.stdin.buffer if sys.stdin is not None else None
            if self.stream is None:
                raise UsageError("--replay -: there is no standard input to read")
            return
        try:
            self.stream = open(self.options.path, "rb")
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
        stream = self.stream
        if self._fatal is not None:
            raise self._fatal
        if stream is None:
            return None
        out: list[Event] = []
        limit = self.options.max_line_bytes
        while len(out) < self.options.batch_size and self._fatal is None:
            line = stream.readline(limit + 1)
            if not line:
                if not out:
                    return None
                break
            self.line_no += 1
            if len(line) > limit and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):   # discard the rest of the line
                    line = stream.readline(limit + 1)
                self._skip(f"line longer than {limit} bytes")
                continue
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                self._skip(f"not valid JSON ({exc})")
                continue
            if isinstance(rec, dict) and rec.get("type", "state_change") != "state_change":
                continue
            try:
                event = record_event(rec)
            except RecordError as exc:
                self._skip(str(exc))
                continue
            if not self._offset_set:
                self.context.clock_offset_ns = rec["time_ns"] - event.ts_ns
                self._offset_set = True
            out.append(event)
        return out

    def loss_counters(self) -> dict[str, int]:
        return {"replay_skipped": self.skipped} if self.skipped else {}

    def close(self) -> None:
        if self.stream is not None and self.stream is not getattr(sys.stdin, "buffer", None):
            self.stream.close()
        self.stream = None
