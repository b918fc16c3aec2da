"""tcpstates-services: service names for ports, a slow-handshake filter, and a
sink that counts connections per service, with its own command-line flag.

A complete third-party tcpstates plugin: stage classes built on the public API
(`from tcpstates import ...`, nothing else), registered through the
`tcpstates_register_*` hooks, its flag added with `tcpstates_add_options` and
folded into the run with `tcpstates_configure`; found by tcpstates through this
distribution's `tcpstates` entry point.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import socket
from typing import Any

from tcpstates import Enricher, Event, Filter, Sink, TcpState, hookimpl, option

SYN_SENT, ESTABLISHED, CLOSE = TcpState.SYN_SENT, TcpState.ESTABLISHED, TcpState.CLOSE


@dataclasses.dataclass
class ServicesOptions:
    protocol: str = option("tcp", "protocol column of the services database",
                           choices=("tcp", "udp", "sctp"))
    unknown: str = option("", "value for ports without a name (\"\" leaves the field out)")


class ServicesEnricher(Enricher):
    """Adds lservice/rservice: the service names of the local and remote port."""

    name = "services"
    description = "add lservice/rservice names from the system services database (/etc/services)"
    Options = ServicesOptions

    def __init__(self, options: Any, context: Any) -> None:
        super().__init__(options, context)
        self._names: dict[int, str | None] = {0: None}

    def lookup(self, port: int) -> str | None:
        try:
            return self._names[port]
        except KeyError:
            try:
                name: str | None = socket.getservbyport(port, self.options.protocol)
            except OSError:
                name = self.options.unknown or None
            self._names[port] = name   # at most 65536 entries: bounded
            return name

    def enrich(self, event: Event) -> None:
        local, remote = self.lookup(event.sport), self.lookup(event.dport)
        if local is not None:
            event.extra["lservice"] = local
        if remote is not None:
            event.extra["rservice"] = remote


@dataclasses.dataclass
class SlowHandshakeOptions:
    min_ms: float = option(100.0, "keep SYN_SENT->ESTABLISHED slower than this", min=0, max=1e9)
    failed: bool = option(True, "also keep failed connects (SYN_SENT->CLOSE)")


class SlowHandshakeFilter(Filter):
    """Keeps slow and failed outgoing handshakes only."""

    name = "slow_handshake"
    description = "keep connects slower than min_ms, and failed connects"
    Options = SlowHandshakeOptions

    def keep(self, event: Event) -> bool:
        if event.oldstate != SYN_SENT:
            return False
        if event.newstate == CLOSE:
            return self.options.failed
        return (event.newstate == ESTABLISHED and event.span_ns is not None
                and event.span_ns >= self.options.min_ms * 1_000_000)


@dataclasses.dataclass
class ServiceCountsOptions:
    path: str = option("-", "file to write the counts to at exit ('-' for stderr)")
    top: int = option(10, "how many services to list", min=1, max=10000)


class ServiceCountsSink(Sink):
    """Counts established connections per remote service; writes the table at exit."""

    name = "service_counts"
    description = "count connections per remote service name, written at exit (--service-counts)"
    Options = ServiceCountsOptions

    def __init__(self, options: Any, context: Any) -> None:
        super().__init__(options, context)
        self.counts: collections.Counter[str] = collections.Counter()
        self.names = ServicesEnricher(ServicesOptions(unknown="other"), context)

    def write(self, batch: list[Event]) -> None:
        for e in batch:
            if e.oldstate == SYN_SENT and e.newstate == ESTABLISHED:
                self.counts[self.names.lookup(e.dport) or "other"] += 1

    def close(self) -> None:
        lines = [f"{count} {name}\n" for name, count in self.counts.most_common(self.options.top)]
        if self.options.path == "-":
            # never a plain sys.stderr write: one nobody reads would block the
            # exit for good (this waits at most a second, then counts it unshown)
            self.context.warner.write_block("".join(lines))
        else:
            with open(self.options.path, "w") as f:
                f.writelines(lines)


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service-counts", metavar="FILE", help="at exit, write connections per "
                        "remote service to FILE ('-' for stderr) (tcpstates-services)")


@hookimpl
def tcpstates_configure(config: Any, args: argparse.Namespace) -> None:
    if args.service_counts is not None:
        config.add_sink("service_counts")
        config.set_sink_options("service_counts", path=args.service_counts)


@hookimpl
def tcpstates_register_sinks(register: Any) -> None:
    register(ServiceCountsSink)


@hookimpl
def tcpstates_register_enrichers(register: Any) -> None:
    register(ServicesEnricher)


@hookimpl
def tcpstates_register_filters(register: Any) -> None:
    register(SlowHandshakeFilter)
