"""The owner plugin's `tcpstates doctor` checks: which owner probes this kernel allows,
and whether the enricher's C loop is built."""

from __future__ import annotations

from tcpstates.doctor import Check
from tcpstates.speedups import doctor_check as speedup_check
from tcpstates.plugins.owner.enricher import C_OBSERVE_AVAILABLE
from tcpstates.plugins.owner.kernel import owner_support


def _owner() -> tuple[bool, str]:
    s = owner_support(65536)
    io = "send/recv (raw tracepoints)" if s.io_raw else "send/recv"
    have = [name for name, ok in ((io, s.io), ("accept", s.accept), ("start-time identity", s.identity),
                                              ("process exits", s.exits),
                                              ("closes of a handed-on socket", s.closes),
                                              ("network namespaces", s.netns))
            if ok]
    if s.exits:
        # which way an owner's exit is known (docs/events.md)
        have[have.index("process exits")] += (" (proved per PID)" if "-DTCPSTATES_OWNER_SLOT_PER_PID=1" in s.cflags
                     else " (pid_max > 65,536: an unsure exit is checked in /proc)")
    if not s.missing:
        return True, "owner learnt in the kernel: " + ", ".join(have)
    return False, ("fallback — " + "; ".join(s.missing) + (f" (available: {', '.join(have)})" if have else ""))


def checks() -> list[Check]:
    # not required: without these the owner is learnt from transitions only
    return [Check("owner probes", False, _owner), speedup_check("owner loop", C_OBSERVE_AVAILABLE, "C loop of the owner enricher is in use",
                                                                   "same fields")]
