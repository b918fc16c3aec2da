"""The Event record every stage sees, TCP state names, and the bulk decoder.

One Event per state change, whatever the source (kernel or replay). Addresses
are kept as strings (orjson and the formatters want strings; `ipaddress`
objects are slow to build and orjson cannot serialise them).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

# Numbering from include/net/tcp_states.h; the tracepoint reports these values.
STATE_NAMES: dict[int, str] = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
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

    @property
    def ip(self) -> int:
        """4 or 6, as bcc's IP column."""
        return 4 if self.family == AF_INET else 6

    @property
    def transition(self) -> str:
        return f"{state_name(self.oldstate)}->{state_name(self.newstate)}"


# struct tcpstates_event in bpf/tcpstates.h
EVENT_STRUCT = struct.Struct("<QQQQIIHHHBB16s16s16s")
EVENT_SIZE = EVENT_STRUCT.size
# A ring-buffer record: u32 length (busy/discard bits), u32 page offset, event.
# 8 + 96 = 104 is a multiple of 8, so records sit back to back.
RING_RECORD = struct.Struct("<II" + EVENT_STRUCT.format[1:])
RING_RECORD_SIZE = RING_RECORD.size
assert RING_RECORD_SIZE % 8 == 0
SPAN_UNKNOWN = (1 << 64) - 1


def sanitize_text(raw: str) -> str:
    """Make an attacker-chosen string (a comm) safe for line-oriented output.

    Control characters and DEL become `\\xNN`, so a thread named "a\\nb" can
    neither forge a second output line nor hide behind escape sequences.
    """
    if raw.isprintable():
        return raw
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in raw)


class Decoder:
    """Turns raw kernel records into Events, with small caches.

    Addresses and thread names repeat heavily (a busy server talks to few
    peers), so formatting each distinct value once is most of the saving.
    The caches are bounded: they are simply cleared when they grow too big.
    """

    CACHE_LIMIT = 8192

    def __init__(self) -> None:
        self._addr4: dict[bytes, str] = {}
        self._addr6: dict[bytes, str] = {}
        self._comm: dict[bytes, str] = {}

    def comm(self, raw: bytes) -> str:
        text = self._comm.get(raw)
        if text is None:
            if len(self._comm) >= self.CACHE_LIMIT:
                self._comm.clear()
            text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            text = self._comm[raw] = sanitize_text(text)
        return text

    def _slow_addr(self, family: int, raw: bytes) -> str:
        cache = self._addr4 if family == AF_INET else self._addr6
        if len(cache) >= self.CACHE_LIMIT:
            cache.clear()
        text = cache[raw] = socket.inet_ntop(family, raw[:4] if family == AF_INET else raw)
        return text

    def decode_block(self, data: bytes) -> tuple[list[Event], int]:
        """Decode back-to-back ring records (8-byte header + event) from `data`.

        Stops at the first record whose header is not exactly ours (a busy,
        not yet submitted reservation, or a foreign record) and returns the
        events with the number of bytes they occupied.
        """
        usable = len(data) - len(data) % RING_RECORD_SIZE
        a4, a6, comms = self._addr4, self._addr6, self._comm
        slow_addr, slow_comm = self._slow_addr, self.comm
        out: list[Event] = []
        append = out.append
        for (hdr, _pgoff, ts, sk, span, cg, pid, tid, sport, dport, fam, old, new,
             saddr, daddr, rawcomm) in RING_RECORD.iter_unpack(data[:usable] if usable != len(data) else data):
            if hdr != EVENT_SIZE:
                break
            if fam == AF_INET:
                s = a4.get(saddr) or slow_addr(fam, saddr)
                d = a4.get(daddr) or slow_addr(fam, daddr)
            else:
                s = a6.get(saddr) or slow_addr(fam, saddr)
                d = a6.get(daddr) or slow_addr(fam, daddr)
            append(Event(ts, sk, None if span == SPAN_UNKNOWN else span, pid, tid,
                         comms.get(rawcomm) or slow_comm(rawcomm), fam, s, sport, d, dport,
                         old, new, cg, {}))
        return out, len(out) * RING_RECORD_SIZE

    def decode(self, buf: Any, offsets: Any) -> list[Event]:
        """Decode records at `offsets` in `buf` (perf-buffer path, tests)."""
        unpack = EVENT_STRUCT.unpack_from
        out = []
        for off in offsets:
            (ts, sk, span, cg, pid, tid, sport, dport, fam, old, new,
             saddr, daddr, rawcomm) = unpack(buf, off)
            cache = self._addr4 if fam == AF_INET else self._addr6
            s = cache.get(saddr) or self._slow_addr(fam, saddr)
            d = cache.get(daddr) or self._slow_addr(fam, daddr)
            out.append(Event(ts, sk, None if span == SPAN_UNKNOWN else span, pid, tid,
                             self.comm(rawcomm), fam, s, sport, d, dport, old, new, cg, {}))
        return out
