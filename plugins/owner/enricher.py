"""The `owner` enricher: which process owns the socket, not just who was on the CPU.

bcc's C-PID/C-COMM is whatever task ran when the state changed: for changes
in softirq or timer context that is `swapper/N`, `ksoftirqd/N` or anyone,
and on loopback the server's changes carry the client's PID. The owner is
learnt where it is certain and then remembered per socket:

  * transitions that only happen inside the owner's own system call —
    connect (CLOSE→SYN_SENT), listen (CLOSE→LISTEN), close or shutdown
    (ESTABLISHED→FIN_WAIT1, CLOSE_WAIT→LAST_ACK, LISTEN→CLOSE) — name the
    on-CPU process as the owner;
  * a listener's children (LISTEN→SYN_RECV) get the listener's owner;
  * sockets that existed before tracing get the owner the kernel's socket
    tables give at start (/proc/net/tcp + /proc/PID/fd, as `ss -p`).
Anything else is "unknown" — never a guess. Fields added: owner_pid,
owner_comm, owner_cgroup_id (captured in the kernel in the owner's context)
and owner_source (syscall, listener, remembered, proc, unknown).

This stage watches every event the source delivers (even those an earlier
filter drops), so its place in the chain does not matter.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from tcpstates.api import Enricher, KernelConstraints, RunContext
from tcpstates.events import AF_INET6, STATE_NUMBERS, Event
from tcpstates.options import option
from tcpstates.plugins.owner.sockowners import process_comm, snapshot

S = STATE_NUMBERS
SYSCALL_TRANSITIONS = frozenset({
    (S["CLOSE"], S["SYN_SENT"]), (S["CLOSE"], S["LISTEN"]), (S["ESTABLISHED"], S["FIN_WAIT1"]),
    (S["CLOSE_WAIT"], S["LAST_ACK"]), (S["LISTEN"], S["CLOSE"]),
})
LISTEN, SYN_RECV, CLOSE = S["LISTEN"], S["SYN_RECV"], S["CLOSE"]
WILDCARD = {2: "0.0.0.0", 10: "::"}


@dataclasses.dataclass
class OwnerOptions:
    scan_existing: bool = option(True, "at start, find owners of existing sockets in /proc (as ss -p)")
    max_sockets: int = option(262144, "sockets remembered at most (oldest forgotten first)",
                              min=1024, max=1 << 24)


Owner = tuple[int, str, int, str]     # pid, comm, cgroup id, source


class OwnerEnricher(Enricher):
    """Adds owner_pid/owner_comm: the process owning the socket."""

    name = "owner"
    description = "owner_pid/owner_comm of the socket's owning process (not the on-CPU task)"
    Options = OwnerOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.sockets: dict[int, Owner] = {}
        self.listeners: dict[tuple[int, str, int], Owner] = {}
        self.existing: dict[tuple[int, str, int, str, int], int] = {}
        self.comms: dict[int, str] = {}
        if options.scan_existing:
            by_tuple, listeners = snapshot()
            self.existing = by_tuple
            for key, pid in listeners.items():
                self.listeners[key] = (pid, self._comm(pid, ""), 0, "proc")

    def _comm(self, pid: int, fallback: str) -> str:
        comm = self.comms.get(pid)
        if comm is None:
            if len(self.comms) > 65536:
                self.comms.clear()
            comm = self.comms[pid] = process_comm(pid) or fallback
        return comm

    def _remember(self, sk: int, owner: Owner) -> None:
        sockets = self.sockets
        sockets[sk] = owner
        if len(sockets) > self.options.max_sockets:
            # forget the oldest tenth at once (insertion order), not one per event
            for key in list(itertools.islice(sockets, len(sockets) // 10)):
                del sockets[key]

    def _listener(self, e: Event) -> Owner | None:
        for addr in (e.saddr, WILDCARD.get(e.family, "")):
            o = self.listeners.get((e.family, addr, e.sport))
            if o is not None:
                return o
        if e.family == AF_INET6 or e.saddr.startswith("::ffff:"):
            return None
        # an IPv4 connection accepted by a dual-stack IPv6 listener
        return self.listeners.get((AF_INET6, "::", e.sport))

    def observe_batch(self, batch: list[Event]) -> None:
        """Learn owners from every event the source delivered, and label each
        event right away (a later filter may still drop it)."""
        sockets, remember = self.sockets, self._remember
        syscall = SYSCALL_TRANSITIONS
        for e in batch:
            e.extra.pop("_kernel_owner", None)     # (used from the next commit on)
            key = (e.oldstate, e.newstate)
            owner: Owner | None
            if key in syscall and e.pid != 0:
                prior = sockets.get(e.skaddr)
                # a close by the process that already owns it keeps the process's comm
                comm = prior[1] if prior is not None and prior[0] == e.pid else self._comm(e.pid, e.comm)
                owner = (e.pid, comm, e.cgroup_id, "syscall")
                if key == (CLOSE, LISTEN):
                    self.listeners[(e.family, e.saddr, e.sport)] = owner
                elif key == (LISTEN, CLOSE):
                    self.listeners.pop((e.family, e.saddr, e.sport), None)
            elif key == (LISTEN, SYN_RECV):
                lo = self._listener(e)
                owner = (lo[0], lo[1], lo[2], "listener") if lo else None
            else:
                owner = sockets.get(e.skaddr)
                if owner is not None:
                    if owner[3] != "remembered":
                        owner = (owner[0], owner[1], owner[2], "remembered")
                elif self.existing:
                    pid = self.existing.pop((e.family, e.saddr, e.sport, e.daddr, e.dport), None)
                    if pid is not None:
                        owner = (pid, self._comm(pid, "?"), 0, "proc")
            extra = e.extra
            if owner is None:
                extra["owner_pid"] = extra["owner_comm"] = None
                extra["owner_source"] = "unknown"
                if e.newstate == CLOSE:
                    sockets.pop(e.skaddr, None)
                continue
            extra["owner_pid"], extra["owner_comm"], extra["owner_cgroup_id"], extra["owner_source"] = owner
            if e.newstate == CLOSE:
                sockets.pop(e.skaddr, None)
            elif owner[3] != "remembered" or e.skaddr not in sockets:
                remember(e.skaddr, owner)

    def kernel_constraints(self) -> KernelConstraints | None:
        from tcpstates.plugins.owner.kernel import owner_support
        support = owner_support(self.options.max_sockets)
        for why in support.missing:
            self.context.warn(f"owner: {why}")
        return KernelConstraints(cflags=tuple(support.cflags))

    def enrich_batch(self, batch: list[Event]) -> None:
        """Nothing left to do: observe_batch labelled every event."""

    def enrich(self, event: Event) -> None:
        self.observe_batch([event])
