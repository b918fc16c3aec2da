"""Built-in user-space filters: ports, family, state/transition, duration,
process, address.

Every filter also tells the kernel stage what it may drop before an event is
ever copied to user space (the -L, -D, -4 and -6 flags are such filters), as
far as the kernel can decide it: not glob patterns of command names, not the
owner process. Each filter still checks in user space, so replayed events are
filtered the same way and correctness never depends on the kernel.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import socket
from typing import Any

from tcpstates.api import AddressRule, Filter, KernelConstraints, ProcessRule, RunContext
from tcpstates.events import STATE_NUMBERS, Event
from tcpstates.options import option
from tcpstates.text import refuse_lone_backslash
from tcpstates.plugins.filters.ports import parse_ports


@dataclasses.dataclass
class PortsOptions:
    # min/max bound the numbers; "8000-8100" ranges are checked by parse_ports
    local: list[int | str] = option([], "local ports or ranges to keep, e.g. [80, \"8000-8100\"]",
                                    min=1, max=65535)
    remote: list[int | str] = option([], "remote ports or ranges to keep", min=1, max=65535)

    def validate(self) -> None:
        self.local_set = parse_ports(self.local, "local") if self.local else None
        self.remote_set = parse_ports(self.remote, "remote") if self.remote else None


class PortsFilter(Filter):
    """Keep events whose local and remote ports are in the given sets."""

    name = "ports"
    description = "keep only the given local/remote ports or ranges (pushed into the kernel)"
    Options = PortsOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.local = options.local_set
        self.remote = options.remote_set

    def keep(self, event: Event) -> bool:
        return ((self.local is None or event.sport in self.local) and
                (self.remote is None or event.dport in self.remote))

    def filter_batch(self, batch: list[Event]) -> list[Event]:
        local, remote = self.local, self.remote
        if local is not None:
            batch = [e for e in batch if e.sport in local]
        if remote is not None:
            batch = [e for e in batch if e.dport in remote]
        return batch

    def kernel_constraints(self) -> KernelConstraints:
        return KernelConstraints(local_ports=self.local, remote_ports=self.remote, complete=True)


FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


@dataclasses.dataclass
class FamilyOptions:
    family: str = option("ipv4", "ipv4 or ipv6 (the socket's family: IPv4-mapped IPv6 is ipv6)",
                         choices=("ipv4", "ipv6"))


class FamilyFilter(Filter):
    """Keep one address family."""

    name = "family"
    description = "keep only IPv4 or IPv6 sockets (pushed into the kernel)"
    Options = FamilyOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.family = FAMILIES[options.family]

    def keep(self, event: Event) -> bool:
        return event.family == self.family

    def kernel_constraints(self) -> KernelConstraints:
        return KernelConstraints(family=self.family, complete=True)


def _states(names: list[str], where: str) -> frozenset[int]:
    out = set()
    for n in names:
        key = n.strip().upper()
        if key not in STATE_NUMBERS:
            raise ValueError(f"{where}: unknown TCP state {n!r} (known: {', '.join(STATE_NUMBERS)})")
        out.add(STATE_NUMBERS[key])
    return frozenset(out)


@dataclasses.dataclass
class StateOptions:
    old: list[str] = option([], "keep events leaving one of these states")
    new: list[str] = option([], "keep events entering one of these states")
    transitions: list[str] = option([], "keep these transitions, e.g. \"SYN_SENT->CLOSE\" (failed connects)")
    exclude: bool = option(False, "invert: drop the matching events instead")

    def validate(self) -> None:
        self.old_set = _states(self.old, "old")
        self.new_set = _states(self.new, "new")
        pairs = set()
        for t in self.transitions:
            parts = t.replace("→", "->").split("->")
            if len(parts) != 2:
                raise ValueError(f"transitions: {t!r} is not OLD->NEW")
            (o,), (n,) = _states([parts[0]], "transitions"), _states([parts[1]], "transitions")
            pairs.add((o, n))
        self.pairs = frozenset(pairs)


class StateFilter(Filter):
    """Keep events by old state, new state or exact transition."""

    name = "state"
    description = "keep events by old/new state or transition (e.g. SYN_SENT->CLOSE)"
    Options = StateOptions

    def keep(self, event: Event) -> bool:
        o = self.options
        match = ((not o.old_set or event.oldstate in o.old_set) and
                 (not o.new_set or event.newstate in o.new_set) and
                 (not o.pairs or (event.oldstate, event.newstate) in o.pairs))
        return match != o.exclude

    def kernel_constraints(self) -> KernelConstraints:
        # every (old, new) pair this filter keeps: the kernel tests one bit
        keep = frozenset((a, b) for a in range(1, 13) for b in range(1, 13)
                         if self.keep(_Probe(a, b)))
        return KernelConstraints(transitions=keep, complete=True)


class _Probe:
    """Just the two fields StateFilter.keep looks at."""

    __slots__ = ("oldstate", "newstate")

    def __init__(self, oldstate: int, newstate: int) -> None:
        self.oldstate, self.newstate = oldstate, newstate


@dataclasses.dataclass
class DurationOptions:
    min_ms: float = option(0.0, "keep events that spent at least this long in the old state",
                           min=0, max=1e12)
    max_ms: float | None = option(None, "and at most this long (unset: no limit)", min=0, max=1e12)
    states: list[str] = option([], "only judge events leaving these states; others pass")
    unknown: str = option("drop", "events whose time in the old state is unknown: keep or drop",
                          choices=("keep", "drop"))

    def validate(self) -> None:
        if self.max_ms is not None and self.max_ms < self.min_ms:
            raise ValueError("max_ms: must be at least min_ms")
        self.state_set = _states(self.states, "states")


SPAN_NS_MAX = (1 << 64) - 2     # no upper bound (a span the kernel can measure)


class DurationFilter(Filter):
    """Keep events by the time spent in the old state (e.g. slow handshakes)."""

    name = "duration"
    description = "keep events by time spent in the old state (e.g. handshakes over 100 ms)"
    Options = DurationOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        # to the nearest ns: int() would truncate 2.01 ms (2009999.9999999998 ns)
        # to 2009999 and drop an event of exactly 2.010 ms as "longer"
        self.lo = round(options.min_ms * 1_000_000)
        self.hi = None if options.max_ms is None else round(options.max_ms * 1_000_000)
        self.keep_unknown = options.unknown == "keep"

    def keep(self, event: Event) -> bool:
        if self.options.state_set and event.oldstate not in self.options.state_set:
            return True
        span = event.span_ns
        if span is None:
            return self.keep_unknown
        return span >= self.lo and (self.hi is None or span <= self.hi)

    def kernel_constraints(self) -> KernelConstraints | None:
        # The kernel lets unknown spans through; this filter still judges them
        # (unknown = "drop"). A lower bound for every state is a constant in
        # the program; an upper bound or a state list, a range per old state.
        if not self.options.state_set and self.hi is None:
            return KernelConstraints(min_span_ns=self.lo) if self.lo > 0 else None
        hi = SPAN_NS_MAX if self.hi is None else self.hi
        judged = self.options.state_set or range(1, 13)
        return KernelConstraints(span_ranges={state: (self.lo, hi) for state in judged})


@dataclasses.dataclass
class ProcessOptions:
    pid: list[int] = option([], "keep events of these PIDs (0: the idle task, softirq context)", min=0, max=(1 << 22))
    comm: list[str] = option([], "keep events of these command names (shell globs allowed)")
    field: str = option("cpu", "which process to judge: cpu (C-PID/C-COMM) or owner (owner enricher)",
                        choices=("cpu", "owner"))
    exclude: bool = option(False, "invert: drop the matching events instead")

    def validate(self) -> None:
        if not self.pid and not self.comm:
            raise ValueError("give pid or comm (or both)")
        refuse_lone_backslash("comm", self.comm)


class ProcessFilter(Filter):
    """Keep events by PID and/or command name."""

    name = "process"
    description = "keep events by PID and/or command name (on-CPU or owner)"
    Options = ProcessOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.pids = frozenset(options.pid)
        self.exact = frozenset(c for c in options.comm if not any(ch in c for ch in "*?["))
        self.globs = [c for c in options.comm if c not in self.exact]
        self.owner = options.field == "owner"

    def _comm_ok(self, comm: str | None) -> bool:
        if comm is None:
            return False
        return comm in self.exact or any(fnmatch.fnmatchcase(comm, g) for g in self.globs)

    def keep(self, event: Event) -> bool:
        if self.owner:
            pid, comm = event.extra.get("owner_pid"), event.extra.get("owner_comm")
        else:
            pid, comm = event.pid, event.comm
        match = ((not self.pids or pid in self.pids) and
                 (not self.options.comm or self._comm_ok(comm)))
        return match != self.options.exclude

    def kernel_constraints(self) -> KernelConstraints | None:
        # the owner is known only in user space (the owner enricher); of the
        # glob patterns, the kernel can match a plain prefix (`nginx*`)
        if self.owner:
            return None
        o = self.options
        pids = self.pids or None
        pushable = frozenset(c for c in self.exact if kernel_comm(c))
        prefixes = frozenset(g[:-1] for g in self.globs if kernel_comm_prefix(g))
        # the kernel's comm test is this filter's whole comm test
        whole_comm = not o.comm or (pushable == self.exact and len(prefixes) == len(self.globs))
        if not o.exclude:
            # a keep rule may only be wider than the filter: a comm condition
            # goes in only when the kernel can decide every name
            comms = pushable if o.comm and whole_comm else None
            prefixes = prefixes if comms is not None else frozenset()
        else:
            # a drop rule may only be narrower: the names and prefixes it can decide
            if o.comm and not pushable and not prefixes:
                return None
            comms = pushable if pushable or prefixes else None
        if pids is None and comms is None:
            return None
        return KernelConstraints(process_rules=(ProcessRule(pids, comms, o.exclude, prefixes),), complete=whole_comm)


def kernel_comm(name: str) -> bool:
    """Can the kernel compare `name` with the raw 16-byte comm? Only when the
    decoder shows those bytes unchanged: printable, no backslash (an escape
    looks like one), valid UTF-8 of 1..15 bytes."""
    return (name.isprintable() and "\\" not in name and "\ufffd" not in name
            and 1 <= len(name.encode()) <= 15)


def kernel_comm_prefix(pattern: str) -> bool:
    """Is the glob `pattern` a plain prefix (`nginx*`: one trailing `*`, no
    other glob character) that the kernel can compare with the raw comm's
    first bytes (kernel_comm of the prefix)? A decoded name starts with such
    a prefix exactly when the raw bytes do: the decoder leaves printable
    UTF-8 as it is, and anything it escapes starts with a backslash."""
    prefix = pattern[:-1]
    return pattern.endswith("*") and not any(ch in prefix for ch in "*?[") and kernel_comm(prefix)


@dataclasses.dataclass
class AddressOptions:
    local: list[str] = option([], "keep local addresses in these networks (CIDR, IPv4 or IPv6)")
    remote: list[str] = option([], "keep remote addresses in these networks (CIDR, IPv4 or IPv6)")
    exclude: bool = option(False, "invert: drop the matching events instead")

    def validate(self) -> None:
        def nets(items: list[str], where: str) -> list[Any]:
            out = []
            for item in items:
                try:
                    out.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise ValueError(f"{where}: {item!r} is not an address or CIDR network") from None
            return out
        self.local_nets = nets(self.local, "local")
        self.remote_nets = nets(self.remote, "remote")
        if not self.local_nets and not self.remote_nets:
            raise ValueError("give local or remote networks (or both)")


class AddressFilter(Filter):
    """Keep events by local/remote address (CIDR). IPv4-mapped IPv6 matches IPv4 networks."""

    name = "address"
    description = "keep events by local/remote address in CIDR networks (IPv4 and IPv6)"
    Options = AddressOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self._cache: dict[tuple[str, bool], bool] = {}

    def _in(self, addr: str, local: bool) -> bool:
        key = (addr, local)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 65536:
                self._cache.clear()
            ip: Any = ipaddress.ip_address(addr)
            mapped = getattr(ip, "ipv4_mapped", None)
            nets = self.options.local_nets if local else self.options.remote_nets
            hit = any(ip in n or (mapped is not None and mapped in n) for n in nets)
            self._cache[key] = hit
        return hit

    def keep(self, event: Event) -> bool:
        o = self.options
        match = ((not o.local_nets or self._in(event.saddr, True)) and
                 (not o.remote_nets or self._in(event.daddr, False)))
        return match != o.exclude

    def kernel_constraints(self) -> KernelConstraints:
        # exactly this filter's test, in LPM tries (plugins/kernel/pushdown.py)
        o = self.options
        return KernelConstraints(address_rules=(AddressRule(
            tuple(o.local_nets) or None, tuple(o.remote_nets) or None, o.exclude),), complete=True)
