"""Decoding connection records (`mode = "connections"`) into Events.

The layout is `struct tcpstates_conn_event` in bpf/tcpstates.h: the usual
event (the ->CLOSE transition) followed by the connection's start time, the
time of its last transition seen, the ns spent in each state (indexed by state
number) and three flags. A record whose `closed` flag is 0 is a connection
whose ->CLOSE the kernel never ran the program for: its end is unknown. A test
compares it with the C layout. Kept apart from decoder.py, whose per-event
hot loop it does not touch: connection records are few.
"""

from __future__ import annotations

import struct
from typing import Any

from tcpstates.events import CONNECTION, Connection, Event
from tcpstates.plugins.kernel.decoder import EVENT_STRUCT, KERNEL_OWNER, NO_OWNER, SPAN_UNKNOWN, Decoder

NSTATES = 16
CONN_STRUCT = struct.Struct("<" + EVENT_STRUCT.format[1:] + "QQ%dQBBB5x" % NSTATES)
CONN_SIZE = CONN_STRUCT.size
CONN_RING_RECORD = struct.Struct("<II" + CONN_STRUCT.format[1:])
CONN_RING_RECORD_SIZE = CONN_RING_RECORD.size
assert CONN_RING_RECORD_SIZE % 8 == 0


def _event(dec: Decoder, fields: tuple[Any, ...]) -> Event:
    (ts, sk, span, cg, pid, tid, sport, dport, fam, old, new, saddr, daddr, rawcomm, owner,
     start, last) = fields[:17]
    states = fields[17:17 + NSTATES]
    first, complete, closed = fields[17 + NSTATES:]
    extra: dict[str, Any] = {CONNECTION: Connection(
        start_ns=start, end_ns=ts if closed else None,
        state_ns={s: ns for s, ns in enumerate(states) if ns}, first_state=first, last_state=old,
        complete=bool(complete), closed=bool(closed), last_ns=last)}
    if owner != NO_OWNER:
        extra[KERNEL_OWNER] = owner
    return Event(ts, sk, None if span == SPAN_UNKNOWN else span, pid, tid, dec.comm(rawcomm), fam,
                 dec.addr(fam, saddr), sport, dec.addr(fam, daddr), dport, old, new, cg, extra)


def decode_conn_block(dec: Decoder, data: bytes) -> tuple[list[Event], int]:
    """Back-to-back ring records of connections; stops at the first foreign header."""
    usable = len(data) - len(data) % CONN_RING_RECORD_SIZE
    out = []
    for rec in CONN_RING_RECORD.iter_unpack(data[:usable]):
        if rec[0] != CONN_SIZE:
            break
        out.append(_event(dec, rec[2:]))
    return out, len(out) * CONN_RING_RECORD_SIZE


def decode_conn(dec: Decoder, buf: Any, offsets: Any) -> list[Event]:
    """Connection records at `offsets` in `buf` (perf-buffer path)."""
    return [_event(dec, CONN_STRUCT.unpack_from(buf, off)) for off in offsets]
