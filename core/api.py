"""The public API for stages: Source, Filter, Enricher and Sink base classes.

A plugin registers stage *classes* by name through the hooks in
`tcpstates.hookspecs`; the pipeline instantiates them with their validated
options and a RunContext. The per-event path is plain method calls over
batches (lists of Events), never a pluggy hook call.
"""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import os
import select
import socket
import stat
import sys
import time
from typing import Any, ClassVar, TextIO

from tcpstates.events import Event
from tcpstates.options import NoOptions
from tcpstates.text import escape_text

FILTER_POLICIES = ("skip", "drop", "fail")
SINK_POLICIES = ("ignore", "disable", "fail")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class AddressRule:
    """One address condition the kernel can test (the `address` filter).

    It matches when the local address is in one of `local` (None: any) and
    the remote address in one of `remote` (None: any); an IPv4-mapped IPv6
    address (::ffff:a.b.c.d) also matches IPv4 networks. The event passes
    when it matches, or, with `exclude`, when it does not.
    """

    local: tuple[IPNetwork, ...] | None = None
    remote: tuple[IPNetwork, ...] | None = None
    exclude: bool = False


@dataclasses.dataclass(frozen=True)
class ProcessRule:
    """One condition on the on-CPU process the kernel can test (the `process`
    filter with field = "cpu"): it matches when the TGID is in `pids` (None:
    any) and the command name is exactly one of `comms` or starts with one of
    `comm_prefixes` (comms None: any name; names and prefixes of 1..15 UTF-8
    bytes; a prefix is a glob such as `nginx*`). The event passes when it
    matches, or, with `exclude`, when it does not."""

    pids: frozenset[int] | None = None
    comms: frozenset[str] | None = None
    exclude: bool = False
    comm_prefixes: frozenset[str] = frozenset()


@dataclasses.dataclass
class KernelConstraints:
    """What a filter lets the kernel stage drop early.

    Each field narrows the traced set; None means "no constraint". A user
    space filter that implies one of these is pushed into the kernel
    automatically (its own check still runs, so correctness never depends on
    the kernel honouring it).

    `cflags` is how any chain stage (filter or enricher) asks the kernel
    stage for an optional, compiled-in part of its BPF program: `-DNAME` or
    `-DNAME=VALUE` switches (nothing else is accepted), added to the compile
    of every chain stage that asks (e.g. the owner enricher's
    `-DTCPSTATES_OWNER` with offsets from the running kernel's BTF). Sources
    other than the kernel ignore them.
    """

    local_ports: frozenset[int] | None = None
    remote_ports: frozenset[int] | None = None
    family: int | None = None   # socket.AF_INET or AF_INET6
    #: (oldstate, newstate) pairs to keep (kernel state numbers 1..12)
    transitions: frozenset[tuple[int, int]] | None = None
    #: drop events whose *known* time in the old state is shorter (unknown passes)
    min_span_ns: int | None = None
    #: old state (kernel number 1..12) -> (lo, hi): drop events leaving that
    #: state whose *known* time in it is outside [lo, hi] ns (unknown passes;
    #: states not named are not judged)
    span_ranges: dict[int, tuple[int, int]] | None = None
    #: address conditions, all of which an event must pass (AND)
    address_rules: tuple[AddressRule, ...] = ()
    #: on-CPU process conditions, all of which an event must pass (AND)
    process_rules: tuple[ProcessRule, ...] = ()
    cflags: tuple[str, ...] = ()
    #: True when the fields above say all the filter decides: with them
    #: honoured, its own check removes nothing, so it needs no events in user
    #: space (a source may then stop the event stream, see Source.request_aggregates)
    complete: bool = False


@dataclasses.dataclass
class Histogram:
    """A log2 histogram of durations, bcc's print_log2_hist layout:
    `buckets[i]` counts values whose whole-microsecond count has bit length i
    (bucket 0: under 1 µs; bucket i >= 1: [2^(i-1), 2^i - 1] µs). Every value
    counted in buckets 0..i is below `upper_bound_s(i)`. `sum_ns`: their total."""

    buckets: list[int] = dataclasses.field(default_factory=list)
    sum_ns: int = 0

    @property
    def count(self) -> int:
        return sum(self.buckets)

    @staticmethod
    def upper_bound_s(i: int) -> float:
        return (1 << i) / 1e6

    def as_counts(self) -> dict[int, int]:
        """{bucket: count} of the non-empty buckets."""
        return {i: n for i, n in enumerate(self.buckets) if n}


@dataclasses.dataclass
class Aggregates:
    """A source's running totals since it started (`Source.aggregates()`):
    what per-event sinks would compute from the events the chain keeps, made
    where the events arise (the kernel stage: in BPF maps). Cumulative: each
    snapshot replaces the previous one.

    `states`: time spent in each old state (known spans only), by state
    number; `transitions`: (old, new) -> count; `extra`: named histograms
    (the kernel stage: "handshake" SYN_SENT -> ESTABLISHED, "lifetime"
    ESTABLISHED entered -> CLOSE); `local_ports`/`remote_ports`: events by
    port (port 0 not counted); `events`: state changes folded in.
    """

    events: int = 0
    states: dict[int, Histogram] = dataclasses.field(default_factory=dict)
    transitions: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    extra: dict[str, Histogram] = dataclasses.field(default_factory=dict)
    local_ports: dict[int, int] = dataclasses.field(default_factory=dict)
    remote_ports: dict[int, int] = dataclasses.field(default_factory=dict)


MAX_WARNING_CHARS = 1000


def _writable_soon(stream: TextIO, timeout_ms: int = 500) -> bool:
    """Can a warning line go to `stream` without blocking (for long)?

    Only pipes and sockets can be full; a line is shorter than PIPE_BUF, so
    once poll says the pipe has room the write completes at once.
    """
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True   # not a real descriptor (tests' StringIO): cannot block
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        return bool(poller.poll(timeout_ms))
    except InterruptedError:
        return False


class Warner:
    """Prints each distinct warning once to stderr, prefixed `tcpstates:`."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._seen: set[str] = set()
        self.dropped = 0   # warnings not written because stderr stayed full

    def warn(self, message: str, *, once_key: str | None = None) -> None:
        key = once_key or message
        if key in self._seen:
            return
        self._seen.add(key)
        stream = self._stream or sys.stderr
        if stream is None:
            return   # started with stderr closed (2>&-): nothing left to tell
        if not _writable_soon(stream):
            self.dropped += 1   # stderr is a full pipe nobody reads: never block on it
            return
        try:
            # messages quote paths, names and values from outside: one safe line
            text = escape_text(message)
            if len(text) > MAX_WARNING_CHARS:   # a hostile key or value can be megabytes
                text = text[:MAX_WARNING_CHARS] + f"... ({len(text) - MAX_WARNING_CHARS} more characters)"
            stream.write(f"tcpstates: {text}\n")
            stream.flush()
        except (OSError, ValueError):
            pass   # stderr itself is gone: nothing left to tell


@dataclasses.dataclass
class RunContext:
    """Facts shared by every stage of one run."""

    hostname: str = dataclasses.field(default_factory=socket.gethostname)
    # wall-clock ns = monotonic ns + clock_offset_ns (measured at start)
    clock_offset_ns: int = 0
    strict: bool = False
    warner: Warner = dataclasses.field(default_factory=Warner)
    # what the source's Events are: "state_change" (one per transition) or
    # "connection" (one per closed connection, events.CONNECTION in extra);
    # set by the source when it is built, read by sinks when they open
    records: str = "state_change"
    # True when the source provides Aggregates snapshots to the sinks that
    # consume them (set by the source in request_aggregates, read by those
    # sinks: they then take their figures from the snapshots, not from events)
    aggregates: bool = False
    # the account root switches to once the source is attached (--user), ""
    # for none: from then on the sink cannot open anything root could; the files
    # of tcpstates.outputs are reopened and rotated by the privileged opener
    drop_user: str = ""

    @staticmethod
    def measure_clock_offset() -> int:
        """Offset from CLOCK_MONOTONIC to CLOCK_REALTIME, in ns.

        Read as realtime bracketed by two monotonic reads, taking the
        tightest of a few tries, so the error is well under a microsecond.
        """
        best = None
        for _ in range(5):
            m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            r = time.clock_gettime_ns(time.CLOCK_REALTIME)
            m2 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if best is None or m2 - m1 < best[0]:
                best = (m2 - m1, r - (m1 + m2) // 2)
        assert best is not None
        return best[1]

    def wall_ns(self, ts_ns: int) -> int:
        return ts_ns + self.clock_offset_ns

    def warn(self, message: str, *, once_key: str | None = None) -> None:
        self.warner.warn(message, once_key=once_key)


class Stage:
    """Common to all stages: a name, a description, an options dataclass."""

    kind: ClassVar[str] = "stage"
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_on_error: ClassVar[str] = "skip"
    #: chain stages this one needs before it (inserted with default options when missing)
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any, context: RunContext) -> None:
        self.options = options
        self.context = context


class ChainStage(Stage):
    """A filter or an enricher: a link of the [[chain]]."""

    def observe_batch(self, batch: list[Event]) -> None:
        """Override to see every event the source delivers, before any filter.

        Called only when a subclass overrides it (state tracking such as socket
        ownership must not miss events that an earlier filter drops).
        """

    @classmethod
    def observes(cls) -> bool:
        return cls.observe_batch is not ChainStage.observe_batch

    def kernel_constraints(self) -> KernelConstraints | None:
        """What the kernel stage can do for this stage: drop early (filters
        only) or compile in optional parts (`cflags`, any chain stage)."""
        return None


class Filter(ChainStage):
    """Decides which events go on. Override `keep` (or `filter_batch`)."""

    kind = "filter"
    default_on_error = "skip"

    def keep(self, event: Event) -> bool:
        raise NotImplementedError

    def filter_batch(self, batch: list[Event]) -> list[Event]:
        keep = self.keep
        return [e for e in batch if keep(e)]


class Enricher(ChainStage):
    """Adds fields to `event.extra`. Override `enrich` (or `enrich_batch`)."""

    kind = "enricher"
    default_on_error = "skip"

    def enrich(self, event: Event) -> None:
        raise NotImplementedError

    def enrich_batch(self, batch: list[Event]) -> None:
        enrich = self.enrich
        for e in batch:
            enrich(e)


class Sink(Stage):
    """Writes events somewhere. `write` gets each batch after the chain."""

    kind = "sink"
    default_on_error = "ignore"
    #: True for sinks that write every field of the event (JSON, journal, forward):
    #: enrichers that are on "auto" (the owner) turn themselves on for them.
    structured: ClassVar[bool] = False
    #: True for sinks that can take their figures from `write_aggregates`
    #: snapshots instead of events (summary, metrics). When the source
    #: provides them, `context.aggregates` is True before `open`.
    consumes_aggregates: ClassVar[bool] = False

    def open(self) -> None:
        """Called once the source is attached and reading: print headers here."""

    def write(self, batch: list[Event]) -> int | None:
        """Hand the batch over. Return how many events were accepted by the OS or
        receiver (None: all). An exception may carry `written`, the events
        accepted before it; the rest count as not written."""
        raise NotImplementedError

    def write_loss(self, kind: str, count: int, total: int) -> None:
        """`count` new records were lost (`kind`: "dropped" or "kernel_misses")."""

    def flush(self) -> None:
        """Called after every batch and before close."""

    def reopen(self) -> None:
        """SIGHUP: reopen files (logrotate)."""

    def delivery_report(self) -> dict[str, int] | None:
        """For sinks whose destination confirms receipt (the forward sink's acks):
        events `queued`, `acknowledged` and `lost`, read after `close`. The exit
        summary then counts acknowledged events as written; `confirmed` = 0 says
        the destination was asked for no confirmation (the count is of events
        sent, and the summary says so). None (the default):
        written means handed to the destination without error."""
        return None

    def unfinished(self) -> int:
        """Read after `close`: events earlier counted as written whose line the
        destination never got whole (a stall cut it and the output closed before
        its rest could follow). The summary moves them to "not written"."""
        return 0

    def write_aggregates(self, snapshot: Aggregates) -> None:
        """The source's latest cumulative Aggregates (sinks that set
        `consumes_aggregates`): about every 0.5 s, before `report` on SIGUSR1
        and once more at the end, before `close`."""

    def report(self) -> None:
        """SIGUSR1: print an interim report (the summary sink does)."""

    def close(self) -> None:
        """Called once at the end, after the last flush."""


class Source(Stage):
    """Produces batches of events. The kernel probe and replay are sources."""

    kind = "source"
    #: True when the source needs root and bcc (the kernel probe)
    needs_kernel: ClassVar[bool] = False

    def start(self, constraints: list[KernelConstraints]) -> None:
        """Attach and begin buffering; called before any sink opens."""

    def read(self, timeout: float) -> list[Event] | None:
        """The next batch (possibly empty), or None when the source is done."""
        raise NotImplementedError

    def loss_counters(self) -> dict[str, int]:
        """Cumulative counts of lost records by kind ("dropped", "kernel_misses")."""
        return {}

    def notes(self) -> dict[str, int]:
        """Source facts for the exit summary that are not losses (e.g. records
        that took a slower path); shown only when non-zero."""
        return {}

    def request_aggregates(self, *, events_needed: bool) -> bool:
        """Called before `start` when an active sink consumes aggregates.
        Return True (and set `context.aggregates`) if `aggregates()` will
        provide snapshots; `events_needed` False: no sink and no chain stage
        needs the events themselves, so the source may stop delivering them."""
        return False

    def aggregates(self) -> Aggregates | None:
        """The running totals since start (see Aggregates), or None."""
        return None

    def status(self) -> str:
        """One line for the service manager (sd_notify STATUS=) once started."""
        return f"reading from {self.name}"

    def wakeup_fd(self, fd: int) -> None:
        """Make `read` return early when `fd` becomes readable (signals)."""

    def close(self) -> None:
        pass

