"""The Event record every stage sees, TCP states, and text escaping for outputs.

One Event per state change, whatever the source (kernel or replay). Addresses
are kept as strings (orjson and the formatters want strings; `ipaddress`
objects are slow to build and orjson cannot serialise them).
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field
from typing import Any

from tcpstates.text import escape_text



class TcpState(enum.IntEnum):
    """TCP states, numbered as in include/net/tcp_states.h (the tracepoint's values)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


# Plain dicts for the hot path (an IntEnum lookup costs ~10x a dict lookup).
STATE_NAMES: dict[int, str] = {s.value: s.name for s in TcpState}
STATE_NUMBERS: dict[str, int] = {name: num for num, name in STATE_NAMES.items()}
TCP_CLOSE = 7
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6


def state_name(state: int) -> str:
    """bcc prints an unknown state number as the number itself."""
    return STATE_NAMES.get(state) or str(state)


@dataclass(slots=True)
class Event:
    """One TCP state change.

    `ts_ns` is CLOCK_MONOTONIC nanoseconds (the kernel's bpf_ktime_get_ns);
    sinks convert it to wall-clock time with the pipeline's clock offset.
    `span_ns` is the time spent in `oldstate`, or None when this is the first
    transition seen for the socket (bcc prints 0 then; we keep "unknown").
    `pid`/`comm` are whatever task was on the CPU (bcc's C-PID/C-COMM).
    `extra` holds what enrichers add, by field name.
    """

    ts_ns: int
    skaddr: int
    span_ns: int | None
    pid: int
    tid: int
    comm: str
    family: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    oldstate: int
    newstate: int
    cgroup_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def sanitize_text(raw: str) -> str:
    """Kept for plugins written against it: the same as `tcpstates.text.escape_text`."""
    return escape_text(raw)
