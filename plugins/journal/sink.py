"""The `journal` sink (`--sink journal`, `-Y`): structured entries for systemd-journald.

Field names (docs/journal.md):
  MESSAGE               "COMM LADDR LPORT → RADDR RPORT OLD → NEW" (bcc's wording)
  MESSAGE_ID            fixed per record type (state change, lost records)
  PRIORITY              5 (notice, as bcc) for transitions, 4 (warning) for a failed
                        connect (SYN_SENT → CLOSE) and for lost records
  SYSLOG_IDENTIFIER     tcpstates
  OBJECT_*              bcc's field names, kept so existing queries work
  TCP_*                 our structured fields, including the event's own time
No CODE_* fields (they would point into this sink), no `_`-prefixed fields
(journald discards them from clients). Sent with `sendv`, which encodes
values with newlines safely; libsystemd silently drops entries when the
socket is missing, so we check for it and say so once.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from typing import Any

import orjson

from tcpstates.api import RunContext, Sink
from tcpstates.errors import UsageError, mark_written
from tcpstates.events import AF_INET, CONNECTION, STATE_NAMES, Connection, Event, connection_of
from tcpstates.options import option
from tcpstates.plugins.journal.bounded import BoundedSends
from tcpstates.records import Rfc3339
from tcpstates.text import escape_text

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def journald_absent(path: str | None = None) -> str | None:
    """Why journald cannot take entries at `path` (default JOURNAL_SOCKET), or
    None when something listens there. A datagram connect() sends nothing: it
    only finds out whether the socket file has a listener (a file left by a
    journald that is gone answers ECONNREFUSED). Errors other than "no file"
    and "refused" are not taken as absence (e.g. a policy refusing the probe)."""
    path = path or JOURNAL_SOCKET
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return f"{path} does not exist (journald is not running)"
    except ConnectionRefusedError:
        return f"{path} exists but nothing listens on it (journald is not running; the file is stale)"
    except OSError:
        return None
    finally:
        probe.close()
    return None
MESSAGE_ID_STATE_CHANGE = "9b3c1f0e5d7a4c2e8f6b0a1d2c3e4f50"
MESSAGE_ID_LOST = "9b3c1f0e5d7a4c2e8f6b0a1d2c3e4f51"
MESSAGE_ID_CONNECTION = "9b3c1f0e5d7a4c2e8f6b0a1d2c3e4f52"
PRIORITY_NORMAL = 5
PRIORITY_WARNING = 4
SYN_SENT, CLOSE = 2, 7
FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
MAX_FIELD_WARNINGS = 5     # distinct fields left out that are named in a warning each


def journal_value(value: Any) -> str:
    """An enricher field's value as journal text: journal fields are strings,
    so a list of plain tokens is its items separated by spaces
    (owner_candidates: PIDs), a boolean 1 or 0 (as TCP_COMPLETE), a mapping
    JSON; not Python's repr. A list (or set) with anything that would not
    read back as one token - None, a string with a space or empty, a
    nested list or mapping - is JSON as a whole, so its items stay apart.
    Raises TypeError/ValueError (or RecursionError) for a value JSON cannot
    hold (nesting past orjson's limit, an integer above 64 bits in a
    mapping): the caller leaves that field out, as it does a bad name."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=repr)       # one order per run, whatever the items' types
    if isinstance(value, (list, tuple)):
        if all(_token(v) for v in value):
            return " ".join(("1" if v else "0") if isinstance(v, bool) else str(v) for v in value)
        return _json_text(list(value))
    if isinstance(value, dict):
        return _json_text(value)
    return str(value)


def _token(v: Any) -> bool:
    """Does v print as one space-free, non-empty token?"""
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v != "" and not any(c.isspace() for c in v)


def _json_text(value: Any) -> str:
    # keys that are not strings (a third-party enricher's {state number: count})
    # become strings, as JSON needs; values orjson does not know, their str()
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def journal_field_name(key: str, prefix: str = "TCP_") -> str | None:
    """An enricher's key as a valid journal field name, or None if it cannot be."""
    name = prefix + re.sub(r"[^A-Z0-9_]", "_", key.upper())
    return name if FIELD_NAME.match(name) else None


@dataclasses.dataclass
class JournalOptions:
    identifier: str = option("tcpstates", "SYSLOG_IDENTIFIER of every entry")
    bcc_fields: bool = option(True, "also send bcc's OBJECT_* fields")
    stall_timeout: float = option(1.0, "seconds journald may take nothing (stopped, overloaded) before a "
                                  "batch fails for this sink alone (counted as not written; the other "
                                  "sinks go on)", min=0.01, max=3600.0)

    def validate(self) -> None:
        if not self.identifier or any(c in self.identifier for c in "\n\0"):
            raise ValueError("identifier: must be a non-empty single line")


class JournalSink(Sink):
    """Structured entries in the systemd journal."""

    name = "journal"
    description = "systemd journal entries with TCP_* and bcc's OBJECT_* fields (-Y)"
    Options = JournalOptions
    structured = True

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        try:
            from systemd import journal
        except ImportError:
            raise UsageError("the journal sink needs systemd-python: apt-get install python3-systemd "
                             "(Debian/Ubuntu), dnf install python3-systemd (Fedora), "
                             "pacman -S python-systemd (Arch), or pip install systemd-python") from None
        self._sends = BoundedSends(journal.sendv, options.stall_timeout)
        self._root = os.geteuid() == 0
        self.rfc3339 = Rfc3339()
        self.sent = 0
        self._left_out_keys: set[str] = set()

    def _check_socket(self) -> bool:
        if os.path.exists(JOURNAL_SOCKET):
            return True
        self.context.warn(f"journal sink: {JOURNAL_SOCKET} does not exist, so journald is not "
                          f"running here and entries are lost (libsystemd would drop them "
                          f"silently); start systemd-journald or use another sink",
                          once_key="journal-socket")
        return False

    def open(self) -> None:
        absent = journald_absent()
        if self.context.strict and absent:
            # --strict: every entry would be lost, so the run does not start
            raise OSError(f"{absent}; start systemd-journald, or run without --strict to count the "
                          f"entries as lost")
        if absent:
            # the same once_key as the per-batch check: said once
            self.context.warn(f"journal sink: {absent}; entries are lost until it runs (start "
                              f"systemd-journald or use another sink)", once_key="journal-socket")

    def _connection_fields(self, e: Event, c: Connection) -> list[str]:
        """A connection record: TCP_* fields of the connection, no OBJECT_* (bcc has none).
        One whose close was not seen has no TCP_DURATION_US (unknown), TCP_CLOSED=0
        and the time of its last transition seen."""
        offset = self.context.clock_offset_ns
        wall = e.ts_ns + offset
        states = " ".join(f"{STATE_NAMES.get(s, s)}={ns // 1000}us" for s, ns in sorted(c.state_ns.items()))
        duration = c.duration_ns
        lasted = (f"{duration // 1000}us" if duration is not None else
                  f"close not seen, last seen in {STATE_NAMES.get(c.last_state, c.last_state)}")
        f = [
            f"MESSAGE={escape_text(e.comm)} {e.saddr} {e.sport} → {e.daddr} {e.dport} connection {c.ending}"
            f"{f' ({c.error_name})' if c.error_name else ''}, "
            f"{lasted}: {states or '-'}",
            f"MESSAGE_ID={MESSAGE_ID_CONNECTION}",
            f"PRIORITY={PRIORITY_NORMAL if c.ending == 'normal' else PRIORITY_WARNING}",
            f"SYSLOG_IDENTIFIER={self.options.identifier}",
            f"TCP_EVENT_TIME={self.rfc3339(wall)}",
            f"TCP_EVENT_TIME_USEC={wall // 1000}",
            f"TCP_START_TIME_USEC={(c.start_ns + offset) // 1000}",
            f"TCP_ENDING={c.ending}",
            f"TCP_COMPLETE={int(c.complete)}",
            f"TCP_CLOSED={int(c.closed)}",
            f"TCP_FIRST_STATE={STATE_NAMES.get(c.first_state, c.first_state)}",
            f"TCP_LAST_STATE={STATE_NAMES.get(c.last_state, c.last_state)}",
            f"TCP_SKADDR={e.skaddr:x}",
            f"TCP_FAMILY={'ipv4' if e.family == AF_INET else 'ipv6'}",
            f"TCP_LOCAL_ADDRESS={e.saddr}",
            f"TCP_LOCAL_PORT={e.sport}",
            f"TCP_REMOTE_ADDRESS={e.daddr}",
            f"TCP_REMOTE_PORT={e.dport}",
            f"TCP_CPU_PID={e.pid}",
            f"TCP_CPU_TID={e.tid}",
            f"TCP_CPU_COMM={e.comm}",
            f"TCP_CGROUP_ID={e.cgroup_id}",
        ]
        if c.error_name is not None:
            f.append(f"TCP_ERROR={c.error_name}")
        if duration is not None:
            f.append(f"TCP_DURATION_US={duration // 1000}")
        elif c.last_ns is not None:
            f.append(f"TCP_LAST_CHANGE_TIME_USEC={(c.last_ns + offset) // 1000}")
        f += [f"TCP_{STATE_NAMES.get(s, str(s))}_US={ns // 1000}" for s, ns in sorted(c.state_ns.items())]
        return f

    def _fields(self, e: Event) -> list[str]:
        conn = connection_of(e)
        if conn is not None:
            f = self._connection_fields(e, conn)
            self._extra_fields(e, f)
            return f
        old = STATE_NAMES.get(e.oldstate) or str(e.oldstate)
        new = STATE_NAMES.get(e.newstate) or str(e.newstate)
        v = "IPV4" if e.family == AF_INET else "IPV6"
        wall = e.ts_ns + self.context.clock_offset_ns
        priority = PRIORITY_WARNING if (e.oldstate, e.newstate) == (SYN_SENT, CLOSE) else PRIORITY_NORMAL
        f = [
            # MESSAGE is the line journalctl (-o cat, syslog forwarding) prints: a
            # process name is anyone's choice (prctl): escaped where it was decoded
            # (escape_name) and again here (escape_text leaves that form as it is,
            # and escapes a replayed name); TCP_CPU_COMM holds the same text
            f"MESSAGE={escape_text(e.comm)} {e.saddr} {e.sport} → {e.daddr} {e.dport} {old} → {new}",
            f"MESSAGE_ID={MESSAGE_ID_STATE_CHANGE}",
            f"PRIORITY={priority}",
            f"SYSLOG_IDENTIFIER={self.options.identifier}",
            f"TCP_EVENT_TIME={self.rfc3339(wall)}",
            f"TCP_EVENT_TIME_USEC={wall // 1000}",
            f"TCP_SKADDR={e.skaddr:x}",
            f"TCP_FAMILY={'ipv4' if e.family == AF_INET else 'ipv6'}",
            f"TCP_LOCAL_ADDRESS={e.saddr}",
            f"TCP_LOCAL_PORT={e.sport}",
            f"TCP_REMOTE_ADDRESS={e.daddr}",
            f"TCP_REMOTE_PORT={e.dport}",
            f"TCP_OLD_STATE={old}",
            f"TCP_NEW_STATE={new}",
            f"TCP_CPU_PID={e.pid}",
            f"TCP_CPU_TID={e.tid}",
            f"TCP_CPU_COMM={e.comm}",
            f"TCP_CGROUP_ID={e.cgroup_id}",
        ]
        if e.span_ns is not None:
            f.append(f"TCP_SPAN_US={e.span_ns // 1000}")
        if self.options.bcc_fields:
            f += [
                f"OBJECT_PID={e.pid}",
                f"OBJECT_{v}_SOURCE_ADDRESS={e.saddr}",
                f"OBJECT_TCP_SOURCE_PORT={e.sport}",
                f"OBJECT_{v}_DESTINATION_ADDRESS={e.daddr}",
                f"OBJECT_TCP_DESTINATION_PORT={e.dport}",
                f"OBJECT_TCP_OLD_STATE={old}",
                f"OBJECT_TCP_NEW_STATE={new}",
                f"OBJECT_TCP_SPAN_TIME={0 if e.span_ns is None else e.span_ns // 1000}",
            ]
            if not self._root:   # as bcc: journald fills OBJECT_COMM itself for root senders
                f.append(f"OBJECT_COMM={e.comm}")
        self._extra_fields(e, f)
        return f

    def _extra_fields(self, e: Event, f: list[str]) -> None:
        for key, value in e.extra.items():
            if key == CONNECTION and isinstance(value, Connection):
                continue
            name = journal_field_name(key)
            if name is None:
                self._left_out(key, f"sink journal: field {key!r} cannot be a journal field name "
                                    f"(A-Z, 0-9, _ only); it is left out of the entries")
                continue
            if value is None:
                continue
            try:
                text = journal_value(value)
            except Exception as exc:     # any value of a third-party enricher's
                # one field that cannot be text costs only itself, never the
                # batch (the sink would fail and lose every entry after it)
                self._left_out(key, f"sink journal: field {key!r} could not be made journal text "
                                    f"({type(exc).__name__}: {exc}); it is left out of the entries")
                continue
            if not text.isascii():
                try:
                    text.encode()
                except UnicodeEncodeError:
                    # a lone surrogate (a third-party enricher's os.fsdecode of a
                    # name that is not UTF-8) cannot be sent: sendv would raise
                    # and fail the batch. Escaped as every output escapes one.
                    text = escape_text(text)
            f.append(f"{name}={text}")

    def _left_out(self, key: str, message: str) -> None:
        """Say which fields are left out, for the first few distinct ones only: a
        replayed file can carry a new bad key in every record, and one warning
        line (and one remembered key) each would flood stderr — often the
        journal itself — without end."""
        if key in self._left_out_keys:
            return
        if len(self._left_out_keys) >= MAX_FIELD_WARNINGS:
            self.context.warn("sink journal: more fields that cannot be journal fields are left out "
                              "of the entries without a warning each", once_key="journal-fields-more")
            return
        self._left_out_keys.add(key)
        self.context.warn(message)

    def write(self, batch: list[Event]) -> int | None:
        if not self._check_socket():
            return 0       # nothing reached journald: not "written"
        fields = self._fields
        done = 0
        try:
            with self._sends as sends:
                send = sends.send
                for e in batch:
                    send(fields(e))
                    done += 1
        except Exception as exc:
            mark_written(exc, done)
            raise
        finally:
            self.sent += done
        return None

    def write_loss(self, kind: str, count: int, total: int) -> None:
        if not self._check_socket():
            return
        what = "dropped (kernel buffer full)" if kind == "dropped" else kind.replace("_", " ")
        with self._sends as sends:
            sends.send([f"MESSAGE=tcpstates lost {count} events: {what}; {total} in total",
                        f"MESSAGE_ID={MESSAGE_ID_LOST}", f"PRIORITY={PRIORITY_WARNING}",
                        f"SYSLOG_IDENTIFIER={self.options.identifier}", f"TCP_LOST_KIND={kind}",
                        f"TCP_LOST_COUNT={count}", f"TCP_LOST_TOTAL={total}"])
