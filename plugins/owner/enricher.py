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

from tcpstates import speedups
from tcpstates.api import Enricher, KernelConstraints, RunContext
from tcpstates.events import AF_INET, AF_INET6, STATE_NUMBERS, Event, sanitize_text
from tcpstates.options import option
from tcpstates.plugins.owner.sockowners import (NS_PER_TICK, Holder, PortHolders, SnapHolder, process_identity,
                                                snapshot, still_alive)

_c_observe = speedups.load("tcpstates.plugins.owner._observe")   # optional (setup.py); the Python path is the reference
C_OBSERVE_AVAILABLE = _c_observe is not None

S = STATE_NUMBERS
LISTEN, SYN_RECV, CLOSE = S["LISTEN"], S["SYN_RECV"], S["CLOSE"]
# The owner fields of the kernel record (struct tcpstates_event's tail, handed on
# undecoded by the kernel stage's decoder under this key).
KERNEL_OWNER = "_kernel_owner"
RAW_OWNER = struct.Struct("<QQII16s")
HOW = {1: "syscall", 2: "accept", 3: "io"}
ACCEPT = 2
UNSURE = 0x100      # TCPSTATES_OWNER_UNSURE: the owner may have exited before the record
# TCPSTATES_OWNER_FOREIGN: no owner, and the socket is in another network namespace
# than tcpstates': this namespace's listeners and /proc snapshot say nothing about it
FOREIGN = 0x200
# TCPSTATES_OWNER_LEFT: its owner let it go (exited, or closed its descriptor while
# another process holds it): unknown, and no longer in an accept queue
LEFT = 0x400
LOOKUP_SHARE = 20
# how often a listener's holders are found by reading every process's fd table
# (in between, only new processes' and the holders' own tables are read)
FULL_READ_S = 1.0
WILDCARD = {AF_INET: "0.0.0.0", AF_INET6: "::"}
MAX_OWNED = 8192
UNKNOWN: dict[str, Any] = {"owner_pid": None, "owner_comm": None, "owner_source": "unknown"}


def _holder_fields(holders: list[Holder], source: str) -> dict[str, Any]:
    """The owner fields a socket held by `holders` gets (merged into each event's
    extra, so never edited after it is made)."""
    if not holders:
        return UNKNOWN
    if len(holders) == 1:
        pid, start, comm = holders[0]
        return {"owner_pid": pid, "owner_comm": sanitize_text(comm), "owner_start": start,
                "owner_source": source}
    # several processes hold it: which one will use it is not knowable
    return {"owner_pid": None, "owner_comm": None, "owner_source": "shared",
            "owner_candidates": [h[0] for h in holders]}


@dataclasses.dataclass
class OwnerOptions:
    scan_existing: bool = option(True, "at start, find owners of existing sockets in /proc (as ss -p)")
    kernel: bool = option(True, "learn owners in the kernel (accept, send/recv, syscalls); off: "
                          "only listeners and /proc")
    kernel_io: bool = option(True, "with kernel: also learn at every send/recv (Linux >= 6.4), so "
                             "hand-offs and pre-fork children are seen; off: as on older kernels, "
                             "only at accept/connect/listen/close, nothing added to each send/recv")
    kernel_close: bool = option(True, "with kernel: also watch close() (a syscall tracepoint, "
                                "~0.45-0.65 us per close() on the host), so an accepter that hands a socket "
                                "on (fork, SCM_RIGHTS) and closes its copy is not named for it")
    kernel_io_probe: str = option("auto", "how the send/recv probes attach: auto (raw tracepoints "
                                  "where kernel BTF allows: the least kernel time per send/recv), "
                                  "tracepoint (perf-event tracepoints, as without BTF)",
                                  choices=("auto", "tracepoint"))
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
        # port → (read again after, (family, addr) → the fields its holders give)
        self.listeners: dict[int, tuple[float, dict[tuple[int, str], dict[str, Any]]]] = {}
        self.existing: dict[tuple[int, str, int, str, int], list[SnapHolder]] = {}
        # raw kernel owner tail → (its fields, ready to merge; the PID when it
        # was learnt at accept, else 0): one process's records repeat the same
        # bytes, so the unpack/decode/escape is done once
        self.owned: dict[bytes, tuple[dict[str, Any], int]] = {}
        self.watches: dict[int, PortHolders] = {}   # port → its listeners' holders
        self.use_c = True
        self._now: float | None = None
        if options.scan_existing:
            self.existing = snapshot()

    def kernel_constraints(self) -> KernelConstraints | None:
        if not self.options.kernel:
            return None
        from tcpstates.plugins.owner.kernel import CLOSE_OFF, IO_OFF, owner_support
        support = owner_support(self.options.max_sockets, io=self.options.kernel_io,
                                io_probe=self.options.kernel_io_probe, close=self.options.kernel_close)
        for why in support.missing:
            if why not in (IO_OFF, CLOSE_OFF):        # asked for: nothing to warn about
                self.context.warn(f"owner: not available: {why}")
        return KernelConstraints(cflags=tuple(support.cflags))

    def _owned(self, raw: bytes) -> tuple[dict[str, Any], int]:
        """The fields a kernel owner record gives (cached per raw bytes: the
        same bytes always mean the same fields, so the cache cannot go stale)."""
        start_ns, cgroup, pid, how, rawcomm = RAW_OWNER.unpack(raw)
        if how & (FOREIGN | LEFT):
            out = self.owned[raw] = (UNKNOWN, 0)
            return out
        if how & UNSURE:
            return self._unsure(raw)
        fields = {"owner_pid": pid,
                  "owner_comm": sanitize_text(rawcomm.split(b"\0", 1)[0].decode("utf-8", "replace")),
                  "owner_start": start_ns // NS_PER_TICK if start_ns else None,
                  "owner_cgroup_id": cgroup, "owner_source": HOW.get(how, "syscall")}
        if len(self.owned) >= MAX_OWNED:
            self.owned.clear()
        out = self.owned[raw] = (fields, pid if how == ACCEPT else 0)
        return out

    def _unsure(self, raw: bytes) -> tuple[dict[str, Any], int]:
        """A kernel owner that may have exited before its record (the kernel
        saw an exit at its PID slot, not whose): the owner if it is alive now
        (then it was at the record), else unknown. Never cached: whether it
        lives changes."""
        start_ns, _, pid, how, _ = RAW_OWNER.unpack(raw)
        alive = process_identity(pid)
        if not start_ns or alive is None or alive[0] != start_ns // NS_PER_TICK:
            return UNKNOWN, 0
        fields, accepter = self._owned(raw[:20] + struct.pack("<I", how & ~UNSURE) + raw[24:])
        return fields, accepter

    def _holders(self, e: Event, now: float) -> dict[str, Any] | None:
        """The fields the processes holding the listener this event's socket
        queues on give it (None: no listener known)."""
        cached = self.listeners.get(e.sport)
        if cached is None or now > cached[0]:
            if len(self.listeners) > 4096:
                self.listeners.clear()
                self.watches.clear()
            watch = self.watches.get(e.sport)
            if watch is None:
                refresh = self.options.listener_refresh_ms / 1000
                watch = self.watches[e.sport] = PortHolders(e.sport, max(FULL_READ_S, 10 * refresh))
            by_addr = {key: _holder_fields(holders, "listener")
                       for key, holders in watch.lookup(now).items()}
            took = time.monotonic() - now
            # a lookup reads every process's fd table: on a host with many
            # processes it is slow, so look up at most once per 20 lookups' time
            # (≤ 5 % of the CPU), whatever listener_refresh_ms asks
            cached = self.listeners[e.sport] = (
                now + took + max(self.options.listener_refresh_ms / 1000, took * LOOKUP_SHARE), by_addr)
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
        self._now = None     # one clock read per batch, and only when a listener is asked
        if _c_observe is not None and self.use_c:
            # the same loop in C (_observe.c); it calls back for the rare cases
            _c_observe.observe(batch, KERNEL_OWNER, LISTEN, self.owned, self._owned, self.queued,
                               self.watches, self._owned_event, self._unowned_event, self.observe_one,
                               (SYN_RECV, CLOSE, AF_INET, AF_INET6), self.listeners, WILDCARD, "::",
                               self._batch_now)
            return
        queued, owned, make = self.queued, self.owned, self._owned
        for e in batch:
            extra = e.extra
            raw = extra.pop(KERNEL_OWNER, None)
            if raw is None:
                self._unowned_event(e)
                continue
            fields, accepter = owned.get(raw) or make(raw)
            extra.update(fields)
            if queued:
                queued.discard(e.skaddr)
            if e.oldstate == LISTEN or e.newstate == LISTEN or (accepter and e.sport in self.watches):
                self._owned_event(e, accepter)

    def observe_one(self, e: Event) -> None:
        """observe_batch for one event (the C loop's path for an event whose
        type is not the slotted Event)."""
        raw = e.extra.pop(KERNEL_OWNER, None)
        if raw is None:
            self._unowned_event(e)
            return
        fields, accepter = self.owned.get(raw) or self._owned(raw)
        e.extra.update(fields)
        if self.queued:
            self.queued.discard(e.skaddr)
        if e.oldstate == LISTEN or e.newstate == LISTEN or (accepter and e.sport in self.watches):
            self._owned_event(e, accepter)

    def _owned_event(self, e: Event, accepter: int) -> None:
        """The listener bookkeeping of an event the kernel named an owner for
        (or, LISTEN->SYN_RECV, said is in another network namespace)."""
        if e.oldstate == LISTEN or e.newstate == LISTEN:
            if e.newstate != SYN_RECV:
                self.listeners.pop(e.sport, None)    # the listener set changed
            return
        watch = self.watches[e.sport]
        if accepter not in watch.held:
            # accepted by a process not known to hold the listener (handed
            # it, e.g. over SCM_RIGHTS): the next look-up, at its usual time
            # (the CPU bound holds), reads everyone
            watch.invalidate()

    def _batch_now(self) -> float:
        """The clock of this batch's listener look-ups, read at first need."""
        if self._now is None:
            self._now = time.monotonic()
        return self._now

    def _unowned_event(self, e: Event) -> None:
        """An event the kernel knew no owner for: queued on a listener, a
        socket that existed before tracing, or unknown."""
        extra, old, new = e.extra, e.oldstate, e.newstate
        queued = self.queued
        if (old == LISTEN and new == SYN_RECV) or e.skaddr in queued:
            if new == CLOSE:
                queued.discard(e.skaddr)
            else:
                queued.add(e.skaddr)
            fields = self._holders(e, self._batch_now()) or UNKNOWN
            extra.update(fields)
            if "owner_candidates" in fields:      # each event its own list
                extra["owner_candidates"] = list(fields["owner_candidates"])
            return
        key = (e.family, e.saddr, e.sport, e.daddr, e.dport)
        snap = self.existing.get(key) if self.existing else None
        if snap:
            if new == CLOSE:
                del self.existing[key]
            # only those still alive: a holder at start may have exited since,
            # leaving the socket to a child it forked (sockowners.still_alive)
            extra.update(_holder_fields(still_alive(snap), "proc"))
        else:
            extra.update(UNKNOWN)

    def enrich_batch(self, batch: list[Event]) -> None:
        """Nothing left to do: observe_batch labelled every event."""

    def enrich(self, event: Event) -> None:
        self.observe_batch([event])
