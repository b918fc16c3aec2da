"""The owner plugin's `tcpstates doctor` check: which owner probes this kernel allows."""

from __future__ import annotations

from tcpstates.doctor import Check
from tcpstates.plugins.owner.kernel import owner_support


def _owner() -> tuple[bool, str]:
    s = owner_support(65536)
    have = [name for name, ok in (("send/recv", s.io), ("accept", s.accept), ("start-time identity", s.identity))
            if ok]
    if not s.missing:
        return True, "owner learnt in the kernel: " + ", ".join(have)
    return False, ("fallback — " + "; ".join(s.missing) + (f" (available: {', '.join(have)})" if have else ""))


def checks() -> list[Check]:
    # not required: without these the owner is learnt from transitions only
    return [Check("owner probes", False, _owner)]
