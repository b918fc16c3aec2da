"""tcpstates-services: service names for ports, and a slow-handshake filter.

A complete third-party tcpstates plugin: stage classes built on
`tcpstates.api`, registered through the `tcpstates_register_*` hooks, found
by tcpstates through this distribution's `tcpstates` entry point.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from tcpstates.api import Enricher, Filter, RunContext
from tcpstates.events import STATE_NUMBERS, Event
from tcpstates.hookspecs import hookimpl
from tcpstates.options import option

SYN_SENT, ESTABLISHED, CLOSE = (STATE_NUMBERS[s] for s in ("SYN_SENT", "ESTABLISHED", "CLOSE"))


@dataclasses.dataclass
class ServicesOptions:
    protocol: str = option("tcp", "protocol column of the services database")
    unknown: str = option("", "value for ports without a name (\"\" leaves the field out)")

    def validate(self) -> None:
        if self.protocol not in ("tcp", "udp", "sctp"):
            raise ValueError(f"protocol: expected tcp, udp or sctp, got {self.protocol!r}")


class ServicesEnricher(Enricher):
    """Adds lservice/rservice: the service names of the local and remote port."""

    name = "services"
    description = "add lservice/rservice names from the system services database (/etc/services)"
    Options = ServicesOptions

    def __init__(self, options: Any, context: RunContext) -> None:
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
    min_ms: float = option(100.0, "keep SYN_SENT->ESTABLISHED slower than this")
    failed: bool = option(True, "also keep failed connects (SYN_SENT->CLOSE)")

    def validate(self) -> None:
        if self.min_ms < 0:
            raise ValueError("min_ms: must not be negative")


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


@hookimpl
def tcpstates_register_enrichers(register: Any) -> None:
    register(ServicesEnricher)


@hookimpl
def tcpstates_register_filters(register: Any) -> None:
    register(SlowHandshakeFilter)
