"""The JSON Lines record format (docs/events.md, docs/event.schema.json).

Shared by the jsonl sink (writing) and the replay source (reading), so a
recorded trace replays into exactly the events that produced it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from tcpstates.events import (AF_INET, AF_INET6, CONNECTION, STATE_NAMES, STATE_NUMBERS, Connection, Event,
                               connection_of)

SCHEMA_VERSION = 1
FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}
FAMILY_NUMBERS = {v: k for k, v in FAMILY_NAMES.items()}
CORE_FIELDS = ("type", "v", "seq", "time", "time_ns", "mono_ns", "host", "skaddr", "family",
               "laddr", "lport", "raddr", "rport", "oldstate", "newstate", "span_us", "pid",
               "tid", "comm", "cgroup_id")


class Rfc3339:
    """Formats epoch ns as RFC 3339 UTC with nanoseconds, caching the seconds part."""

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def __call__(self, ns: int) -> str:
        sec, frac = divmod(ns, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{frac:09d}Z"


def event_record(e: Event, seq: int, wall_ns: int, host: str, rfc3339: Rfc3339) -> dict[str, Any]:
    extra = e.extra
    if extra:
        conn = connection_of(e)
        if conn is not None:
            return connection_record(e, conn, seq, wall_ns, host, rfc3339)
    rec: dict[str, Any] = {
        "type": "state_change",
        "v": SCHEMA_VERSION,
        "seq": seq,
        "time": rfc3339(wall_ns),
        "time_ns": wall_ns,
        "mono_ns": e.ts_ns,
        "host": host,
        "skaddr": "%x" % e.skaddr,
        "family": FAMILY_NAMES.get(e.family, str(e.family)),
        "laddr": e.saddr,
        "lport": e.sport,
        "raddr": e.daddr,
        "rport": e.dport,
        "oldstate": STATE_NAMES.get(e.oldstate) or str(e.oldstate),
        "newstate": STATE_NAMES.get(e.newstate) or str(e.newstate),
        "span_us": None if e.span_ns is None else e.span_ns // 1000,
        "pid": e.pid,
        "tid": e.tid,
        "comm": e.comm,
        "cgroup_id": e.cgroup_id,
    }
    if extra:
        if _CORE.isdisjoint(extra):
            rec.update(extra)
        else:   # enrichers never overwrite core fields
            rec.update((k, v) for k, v in extra.items() if k not in _CORE)
    return rec


CONNECTION_FIELDS = ("type", "v", "seq", "time", "time_ns", "mono_ns", "start_time", "start_time_ns",
                     "start_mono_ns", "duration_us", "complete", "closed", "ending", "error", "first_state",
                     "last_state", "last_change_time", "last_change_time_ns", "last_change_mono_ns",
                     "states_us", "host", "skaddr", "family", "laddr", "lport", "raddr", "rport",
                     "pid", "tid", "comm", "cgroup_id")


def connection_record(e: Event, c: Connection, seq: int, wall_ns: int, host: str,
                      rfc3339: Rfc3339) -> dict[str, Any]:
    """A connection record (`"type": "connection"`): the time is the close;
    pid/tid/comm/cgroup_id are the on-CPU task at the socket's first sight.
    A connection whose close was not seen (`closed` false) has the time it was
    found gone instead, no duration, and the time of its last transition seen."""
    offset = wall_ns - e.ts_ns          # monotonic -> wall, as for the record's own time
    start_wall = c.start_ns + offset
    duration = c.duration_ns
    rec: dict[str, Any] = {
        "type": "connection",
        "v": SCHEMA_VERSION,
        "seq": seq,
        "time": rfc3339(wall_ns),
        "time_ns": wall_ns,
        "mono_ns": e.ts_ns,
        "start_time": rfc3339(start_wall),
        "start_time_ns": start_wall,
        "start_mono_ns": c.start_ns,
        "duration_us": None if duration is None else duration // 1000,
        "complete": c.complete,
        "closed": c.closed,
        "ending": c.ending,
        "error": c.error_name,
        "first_state": STATE_NAMES.get(c.first_state) or str(c.first_state),
        "last_state": STATE_NAMES.get(c.last_state) or str(c.last_state),
        "states_us": {STATE_NAMES.get(s) or str(s): ns // 1000 for s, ns in sorted(c.state_ns.items())},
        "host": host,
        "skaddr": "%x" % e.skaddr,
        "family": FAMILY_NAMES.get(e.family, str(e.family)),
        "laddr": e.saddr,
        "lport": e.sport,
        "raddr": e.daddr,
        "rport": e.dport,
        "pid": e.pid,
        "tid": e.tid,
        "comm": e.comm,
        "cgroup_id": e.cgroup_id,
    }
    if not c.closed and c.last_ns is not None:
        # what is known of its end: it closed after this and before `time`
        last_wall = c.last_ns + offset
        rec["last_change_time"] = rfc3339(last_wall)
        rec["last_change_time_ns"] = last_wall
        rec["last_change_mono_ns"] = c.last_ns
    if len(e.extra) > 1:     # more than the connection itself: enrichers' fields
        rec.update((k, v) for k, v in e.extra.items() if k not in _CONNECTION_CORE and k != CONNECTION)
    return rec


def loss_record(kind: str, count: int, total: int, seq: int, wall_ns: int, host: str,
                rfc3339: Rfc3339) -> dict[str, Any]:
    return {"type": "lost", "v": SCHEMA_VERSION, "seq": seq, "time": rfc3339(wall_ns),
            "time_ns": wall_ns, "host": host, "kind": kind, "count": count, "total": total}


_CORE = frozenset(CORE_FIELDS)
_CONNECTION_CORE = frozenset(CONNECTION_FIELDS)


class RecordError(ValueError):
    """A replay record that cannot become an Event; the message says why."""


def _show(value: Any) -> str:
    """A bad value for a message: its repr, cut short (a record may hold a megabyte)."""
    text = repr(value)
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1 << 63:
        # the JSON reader turns an integer past 64 bits into a float: say so,
        # rather than echo a float the file never held
        return f"an integer beyond 64 bits (about {value:.4g})"
    return text if len(text) <= 60 else text[:57] + "..."


def _int(rec: dict[str, Any], key: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    value = rec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RecordError(f"field {key!r} must be an integer in {lo}..{hi}, got {_show(value)}")
    return value


def _str(rec: dict[str, Any], key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {_show(value)}")
    return value


def _addr(rec: dict[str, Any], key: str, family: int) -> str:
    value = _str(rec, key)
    try:
        socket.inet_pton(family, value)
    except (OSError, ValueError):
        raise RecordError(f"field {key!r} must be an {FAMILY_NAMES[family]} address, got {_show(value)}") from None
    return value


def _state(rec: dict[str, Any], key: str) -> int:
    value = rec.get(key)
    if isinstance(value, str):
        if value in STATE_NUMBERS:
            return STATE_NUMBERS[value]
        # ASCII digits only ("٨" is a digit to str.isdigit), and a number the
        # kernel's int field can hold
        if value.isascii() and value.isdigit() and len(value) <= 10 and int(value) < 2**31:
            return int(value)
    raise RecordError(f"field {key!r} must be a TCP state name, got {_show(value)}")


def record_event(rec: Any) -> Event:
    """Rebuild an Event from a state_change record (extra fields kept in `extra`)."""
    if not isinstance(rec, dict):
        raise RecordError("not a JSON object")
    raw_family = rec.get("family")
    family = FAMILY_NUMBERS.get(raw_family) if isinstance(raw_family, str) else None
    if family is None:
        raise RecordError(f"field 'family' must be ipv4 or ipv6, got {_show(raw_family)}")
    span = rec.get("span_us")
    if span is not None and (not isinstance(span, int) or isinstance(span, bool)
                             or not 0 <= span < (1 << 63) // 1000):
        raise RecordError(f"field 'span_us' must be a non-negative integer (µs, < 2^63 ns) or null, got {_show(span)}")
    time_ns = _int(rec, "time_ns", 0, (1 << 63) - 1)
    mono = rec.get("mono_ns", time_ns)
    if not isinstance(mono, int) or isinstance(mono, bool) or not 0 <= mono < 1 << 63:
        raise RecordError(f"field 'mono_ns' must be an integer in 0..{(1 << 63) - 1}, got {_show(mono)}")
    tid = rec.get("tid", 0)
    if tid is None:
        tid = 0
    if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < 1 << 32:
        raise RecordError(f"field 'tid' must be an integer in 0..{(1 << 32) - 1}, got {_show(tid)}")
    cgroup_id = rec.get("cgroup_id", 0)
    if cgroup_id is None:
        cgroup_id = 0
    if not isinstance(cgroup_id, int) or isinstance(cgroup_id, bool) or not 0 <= cgroup_id < 1 << 64:
        raise RecordError(f"field 'cgroup_id' must be an integer in 0..{(1 << 64) - 1}, got {_show(cgroup_id)}")
    skaddr_text = _str(rec, "skaddr")
    try:
        # plain ASCII hex of a 64-bit address (int() would take "٨", "_" and spaces)
        if not (0 < len(skaddr_text) <= 16 and skaddr_text.isascii() and skaddr_text.isalnum()):
            raise ValueError(skaddr_text)
        skaddr = int(skaddr_text, 16)
    except ValueError:
        raise RecordError(f"field 'skaddr' must be hexadecimal, got {_show(skaddr_text)}") from None
    extra = {k: v for k, v in rec.items() if k not in CORE_FIELDS}
    return Event(
        ts_ns=mono, skaddr=skaddr, span_ns=None if span is None else span * 1000,
        pid=_int(rec, "pid", 0, 2**32 - 1), tid=tid,
        comm=_str(rec, "comm"), family=family, saddr=_addr(rec, "laddr", family),
        sport=_int(rec, "lport", 0, 65535), daddr=_addr(rec, "raddr", family), dport=_int(rec, "rport", 0, 65535),
        oldstate=_state(rec, "oldstate"), newstate=_state(rec, "newstate"),
        cgroup_id=cgroup_id, extra=extra)

