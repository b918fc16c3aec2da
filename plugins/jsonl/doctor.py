"""`tcpstates doctor`: is the C hot path (JSON Lines encoder, bcc table rows) built?

Without it tcpstates works the same, byte for byte, only with more CPU per event
(the pure-Python path); the check is informational, never required.
"""

from __future__ import annotations

from tcpstates.doctor import Check
from tcpstates.plugins.jsonl import sink


def _hot_path() -> tuple[bool, str]:
    if sink.C_ENCODER_AVAILABLE:
        return True, "C encoder for JSON Lines and bcc table rows is in use"
    return False, ("pure Python (same output, ~2-3x the CPU per event): the C extension is not built "
                   "or TCPSTATES_NO_SPEEDUPS is set; install gcc and python3-dev, then run "
                   "scripts/setup.sh again")


def checks() -> list[Check]:
    return [Check("hot path", False, _hot_path)]
