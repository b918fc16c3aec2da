"""The `owner` enricher: which process owns the socket, not just who was on the CPU.

bcc's C-PID/C-COMM is whatever task ran when the state changed: for changes
in softirq or timer context that is `swapper/N`, `ksoftirqd/N` or anyone,
and on loopback the server's changes carry the client's PID. The owner is
learnt in the kernel, in the owner's own context (bpf/owner.bpf.h): the
connect/listen/close/shutdown transitions, accept(), and every send/recv
(so a pre-fork child, a worker that got the socket over SCM_RIGHTS, a
process that inherited it are named once they use it). Each record carries
what the kernel knew; this stage only turns it into fields and adds:

  * a connection still in a listener's accept queue belongs to the
    listener's holders: one process → that process ("listener"); several
    (pre-fork, SO_REUSEPORT) → no owner_pid, owner_candidates lists them
    ("shared") — which one will accept is not knowable yet;
  * sockets that existed before tracing and have not been used since get
    the holder the kernel's socket tables give at start ("proc", as ss -p);
  * anything else is "unknown" — never a guess.

Fields: owner_pid, owner_comm, owner_start (the owner's start time in clock
ticks since boot, as /proc/PID/stat: PID + start is the identity, so a reused
PID never carries an old process's name), owner_cgroup_id (captured in the
kernel), owner_source, and owner_candidates for "shared". Nothing is cached
per bare PID: names come with each kernel record or with the /proc read that
also gives the start time. Semantics per transition: docs/events.md.

This stage watches every event the source delivers (even those an earlier
filter drops), so its place in the chain does not matter.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from typing import Any

from tcpstates.api import Enricher, KernelConstraints, RunContext
from tcpstates.events import AF_INET, AF_INET6, STATE_NUMBERS, Event, sanitize_text
from tcpstates.options import option
from tcpstates.plugins.owner.sockowners import NS_PER_TICK, Holder, listener_holders, snapshot

S = STATE_NUMBERS
LISTEN, SYN_RECV, CLOSE = S["LISTEN"], S["SYN_RECV"], S["CLOSE"]
# The owner fields of the kernel record (struct tcpstates_event's tail, handed on
# undecoded by the kernel stage's decoder under this key).
KERNEL_OWNER = "_kernel_owner"
RAW_OWNER = struct.Struct("<QQII16s")
HOW = {1: "syscall", 2: "accept", 3: "io"}
LOOKUP_SHARE = 20
WILDCARD = {AF_INET: "0.0.0.0", AF_INET6: "::"}


@dataclasses.dataclass
class OwnerOptions:
    scan_existing: bool = option(True, "at start, find owners of existing sockets in /proc (as ss -p)")
    kernel: bool = option(True, "learn owners in the kernel (accept, send/recv, syscalls); off: "
                          "only listeners and /proc")
    max_sockets: int = option(262144, "sockets whose owner the kernel remembers (LRU)",
                              min=1024, max=1 << 24)
    listener_refresh_ms: int = option(100, "how old the list of a listener's holders may be "
                                      "(read from /proc) before it is read again", min=0, max=10000)


class OwnerEnricher(Enricher):
    """Adds owner_pid/owner_comm: the process owning the socket."""

    name = "owner"
    description = "owner_pid/owner_comm of the socket's owning process (not the on-CPU task)"
    Options = OwnerOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        # sockets seen entering an accept queue and not yet claimed by a process
        self.queued: set[int] = set()
        # port → (read at, (family, addr) → holders)
        self.listeners: dict[int, tuple[float, dict[tuple[int, str], list[Holder]]]] = {}
        self.existing: dict[tuple[int, str, int, str, int], list[Holder]] = {}
        self.comms: dict[bytes, str] = {}       # raw kernel comm bytes → escaped text
        self._lookup_s = 0.0                    # how long the last listener lookup took
        if options.scan_existing:
            self.existing = snapshot()

    def kernel_constraints(self) -> KernelConstraints | None:
        if not self.options.kernel:
            return None
        from tcpstates.plugins.owner.kernel import owner_support
        support = owner_support(self.options.max_sockets)
        for why in support.missing:
            self.context.warn(f"owner: not available: {why}")
        return KernelConstraints(cflags=tuple(support.cflags))

    def _comm(self, raw: bytes) -> str:
        comm = self.comms.get(raw)
        if comm is None:
            if len(self.comms) > 8192:
                self.comms.clear()
            comm = self.comms[raw] = sanitize_text(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
        return comm

    def _holders(self, e: Event) -> list[Holder] | None:
        """The processes holding the listener this event's socket queues on."""
        now = time.monotonic()
        cached = self.listeners.get(e.sport)
        if cached is None or now - cached[0] > max(self.options.listener_refresh_ms / 1000,
                                                   self._lookup_s * LOOKUP_SHARE):
            if len(self.listeners) > 4096:
                self.listeners.clear()
            cached = self.listeners[e.sport] = (now, listener_holders(e.sport))
            # a lookup reads every process's fd table: on a host with many
            # processes it is slow, so look up at most once per 20 lookups' time
            # (≤ 5 % of the CPU), whatever listener_refresh_ms asks
            self._lookup_s = time.monotonic() - now
        by_addr = cached[1]
        for key in ((e.family, e.saddr), (e.family, WILDCARD.get(e.family, ""))):
            if key in by_addr:
                return by_addr[key]
        if e.family == AF_INET:   # accepted by a dual-stack IPv6 listener
            return by_addr.get((AF_INET6, "::"))
        return None

    def observe_batch(self, batch: list[Event]) -> None:
        """Label each event from what the kernel knew, right away (a later
        filter may still drop it)."""
        queued, unpack, comm_of = self.queued, RAW_OWNER.unpack, self._comm
        for e in batch:
            extra = e.extra
            raw = extra.pop(KERNEL_OWNER, None)
            old, new = e.oldstate, e.newstate
            if raw is not None:
                start_ns, cgroup, pid, how, rawcomm = unpack(raw)
                extra["owner_pid"] = pid
                extra["owner_comm"] = comm_of(rawcomm)
                extra["owner_start"] = start_ns // NS_PER_TICK if start_ns else None
                extra["owner_cgroup_id"] = cgroup
                extra["owner_source"] = HOW.get(how, "syscall")
                if queued:
                    queued.discard(e.skaddr)
                if old == LISTEN or new == LISTEN:
                    self.listeners.pop(e.sport, None)    # the listener set changed
                continue
            if (old == LISTEN and new == SYN_RECV) or e.skaddr in queued:
                if new == CLOSE:
                    queued.discard(e.skaddr)
                else:
                    queued.add(e.skaddr)
                self._label_queued(e)
                continue
            holders = self.existing.get((e.family, e.saddr, e.sport, e.daddr, e.dport)) \
                if self.existing else None
            if holders:
                if new == CLOSE:
                    del self.existing[(e.family, e.saddr, e.sport, e.daddr, e.dport)]
                self._label_holders(e, holders, "proc")
            else:
                extra["owner_pid"] = extra["owner_comm"] = None
                extra["owner_source"] = "unknown"

    def _label_queued(self, e: Event) -> None:
        holders = self._holders(e)
        if not holders:
            e.extra["owner_pid"] = e.extra["owner_comm"] = None
            e.extra["owner_source"] = "unknown"
        else:
            self._label_holders(e, holders, "listener")

    @staticmethod
    def _label_holders(e: Event, holders: list[Holder], source: str) -> None:
        extra = e.extra
        if len(holders) == 1:
            pid, start, comm = holders[0]
            extra["owner_pid"], extra["owner_comm"], extra["owner_start"] = pid, sanitize_text(comm), start
            extra["owner_source"] = source
        else:
            # several processes hold it: which one will use it is not knowable
            extra["owner_pid"] = extra["owner_comm"] = None
            extra["owner_source"] = "shared"
            extra["owner_candidates"] = [h[0] for h in holders]

    def enrich_batch(self, batch: list[Event]) -> None:
        """Nothing left to do: observe_batch labelled every event."""

    def enrich(self, event: Event) -> None:
        self.observe_batch([event])
