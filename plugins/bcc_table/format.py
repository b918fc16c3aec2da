"""bcc tcpstates' text and CSV layouts, byte for byte (upstream HEAD).

bcc's own `%` formats (kept below for reference) are rewritten with two
extra `%s` slots: the state pair pre-rendered (one `%` per row), and the
optional owner columns O-PID, O-COMM, WORKLOAD (empty unless `owner` is on, so the default output
is bcc's to the byte; tests/test_bcc_format.py proves it). Formatting works
on a whole batch and caches the HH:MM:SS string per second.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

from tcpstates import speedups
from tcpstates.events import AF_INET, STATE_NAMES, Event
from tcpstates.text import escape_text

_c_rows = speedups.load("tcpstates.plugins.bcc_table._rows")   # optional (setup.py); the Python path is the reference
C_ROWS_AVAILABLE = _c_rows is not None

# bcc's formats, for reference:
#   default "%-16x %-5d %-10.10s %s%-15s %-5d %-15s %-5d %-11s -> %-11s %.3f"  (%s: empty IP)
#   -w      "%-16x %-5d %-16.16s %-2s %-39s %-5s %-39s %-5d %-11s -> %-11s %.3f"
#   -s      "%x,%d,%s,%s,%s,%s,%s,%d,%s,%s,%.3f"
# headers: the same with %s for every column.

# bcc prints an unknown state number as str(n); precompute all 256 × 256
# "OLDSTATE    -> NEWSTATE    " (text) pairs, so a row costs one % operation.
_STATE = [STATE_NAMES.get(i) or str(i) for i in range(256)]
_PAIRS_TEXT = [["%-11s -> %-11s" % (o, n) for n in _STATE[:16]] for o in _STATE[:16]]
_PAIRS_CSV = [["%s,%s" % (o, n) for n in _STATE[:16]] for o in _STATE[:16]]
# The rows: the state pair is one %s; `%s` after C-COMM (text) or at the end
# (CSV) holds the owner columns.
_ROW_DEFAULT = "%-16x %-5d %-10.10s %s%s%-15s %-5d %-15s %-5d %s %.3f"
_ROW_WIDE = "%-16x %-5d %-16.16s %s%-2s %-39s %-5s %-39s %-5d %s %.3f"
_ROW_CSV = "%x,%d,%s,%s,%s,%s,%s,%s,%s,%.3f%s"
_HEADER_DEFAULT = "%-16s %-5s %-10.10s %s%s%-15s %-5s %-15s %-5s %s %s"
_HEADER_WIDE = "%-16s %-5s %-16.16s %s%-2s %-39s %-5s %-39s %-5s %s %s"
_HEADER_CSV = "%s,%s,%s,%s,%s,%s,%s,%s,%s,%s%s"
_OWNER_DEFAULT = "%-7s %-10.10s %-20.20s "
OWNER_MEMO_LIMIT = 4096
_MEMO_TYPES = frozenset((str, int, type(None)))
_OWNER_WIDE = "%-7s %-16.16s %-32.32s "


def workload(extra: dict[str, Any]) -> str:
    """The owner's workload for the WORKLOAD column (with --owner): the Kubernetes
    `namespace/pod`, else the container's name, else its short id, `-` when the
    owner is known to be in no container, `?` when nothing is known. Values may
    come from a replayed file, so any type is shown as text, never trusted."""
    pod = extra.get("k8s_pod")
    if pod:
        ns = extra.get("k8s_namespace")
        return f"{ns}/{pod}" if ns else str(pod)
    name = extra.get("container_name")
    if name:
        return str(name)
    cid = extra.get("container_id")
    if cid:
        return str(cid)[:12]
    if extra.get("pod_uid"):
        return f"pod-{extra['pod_uid']}"
    return "-" if "cgroup" in extra or "systemd_unit" in extra else "?"


# widths of the cut text columns ([default, -w]): bcc's %-10.10s / %-16.16s C-COMM,
# and the --owner O-COMM and WORKLOAD columns (_OWNER_DEFAULT, _OWNER_WIDE)
COMM_WIDTH = (10, 16)
WORKLOAD_WIDTH = (20, 32)


# one token of escaped text: an escape (escape_text's and escape_name's \\xNN,
# \\uNNNN, \\UNNNNNNNN, a doubled backslash) or one character
_TOKEN = re.compile(r"\\(?:\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})|.", re.S)


def escaped_column(raw: str, width: int) -> str:
    """escape_text(raw) cut to a column of `width` characters between escapes,
    never inside one (bcc's %-10.10s would leave "\\x1b\\x" of "\\x1b\\x1b", or
    half of a doubled backslash: text that reads as something else). `raw` may
    be raw or already escaped (a kernel command name is escaped where it is
    decoded). Text without an escape is returned whole (the row's own %-N.Ns
    cuts it, as bcc's)."""
    text = escape_text(raw)
    if len(text) <= width or "\\" not in text:
        return text
    out, used = [], 0
    for piece in _TOKEN.findall(text):
        if used + len(piece) > width:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)


def csv_field(value: str) -> str:
    """RFC 4180 quoting, only where a value needs it (bcc never quotes).

    Escapes first (`escape_text`), so no value can end a row early."""
    value = escape_text(value)
    if "," in value or '"' in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def _state_text(state: int) -> str:
    """bcc prints an unknown state number as the number itself (the whole number)."""
    return _STATE[state] if 0 <= state < 256 else str(state)


class BccFormatter:
    """Renders events as bcc tcpstates lines for one output.

    `relative_to` state for -t lives here: TIME(s) counts from the first
    event this formatter printed, as bcc counts from its first printed event.
    `wall_ns` converts an event's monotonic time to wall-clock ns for -T.
    """

    def __init__(self, *, csv: bool, wide: bool, time_col: bool, timestamp_col: bool,
                 wall_ns: Callable[[int], int], owner: bool = False) -> None:
        self.csv = csv
        self.wide = wide and not csv    # bcc: -s wins over -w
        self.time_col = time_col
        self.timestamp_col = timestamp_col
        self.wall_ns = wall_ns
        self.first_ts_us: int | None = None
        self.owner = owner
        self._owner_memo: dict[tuple[Any, ...], str] = {}   # owner columns by what they show
        self._row = _ROW_CSV if self.csv else _ROW_WIDE if self.wide else _ROW_DEFAULT
        self._clock_sec = -1
        self._clock_text = ""

    def header(self) -> str:
        pair = "OLDSTATE,NEWSTATE" if self.csv else "%-11s -> %-11s" % ("OLDSTATE", "NEWSTATE")
        if self.csv:
            prefix = ("TIME," if self.time_col else "") + ("TIME(s)," if self.timestamp_col else "")
            return prefix + _HEADER_CSV % ("SKADDR", "C-PID", "C-COMM", "IP", "LADDR", "LPORT", "RADDR",
                                           "RPORT", pair, "MS", ",O-PID,O-COMM,WORKLOAD" if self.owner else "")
        prefix = ("%-8s " % "TIME" if self.time_col else "") + ("%-9s " % "TIME(s)" if self.timestamp_col else "")
        owner = ((_OWNER_WIDE if self.wide else _OWNER_DEFAULT) % ("O-PID", "O-COMM", "WORKLOAD")) if self.owner else ""
        if self.wide:
            return prefix + _HEADER_WIDE % ("SKADDR", "C-PID", "C-COMM", owner, "IP", "LADDR", "LPORT",
                                            "RADDR", "RPORT", pair, "MS")
        return prefix + _HEADER_DEFAULT % ("SKADDR", "C-PID", "C-COMM", owner, "", "LADDR", "LPORT",
                                           "RADDR", "RPORT", pair, "MS")

    def _owner(self, e: Event) -> str:
        """The owner columns of e, memoised by what they are made of (a busy
        server's events share a few owners; the escaping is the cost)."""
        extra = e.extra
        get = extra.get
        values = (get("owner_pid"), get("owner_comm"), get("k8s_pod"), get("k8s_namespace"),
                  get("container_name"), get("container_id"), get("pod_uid"))
        # only what the enrichers make (str, int, None): a replay may hold
        # 1.0, True, -0.0 or tuples, equal as keys but not as texts
        if not _MEMO_TYPES.issuperset(map(type, values)):
            return self._owner_text(e)
        key = (values, "cgroup" in extra or "systemd_unit" in extra)
        text = self._owner_memo.get(key)
        if text is None:
            if len(self._owner_memo) >= OWNER_MEMO_LIMIT:
                self._owner_memo.clear()
            text = self._owner_memo[key] = self._owner_text(e)
        return text

    def _owner_text(self, e: Event) -> str:
        pid, comm = e.extra.get("owner_pid"), e.extra.get("owner_comm")
        pid_text = "?" if pid is None else escape_text(str(pid))
        if self.csv:       # whole values
            comm = "?" if comm is None else escape_text(str(comm))
            work = escape_text(workload(e.extra))
        else:              # the cut columns, cut between escapes
            comm = "?" if comm is None else escaped_column(str(comm), COMM_WIDTH[self.wide])
            work = escaped_column(workload(e.extra), WORKLOAD_WIDTH[self.wide])
        if self.csv:
            return ",%s,%s,%s" % ("" if pid is None else csv_field(pid_text),
                                  csv_field(comm) if pid is not None else "",
                                  csv_field(work) if work != "?" else "")
        return (_OWNER_WIDE if self.wide else _OWNER_DEFAULT) % (pid_text, comm, work)

    def _clock(self, ts_ns: int) -> str:
        sec = self.wall_ns(ts_ns) // 1_000_000_000
        if sec != self._clock_sec:
            self._clock_sec = sec
            self._clock_text = time.strftime("%H:%M:%S", time.localtime(sec))
        return self._clock_text

    def encoded(self, batch: list[Event], use_c: bool = True) -> bytes:
        """The batch's lines as UTF-8 (surrogateescape) bytes, each ending in a
        newline. Default and -w rows without time columns go through the C
        rows when built (byte-identical; an event it cannot render exactly is
        rendered here)."""
        if (use_c and _c_rows is not None and type(self) is BccFormatter and not self.csv
                and not self.time_col and not self.timestamp_col):
            # the owner columns are Python's (escaping, memo), placed by C
            return _c_rows.rows(batch, self.wide, self._one_encoded, self._owner if self.owner else None)
        lines = self.lines(batch)
        if not lines:
            return b""
        lines.append("")
        return "\n".join(lines).encode("utf-8", "surrogateescape")

    def _one_encoded(self, e: Event) -> bytes:
        return self.lines([e])[0].encode("utf-8", "surrogateescape")

    def lines(self, batch: list[Event]) -> list[str]:
        """One bcc line per event (no newline)."""
        row = self._row
        csv = self.csv
        pairs = _PAIRS_CSV if csv else _PAIRS_TEXT
        pair_fmt = "%s,%s" if csv else "%-11s -> %-11s"
        ipcol = self.csv or self.wide
        comm_width = COMM_WIDTH[self.wide]
        owner_of = self._owner if self.owner else None
        out: list[str] = []
        append = out.append
        args: tuple[Any, ...]
        for e in batch:
            span = e.span_ns
            ms = span // 1000 / 1000 if span is not None else 0.0   # bcc: whole µs, then ms
            # every string from outside (kernel comm, replayed names and
            # addresses) is escaped: a name cannot forge a line or a column
            comm, saddr, daddr = e.comm, e.saddr, e.daddr
            if not (comm.isprintable() and "\\" not in comm and saddr.isprintable() and daddr.isprintable()):
                comm = escape_text(comm) if csv else escaped_column(comm, comm_width)
                saddr, daddr = escape_text(saddr), escape_text(daddr)
            if csv and ("," in comm or '"' in comm or "," in saddr or '"' in saddr
                        or "," in daddr or '"' in daddr):
                comm, saddr, daddr = csv_field(comm), csv_field(saddr), csv_field(daddr)
            o, n = e.oldstate, e.newstate
            pair = (pairs[o][n] if 0 <= o < 16 and 0 <= n < 16 else
                    pair_fmt % (_state_text(o), _state_text(n)))
            ip = ("4" if e.family == AF_INET else "6") if ipcol else ""
            owner = owner_of(e) if owner_of else ""
            if csv:
                args = (e.skaddr, e.pid, comm, ip, saddr, e.sport, daddr, e.dport, pair, ms, owner)
            else:
                args = (e.skaddr, e.pid, comm, owner, ip, saddr, e.sport, daddr, e.dport, pair, ms)
            append(row % args)
        if self.time_col or self.timestamp_col:
            out = [self._prefix(e) + line for e, line in zip(batch, out)]
        return out

    def _prefix(self, e: Event) -> str:
        prefix = ""
        if self.time_col:
            prefix = (self._clock(e.ts_ns) + ",") if self.csv else ("%-8s " % self._clock(e.ts_ns))
        if self.timestamp_col:
            ts_us = e.ts_ns // 1000
            if self.first_ts_us is None:
                self.first_ts_us = ts_us
            delta = (ts_us - self.first_ts_us) / 1000000
            prefix += ("%.6f," % delta) if self.csv else ("%-9.6f " % delta)
        return prefix
