"""The text and CSV layouts of connection records (`--connections`).

bcc has no such mode; this table is ours, documented in docs/events.md.
One line per closed connection:

  text  SKADDR C-PID C-COMM [owner] LADDR LPORT RADDR RPORT END LIFE_MS STATES
        STATES lists `STATE=ms` for every state it passed through, in the order
        a connection passes them; LIFE_MS starts with `>` when the connection
        began before tracing did (its start and first state times are unknown);
        it is `?` when the close was not seen (END `unknown`: the kernel never
        ran the program for its ->CLOSE; the row's time is when that was found).
  csv   SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,RADDR,RPORT,END,ERROR,FIRST,COMPLETE,
        LIFE_MS, then one <STATE>_MS column per state (empty when never in it);
        ERROR is the socket's errno name at the close (ECONNREFUSED, ETIMEDOUT,
        ...), empty when none or not known; LIFE_MS is empty when END is `unknown`
        [,O-PID,O-COMM,WORKLOAD]
C-PID/C-COMM are the on-CPU task when the socket was first seen (for an
active open: the connecting process). -T/-t prefix the same columns as the
state-change table, for the close time.
"""

from __future__ import annotations

from tcpstates.events import AF_INET, CONNECTION, STATE_NUMBERS, Connection, Event
from tcpstates.plugins.bcc_table.format import (_OWNER_DEFAULT, _OWNER_WIDE, COMM_WIDTH, BccFormatter,
                                                csv_field, escaped_column)
from tcpstates.text import escape_text

# the order a connection passes through them (active, then passive, then closing)
STATE_ORDER = ("SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSING",
               "TIME_WAIT", "CLOSE_WAIT", "LAST_ACK")
_ORDER = [(name, STATE_NUMBERS[name]) for name in STATE_ORDER]
# END is as wide as the longest ending (`unreachable`)
_ROW_TEXT = "%-16x %-6d %-10.10s %s%-15s %-5d %-15s %-5d %-11s %-10s %s"
_ROW_WIDE = "%-16x %-6d %-16.16s %s%-2s %-39s %-5d %-39s %-5d %-11s %-10s %s"
_HEAD_TEXT = "%-16s %-6s %-10.10s %s%-15s %-5s %-15s %-5s %-11s %-10s %s"
_HEAD_WIDE = "%-16s %-6s %-16.16s %s%-2s %-39s %-5s %-39s %-5s %-11s %-10s %s"
_CSV_HEAD = ("SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,RADDR,RPORT,END,ERROR,FIRST,COMPLETE,LIFE_MS,"
             + ",".join(f"{name}_MS" for name in STATE_ORDER))


def _ms(ns: int) -> str:
    return "%.3f" % (ns // 1000 / 1000)


class ConnectionFormatter(BccFormatter):
    """Renders connection records; Events without one (not expected from a
    source in connection mode) are skipped."""

    def header(self) -> str:
        owner_cols = ("O-PID", "O-COMM", "WORKLOAD")
        if self.csv:
            prefix = ("TIME," if self.time_col else "") + ("TIME(s)," if self.timestamp_col else "")
            return prefix + _CSV_HEAD + (",O-PID,O-COMM,WORKLOAD" if self.owner else "")
        prefix = ("%-8s " % "TIME" if self.time_col else "") + ("%-9s " % "TIME(s)" if self.timestamp_col else "")
        owner = self._owner_header(owner_cols)
        if self.wide:
            return prefix + _HEAD_WIDE % ("SKADDR", "C-PID", "C-COMM", owner, "IP", "LADDR", "LPORT",
                                          "RADDR", "RPORT", "END", "LIFE_MS", "STATES(ms)")
        return prefix + _HEAD_TEXT % ("SKADDR", "C-PID", "C-COMM", owner, "LADDR", "LPORT",
                                      "RADDR", "RPORT", "END", "LIFE_MS", "STATES(ms)")

    def _owner_header(self, cols: tuple[str, str, str]) -> str:
        if not self.owner:
            return ""
        return (_OWNER_WIDE if self.wide else _OWNER_DEFAULT) % cols

    def lines(self, batch: list[Event]) -> list[str]:
        out: list[str] = []
        kept: list[Event] = []
        for e in batch:
            conn = e.extra.get(CONNECTION)
            if not isinstance(conn, Connection):
                continue
            kept.append(e)
            out.append(self._csv(e, conn) if self.csv else self._text(e, conn))
        if self.time_col or self.timestamp_col:
            out = [self._prefix(e) + line for e, line in zip(kept, out)]
        return out

    def _text(self, e: Event, c: Connection) -> str:
        spent = c.state_ns
        states = " ".join([f"{name}={spent[num] // 1000 / 1000:.3f}" for name, num in _ORDER if num in spent])
        duration = c.duration_ns
        life = "?" if duration is None else ("" if c.complete else ">") + _ms(duration)
        owner = self._owner(e) if self.owner else ""
        # strings from outside, escaped as in the state-change table
        comm = escaped_column(e.comm, COMM_WIDTH[self.wide])
        saddr, daddr = escape_text(e.saddr), escape_text(e.daddr)
        if self.wide:
            return _ROW_WIDE % (e.skaddr, e.pid, comm, owner, "4" if e.family == AF_INET else "6",
                                saddr, e.sport, daddr, e.dport, c.ending, life, states or "-")
        return _ROW_TEXT % (e.skaddr, e.pid, comm, owner, saddr, e.sport, daddr, e.dport,
                            c.ending, life, states or "-")

    def _csv(self, e: Event, c: Connection) -> str:
        first = "%s" % (STATE_ORDER_NAMES.get(c.first_state) or c.first_state)
        cols = ["%x" % e.skaddr, str(e.pid), csv_field(e.comm), "4" if e.family == AF_INET else "6",
                csv_field(e.saddr), str(e.sport), csv_field(e.daddr), str(e.dport), c.ending,
                c.error_name or "", first,
                "1" if c.complete else "0", "" if c.duration_ns is None else _ms(c.duration_ns)]
        cols += [_ms(c.state_ns[num]) if num in c.state_ns else "" for _, num in _ORDER]
        return ",".join(cols) + (self._owner(e) if self.owner else "")


STATE_ORDER_NAMES = {num: name for name, num in STATE_NUMBERS.items()}
