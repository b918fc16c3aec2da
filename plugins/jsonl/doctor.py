"""`tcpstates doctor`: is the C hot path (JSON Lines encoder, bcc table rows) built?

Without it tcpstates works the same, byte for byte, only with more CPU per event
(the pure-Python path); the check is informational, never required.
"""

from __future__ import annotations

from tcpstates.doctor import Check
from tcpstates.speedups import doctor_check as speedup_check
from tcpstates.plugins.jsonl import sink


def checks() -> list[Check]:
    return [speedup_check("hot path", sink.C_ENCODER_AVAILABLE, "C encoder for JSON Lines and bcc table rows is in use")]
