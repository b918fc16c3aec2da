"""The Event record every stage sees, TCP states, and text escaping for outputs.

One Event per state change, whatever the source (kernel or replay). Addresses
are kept as strings (orjson and the formatters want strings; `ipaddress`
objects are slow to build and orjson cannot serialise them).
"""

from __future__ import annotations

import enum
import errno
import socket
from dataclasses import dataclass, field
from typing import Any

from tcpstates.text import escape_name



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


# Connection records (the kernel source's `mode = "connections"`): one Event per
# closed connection, its ->CLOSE transition, with a Connection in
# extra[CONNECTION]. pid/tid/comm/cgroup_id are then the on-CPU task at the
# socket's first sight, span_ns the time in the last state before CLOSE.
CONNECTION = "connection"
# How a connection ended (Connection.ending; docs/events.md):
#   normal       through the FIN states (FIN_WAIT2, CLOSING, LAST_ACK -> CLOSE)
#   refused      a connect answered with a RST (or an ICMP port unreachable)
#   timeout      no answer: SYN or data retransmissions (or keepalives) ran out
#   unreachable  an ICMP error ended it (host/network unreachable, prohibited)
#   reset        an abort or a RST with no completed FIN exchange
#   abandoned    a connect its own process closed before it completed
#   failed       a connect that did not complete for another reason (the
#                record's error names it, or none: it failed inside connect()
#                before its SYN was sent, e.g. no free local port), or whose
#                error could not be read (no BTF): why not is then unknown
#   unknown      its ->CLOSE was never seen (a tracepoint hit the kernel did
#                not run the program for); the record was made when a new
#                connection began at the same socket address (closed False)
ENDINGS = ("normal", "refused", "timeout", "unreachable", "reset", "abandoned", "failed", "unknown")


# plain int keys: looked up twice per connection record
# FIN_WAIT1 -> CLOSE is never an orderly close: the ACK of our FIN moves the
# socket to FIN_WAIT2 first and the peer's FIN to CLOSING; straight to CLOSE is a
# RST, an abort (SO_LINGER 0 after shutdown while the FIN is unacknowledged,
# tcp_disconnect) or the retries of an unacknowledged FIN running out. The same
# aborts once the FIN is acknowledged leave FIN_WAIT2 (Connection.aborted).
_ENDINGS_BY_STATE = {int(TcpState.SYN_SENT): "failed", int(TcpState.ESTABLISHED): "reset",
                     int(TcpState.SYN_RECV): "reset", int(TcpState.CLOSE_WAIT): "reset",
                     int(TcpState.FIN_WAIT1): "reset"}
# The socket's error (sk_err) at its ->CLOSE names the cause outright.
# ECONNREFUSED means refused only for a connect; in the FIN states (an
# orderly close under way) only an error that ends a connection counts: with
# IP_RECVERR an ICMP error is stored there without ending anything and may
# still be there, unread, when the connection closes normally.
_FATAL_ERRORS = {errno.ETIMEDOUT: "timeout", errno.ECONNRESET: "reset", errno.EPIPE: "reset",
                 errno.ECONNABORTED: "reset"}
_ICMP_ERRORS = dict.fromkeys((errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENONET,
                              errno.ENETDOWN, errno.EACCES, errno.ENOPROTOOPT,
                              errno.EPROTO, errno.EOPNOTSUPP), "unreachable")
_ABORT_ERRORS = {**_ICMP_ERRORS, **_FATAL_ERRORS}
_CONNECT_ERRORS = {**_ABORT_ERRORS, errno.ECONNREFUSED: "refused"}
_SYN_SENT = int(TcpState.SYN_SENT)
_FIN_WAIT2 = int(TcpState.FIN_WAIT2)


def connection_ending(last_state: int, error: int | None = None, unsent: bool = False,
                      aborted: bool = False) -> str:
    """How a connection that went last_state -> CLOSE ended (ENDINGS above),
    given the socket's error at the close: None when it could not be read,
    0 when there was none. unsent: the socket had sent no segment, so a
    connect that closed without an error failed inside connect() itself (no
    free local port: EADDRNOTAVAIL; the kernel moves it to SYN_SENT before
    choosing the port and back to CLOSE on failure, the errno going to the
    caller alone) rather than being abandoned by its process. aborted: a
    FIN_WAIT2->CLOSE that was neither the peer's FIN nor the socket's own
    close handing it to a FIN_WAIT2 timewait, but an abort by its own side."""
    if error:
        if last_state == _SYN_SENT:
            by_error = _CONNECT_ERRORS.get(error)
        elif last_state in _ENDINGS_BY_STATE:
            by_error = _ABORT_ERRORS.get(error)
        else:
            by_error = _FATAL_ERRORS.get(error)
        if by_error is not None:
            return by_error
    if error == 0 and last_state == _SYN_SENT:
        return "failed" if unsent else "abandoned"
    if aborted and last_state == _FIN_WAIT2:
        return "reset"
    return _ENDINGS_BY_STATE.get(last_state, "normal")


@dataclass(slots=True)
class Connection:
    """What a connection record adds to its closing Event (extra[CONNECTION])."""

    start_ns: int                # CLOCK_MONOTONIC ns of the first transition seen
    end_ns: int | None           # of the ->CLOSE transition (the Event's ts_ns); None: not seen
    state_ns: dict[int, int]     # ns spent in each state it passed through (and left)
    first_state: int             # old state of the first transition seen
    last_state: int              # the state it left for CLOSE (unclosed: the last state seen)
    complete: bool               # seen from its start (connect, or the SYN)
    # False: its ->CLOSE was never seen. The record was made when a new
    # connection began at the same socket address (the Event's ts_ns is that
    # moment, its span_ns None): it closed between last_ns and then.
    closed: bool = True
    last_ns: int | None = None   # CLOCK_MONOTONIC ns of the last transition seen
    # the socket's error at the close (sk_err: an errno, 0 none); None: not
    # read (no BTF offset, or the close was not seen)
    error: int | None = None
    # the socket had sent no segment at its close (tcp_sock.segs_out 0; False
    # when not read): a connect that closed so failed inside connect()
    unsent: bool = False
    # its own side aborted it in FIN_WAIT2 (SO_LINGER 0, a close with unread
    # data: a RST sent, no error stored): neither the peer's FIN had come nor
    # had its close orphaned it (sock.sk_flags; False when not read)
    aborted: bool = False

    @property
    def duration_ns(self) -> int | None:
        """close − start; None when the close was not seen."""
        return None if self.end_ns is None else self.end_ns - self.start_ns

    @property
    def ending(self) -> str:
        return connection_ending(self.last_state, self.error, self.unsent, self.aborted) if self.closed else "unknown"

    @property
    def error_name(self) -> str | None:
        """The error as its errno name (`ECONNREFUSED`), None when none or not read."""
        if not self.error:
            return None
        return errno.errorcode.get(self.error, str(self.error))


def connection_of(e: "Event") -> Connection | None:
    """The connection record an Event carries, or None. Only a Connection
    object counts: a field named "connection" from elsewhere (a replayed
    record, a third-party enricher) is an ordinary field."""
    conn = e.extra.get(CONNECTION) if e.extra else None
    return conn if isinstance(conn, Connection) else None


def sanitize_text(raw: str) -> str:
    """A name from outside as an event field holds it: `tcpstates.text.escape_name`
    (control characters as \\xNN, a backslash doubled). Kept under this name for
    plugins written against it."""
    return escape_name(raw)
