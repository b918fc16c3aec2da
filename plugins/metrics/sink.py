"""The `metrics` sink: a Prometheus endpoint (prometheus-client).

Exposes, on `listen` (default 127.0.0.1:9464, path /metrics):
  tcpstates_transitions_total{old,new}          state changes by transition
  tcpstates_handshake_seconds                   SYN_SENT → ESTABLISHED (active opens)
  tcpstates_connection_lifetime_seconds         ESTABLISHED entered → CLOSE, per socket
  tcpstates_close_wait_seconds                  time spent in CLOSE_WAIT (slow app close)
  tcpstates_lost_events_total{kind}             dropped records and kernel misses
  tcpstates_connections_total{ending}           closed connections (connection records only)
With connection records (`--connections`) the histograms come from each
record's state times; transitions_total is not known then and stays empty.
Per-socket state for lifetimes is bounded (oldest forgotten first).

From the live kernel (per state change) the transitions and the three
histograms are the kernel's own aggregates (counted in BPF maps, read at
each scrape's latest snapshot, nothing per event here). Their buckets are
then the kernel's log2 ones: le = 2^i µs for i = 0..36 (0.000001, 0.000002,
... 0.008192, 0.016384, ... 68719.476736 seconds), then +Inf; every
observation counted at a bound is below it, so the
cumulative counts are exact; the fixed BUCKETS below apply when counting
from events (replay, connection records, [sources.kernel] aggregates = "off").
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from tcpstates.api import Aggregates, Histogram, RunContext, Sink
from tcpstates.errors import UsageError
from tcpstates.events import STATE_NAMES, STATE_NUMBERS, Event, connection_of
from tcpstates.options import option
from tcpstates.plugins.metrics.server import serve

# transition series kept apart; beyond them (state numbers only a replayed file
# has) every new pair is counted as old="other", new="other"
MAX_TRANSITION_SERIES = 1024
OTHER_TRANSITION = ("other", "other")
S = STATE_NUMBERS
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)

# aggregates: le = 2^i µs up to 2^36 µs (19 hours); longer only in +Inf
LOG2_TOP = 36


@dataclasses.dataclass
class MetricsOptions:
    listen: str = option("127.0.0.1:9464", "HOST:PORT of the HTTP endpoint (/metrics)")
    max_clients: int = option(8, "HTTP clients served at once; a client that has not sent its "
                              "request within 2 s, or the longest waiting one when all are taken, is cut off",
                              min=1, max=256)
    max_sockets: int = option(262144, "sockets tracked for connection lifetimes",
                              min=1024, max=1 << 24)

    def validate(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        # ASCII digits only: str.isdigit also takes "٩٤٦٤", which int() reads as 9464
        if not sep or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 0 <= int(port) <= 65535:
            raise ValueError(f"listen: expected HOST:PORT, got {self.listen!r}")


class MetricsSink(Sink):
    """Prometheus counters and histograms of TCP state changes."""

    name = "metrics"
    description = "Prometheus endpoint: transitions, handshake/lifetime/CLOSE_WAIT histograms, losses"
    Options = MetricsOptions
    consumes_aggregates = True

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        try:
            import prometheus_client as prom
        except ImportError:
            raise UsageError("the metrics sink needs prometheus-client: pip install prometheus-client "
                             "(./run.sh installs it)") from None
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        self._per_event: bool | None = None    # decided at open (context.aggregates)
        self.snapshot: Aggregates | None = None
        self.lost = prom.Counter("tcpstates_lost_events", "records dropped or missed",
                                 ["kind"], registry=self.registry)
        self.connections = prom.Counter("tcpstates_connections", "closed connections by how they ended",
                                        ["ending"], registry=self.registry)
        self.established: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._children: dict[tuple[int, int] | tuple[str, str], Any] = {}
        self.server: Any = None

    def _counting(self) -> bool:
        """Count from events (True) or serve the source's aggregates (False);
        the instruments are made once, on first need."""
        if self._per_event is None:
            self._per_event = not self.context.aggregates or self.context.records == "connection"
            prom = self.prom
            if self._per_event:
                self.transitions = prom.Counter("tcpstates_transitions", "TCP state changes",
                                                ["old", "new"], registry=self.registry)
                self.handshake = prom.Histogram("tcpstates_handshake_seconds", "SYN_SENT to ESTABLISHED",
                                                buckets=BUCKETS, registry=self.registry)
                self.lifetime = prom.Histogram("tcpstates_connection_lifetime_seconds",
                                               "from entering ESTABLISHED to CLOSE", buckets=BUCKETS,
                                               registry=self.registry)
                self.close_wait = prom.Histogram("tcpstates_close_wait_seconds",
                                                 "time spent in CLOSE_WAIT", buckets=BUCKETS,
                                                 registry=self.registry)
            else:
                self.registry.register(_AggregateCollector(self))
        return self._per_event

    def write_aggregates(self, snapshot: Aggregates) -> None:
        if not self._counting():
            self.snapshot = snapshot     # one reference swap: the scrape thread reads it

    def open(self) -> None:
        self._counting()
        host, _, port = self.options.listen.rpartition(":")
        try:
            self.server, self._thread = serve(self.prom.make_wsgi_app(self.registry), host.strip("[]"),
                                              int(port), self.options.max_clients)
        except OSError as exc:
            raise UsageError(f"metrics sink: cannot listen on {self.options.listen} ({exc.strerror}); "
                             f"pick another with -o sinks.metrics.listen=HOST:PORT") from None

    def _write_connections(self, batch: list[Event]) -> None:
        endings: collections.Counter[str] = collections.Counter()
        syn_sent, established, close_wait = S["SYN_SENT"], S["ESTABLISHED"], S["CLOSE_WAIT"]
        for e in batch:
            c = connection_of(e)
            if c is None:
                continue
            endings[c.ending] += 1
            states = c.state_ns
            if established in states:
                if syn_sent in states and c.complete:
                    self.handshake.observe(states[syn_sent] / 1e9)
                # from entering ESTABLISHED to CLOSE: the lifetime minus the handshake
                before = states.get(syn_sent, 0) + states.get(S["SYN_RECV"], 0)
                if c.complete and c.closed:   # else ESTABLISHED began, or it ended, unseen
                    self.lifetime.observe((c.duration_ns - before) / 1e9)
            if close_wait in states:   # only a time seen from its start is kept
                self.close_wait.observe(states[close_wait] / 1e9)
        for ending, n in endings.items():
            self.connections.labels(ending).inc(n)

    def write(self, batch: list[Event]) -> None:
        if not self._counting():
            return           # counted in the kernel (write_aggregates)
        if self.context.records == "connection":
            self._write_connections(batch)
            return
        counts: collections.Counter[tuple[int, int]] = collections.Counter()
        est = self.established
        for e in batch:
            counts[(e.oldstate, e.newstate)] += 1
            span = e.span_ns
            if e.newstate == S["ESTABLISHED"]:
                est[e.skaddr] = e.ts_ns
                if len(est) > self.options.max_sockets:
                    est.popitem(last=False)
                if e.oldstate == S["SYN_SENT"] and span is not None:
                    self.handshake.observe(span / 1e9)
            elif e.oldstate == S["CLOSE_WAIT"] and span is not None:
                self.close_wait.observe(span / 1e9)
            if e.newstate == S["CLOSE"]:
                start = est.pop(e.skaddr, None)
                if start is not None:
                    self.lifetime.observe((e.ts_ns - start) / 1e9)
        for pair, n in counts.items():
            key: tuple[int, int] | tuple[str, str] = pair
            child = self._children.get(key)
            if child is None:
                if len(self._children) >= MAX_TRANSITION_SERIES:
                    # a replayed file may carry any state number (up to 2^31): one
                    # series per pair would grow the page and the memory without end
                    key = OTHER_TRANSITION
                    child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self.transitions.labels(
                        *(STATE_NAMES.get(k, str(k)) if isinstance(k, int) else k for k in key))
            child.inc(n)

    def write_loss(self, kind: str, count: int, total: int) -> None:
        self.lost.labels(kind).inc(count)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _log2_histogram(prom: Any, name: str, doc: str, hist: Histogram | None) -> Any:
    """A Prometheus histogram from a log2 Histogram: cumulative counts at
    le = 2^i µs for i = 0..LOG2_TOP (a fixed set, so rates over buckets
    work), then +Inf."""
    family = prom.metrics_core.HistogramMetricFamily(name, doc)
    buckets = hist.buckets if hist is not None else []
    cumulative, running = [], 0
    for i in range(LOG2_TOP + 1):
        running += buckets[i] if i < len(buckets) else 0
        cumulative.append((repr(Histogram.upper_bound_s(i)), running))
    cumulative.append(("+Inf", sum(buckets)))
    family.add_metric([], cumulative, (hist.sum_ns if hist is not None else 0) / 1e9)
    return family


class _AggregateCollector:
    """Serves the latest aggregates snapshot under the per-event metric names."""

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink

    def describe(self) -> list[Any]:
        return []       # not checked at registration: names come at collect

    def collect(self) -> Any:
        prom, snap = self.sink.prom, self.sink.snapshot
        snap = snap if snap is not None else Aggregates()
        counter = prom.metrics_core.CounterMetricFamily("tcpstates_transitions", "TCP state changes",
                                                        labels=["old", "new"])
        for (old, new), n in sorted(snap.transitions.items()):
            counter.add_metric([STATE_NAMES.get(old, str(old)), STATE_NAMES.get(new, str(new))], n)
        yield counter
        yield _log2_histogram(prom, "tcpstates_handshake_seconds", "SYN_SENT to ESTABLISHED",
                              snap.extra.get("handshake"))
        yield _log2_histogram(prom, "tcpstates_connection_lifetime_seconds",
                              "from entering ESTABLISHED to CLOSE", snap.extra.get("lifetime"))
        yield _log2_histogram(prom, "tcpstates_close_wait_seconds", "time spent in CLOSE_WAIT",
                              snap.states.get(S["CLOSE_WAIT"]))
