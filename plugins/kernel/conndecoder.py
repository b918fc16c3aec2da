"""Decoding connection records (`mode = "connections"`) into Events.

The layout is `struct tcpstates_conn_event` in bpf/tcpstates.h: the usual
event (the ->CLOSE transition) followed by the connection's start time, the
time of its last transition seen, the ns spent in each state (indexed by state
number), three flags and the socket's error at the close (sk_err). A record whose `closed` flag is 0 is a connection
whose ->CLOSE the kernel never ran the program for: its end is unknown. A test
compares it with the C layout. Kept apart from decoder.py, whose per-event
hot loop it does not touch. When the C decoder is built (_decode.c
decode_conn_block) it decodes these records too: a connection record is
bigger than a state change and, at a host's full connection rate, decoding
them in Python cost more CPU per connection than the state changes it
replaces; the Python loop here is the reference it is tested against.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

from tcpstates.events import CONNECTION, Connection, Event
from tcpstates.plugins.kernel.decoder import EVENT_STRUCT, KERNEL_OWNER, NO_OWNER, SPAN_UNKNOWN, Decoder, _c_decode

NSTATES = 16
# error_flags (bpf/tcpstates.h): TCPSTATES_ERROR_READ, and with it _UNSENT, _ABORTED
_READ, _READ_UNSENT, _READ_ABORTED = 1, 3, 5
CONN_STRUCT = struct.Struct("<" + EVENT_STRUCT.format[1:] + "QQ%dQBBBBi" % NSTATES)
CONN_SIZE = CONN_STRUCT.size
CONN_RING_RECORD = struct.Struct("<II" + CONN_STRUCT.format[1:])
CONN_RING_RECORD_SIZE = CONN_RING_RECORD.size
assert CONN_RING_RECORD_SIZE % 8 == 0


# the state numbers, zipped with a record's 16 ns counters: the states it was
# in are kept by a C-level filter (itemgetter), no Python code per state
_STATE_NUMBERS = tuple(range(NSTATES))
_SPENT = itemgetter(1)


def _events(dec: Decoder, records: Iterable[tuple[Any, ...]], skip: int) -> list[Event]:
    """Events of connection records (their first `skip` fields are the ring
    header); stops at a ring header that is not ours (skip 2)."""
    out: list[Event] = []
    append = out.append
    comm, addr = dec.comm, dec.addr
    first_state = skip + 17 + NSTATES
    for rec in records:
        if skip and rec[0] != CONN_SIZE:
            break
        (ts, sk, span, cg, pid, tid, sport, dport, fam, old, new, saddr, daddr, rawcomm, owner,
         start, last) = rec[skip:skip + 17]
        first, complete, closed, error_flags, error = rec[first_state:]
        extra: dict[str, Any] = {CONNECTION: Connection(
            start, ts if closed else None,
            dict(filter(_SPENT, zip(_STATE_NUMBERS, rec[skip + 17:first_state]))),
            first, old, bool(complete), bool(closed), last, error if error_flags & _READ else None,
            error_flags & _READ_UNSENT == _READ_UNSENT, error_flags & _READ_ABORTED == _READ_ABORTED)}
        if owner != NO_OWNER:
            extra[KERNEL_OWNER] = owner
        append(Event(ts, sk, None if span == SPAN_UNKNOWN else span, pid, tid, comm(rawcomm), fam,
                     addr(fam, saddr), sport, addr(fam, daddr), dport, old, new, cg, extra))
    return out


def decode_conn_block(dec: Decoder, data: bytes) -> tuple[list[Event], int]:
    """Back-to-back ring records of connections; stops at the first foreign header."""
    if dec.use_c:
        # the C decoder (_decode.c): the same Events, ~5x less CPU per record;
        # texts it has not memoised come from the decoder's caches and slow paths
        assert _c_decode is not None
        result: tuple[list[Event], int] = _c_decode.decode_conn_block(
            data, Event, Connection, dec._addr4, dec._addr6, dec._comm, dec._slow_addr, dec.comm,
            KERNEL_OWNER, CONNECTION)
        return result
    usable = len(data) - len(data) % CONN_RING_RECORD_SIZE
    out = _events(dec, CONN_RING_RECORD.iter_unpack(data[:usable]), 2)
    return out, len(out) * CONN_RING_RECORD_SIZE


def decode_conn(dec: Decoder, buf: Any, offsets: Any) -> list[Event]:
    """Connection records at `offsets` in `buf` (perf-buffer path)."""
    return _events(dec, (CONN_STRUCT.unpack_from(buf, off) for off in offsets), 0)
