"""Optional compiled speed-ups of the per-event loops: loading one, and the
`tcpstates doctor` line that says whether it is in use.

A speed-up is a C extension built by the set-up (setup.py, `optional=True`)
beside a pure-Python reference that gives the same result; without a
compiler, or with TCPSTATES_NO_SPEEDUPS set (tests, comparisons), the Python
path runs.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from tcpstates.doctor import Check


def load(module: str) -> ModuleType | None:
    """The compiled module `module`, or None when it is not built or
    TCPSTATES_NO_SPEEDUPS asks for the pure-Python path."""
    if os.environ.get("TCPSTATES_NO_SPEEDUPS"):
        return None
    try:
        return importlib.import_module(module)
    except ImportError:    # pragma: no cover - depends on the build
        return None


def doctor_check(name: str, available: bool, in_use: str, same: str = "same output") -> Check:
    """An informational doctor check for one speed-up (never required: the
    pure-Python path gives the same result with more CPU)."""
    def run() -> tuple[bool, str]:
        if available:
            return True, in_use
        return False, (f"pure Python ({same}, more CPU per event): the C extension is not built or "
                       "TCPSTATES_NO_SPEEDUPS is set; install gcc and python3-dev, then run "
                       "scripts/setup.sh again")
    return Check(name, False, run)
