"""Reads bcc's captured outputs (tests/fixtures/bcc) back into JSON Lines records.

Each fixture row becomes a record carrying exactly what bcc printed, with
times chosen so that TIME (HH:MM:SS, in UTC) and TIME(s) come out as in the
fixture. Replaying those records through our CLI with the same flags must
then reproduce the fixture byte for byte.

The filter fixtures (-L, -D, -4, -6) hold only rows that passed bcc's filter,
so replaying them alone would pass with the flag ignored. `replay_records`
therefore puts foreign records between their rows, each a copy of a
neighbouring row that the flag must drop (another local or remote port, the
other address family); the output equals the fixture only if the flag
really filters.
"""

from __future__ import annotations

from pathlib import Path

DAY_NS = 1_795_737_600 * 10**9      # some midnight UTC (2026-11-27)
MONO_BASE_NS = 5_000 * 10**9


def parse_row(line: str, csv: bool, time_col: bool, ts_col: bool, wide: bool) -> dict:
    fields = line.split(",") if csv else line.split()
    clock = fields.pop(0) if time_col else None
    delta = fields.pop(0) if ts_col else None
    if csv:
        sk, pid, comm, ip, laddr, lport, raddr, rport, old, new, ms = fields
    elif wide:
        sk, pid, comm, ip, laddr, lport, raddr, rport, old, _arrow, new, ms = fields
    else:
        sk, pid, comm, laddr, lport, raddr, rport, old, _arrow, new, ms = fields
        ip = "6" if ":" in laddr else "4"
    h, m, s = (int(x) for x in clock.split(":")) if clock else (0, 0, 0)
    delta_us = round(float(delta) * 1e6) if delta else 0
    span_us = round(float(ms) * 1000)
    return {
        "type": "state_change", "v": 1, "seq": 0,
        "_clock_s": (h * 60 + m) * 60 + s,
        "mono_ns": MONO_BASE_NS + delta_us * 1000,
        "host": "fixture", "skaddr": sk, "family": "ipv4" if ip == "4" else "ipv6",
        "laddr": laddr, "lport": int(lport), "raddr": raddr, "rport": int(rport),
        "oldstate": old, "newstate": new,
        # bcc prints 0.000 for "unknown"; keep some unknown to prove it renders so
        "span_us": None if span_us == 0 and old in ("CLOSE", "LISTEN") else span_us,
        "pid": int(pid), "tid": int(pid), "comm": comm, "cgroup_id": 0,
    }


MODES = {
    "default.txt": [], "wide.txt": ["-w"], "csv.txt": ["-s"], "time.txt": ["-T"],
    "timestamp.txt": ["-t"], "csv_tT.txt": ["-stT"], "wide_tT.txt": ["-wtT"],
    # the flags these were captured with (bcc-fixtures/README.md)
    "lport.txt": ["-L", "18080"], "dport.txt": ["-D", "18080"],
    "ipv4.txt": ["-4"], "ipv6.txt": ["-6"],
}

# flags that take a value: their value is not format letters
_VALUED = ("-L", "-D")


def format_letters(flags: list[str]) -> str:
    """The format letters (s, w, T, t) among `flags`, values of -L/-D left out."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in _VALUED:
            skip = True
        elif f.startswith("-"):
            out.append(f.lstrip("-"))
    return "".join(out)


def _v6(addr: str) -> str:
    return {"0.0.0.0": "::"}.get(addr, "::ffff:" + addr)


def _v4(addr: str) -> str:
    return {"::": "0.0.0.0", "::1": "127.0.0.1"}.get(addr, "127.0.0.2")


def _foreign(r: dict, flags: list[str], n: int) -> list[dict]:
    """Copies of row `r` that `flags` must drop: near misses of the filter."""
    def copy(**changes: object) -> dict:
        out = {**r, "skaddr": f"ffff88810f{n:04x}{len(variants):02x}", **changes}
        variants.append(out)
        return out
    variants: list[dict] = []
    other = "ipv6" if r["family"] == "ipv4" else "ipv4"
    move = _v6 if other == "ipv6" else _v4
    if "-L" in flags:
        port = int(flags[flags.index("-L") + 1])
        # the same connection seen from the other end: the wanted port is remote
        copy(lport=r["rport"], rport=port)
        copy(lport=port + 1)
        copy(lport=port + 1, family=other, laddr=move(r["laddr"]), raddr=move(r["raddr"]))
    if "-D" in flags:
        port = int(flags[flags.index("-D") + 1])
        copy(lport=port, rport=r["lport"])
        copy(rport=port + 9)
        copy(rport=0)
        copy(rport=port + 1, family=other, laddr=move(r["laddr"]), raddr=move(r["raddr"]))
    if "-4" in flags or "-6" in flags:
        # same ports, the other family; -4 also drops IPv4-mapped IPv6 sockets
        copy(family=other, laddr=move(r["laddr"]), raddr=move(r["raddr"]))
    return variants


def replay_records(path: Path, flags: list[str]) -> tuple[str, list[dict], int]:
    """The fixture's records with foreign records after each row (none for a
    mode without a filter flag), and how many foreign records there are."""
    header, records = fixture_records(path, flags)
    out: list[dict] = []
    foreign = 0
    for n, r in enumerate(records):
        out.append(r)
        extra = _foreign(r, flags, n)
        foreign += len(extra)
        out.extend(extra)
    return header, out, foreign


def fixture_records(path: Path, flags: list[str]) -> tuple[str, list[dict]]:
    letters = format_letters(flags)
    lines = path.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    records = [parse_row(l, "s" in letters, "T" in letters, "t" in letters, "w" in letters)
               for l in rows]
    # One constant mono→wall offset (as in a real run) chosen so every row's
    # wall second equals the fixture's TIME column: frac must satisfy
    # floor(frac + delta_i) == clock_i - clock_0 for all rows.
    if "t" not in letters:   # no TIME(s) column: any times consistent with TIME will do
        for i, r in enumerate(records):
            r["mono_ns"] = MONO_BASE_NS + (r["_clock_s"] - records[0]["_clock_s"]) * 10**9 + i * 1000
    c0 = records[0]["_clock_s"]
    d0 = records[0]["mono_ns"]
    lo, hi = 0, 10**9
    for r in records:
        delta = r["mono_ns"] - d0
        ticks = (r["_clock_s"] - c0) * 10**9
        lo = max(lo, ticks - delta)
        hi = min(hi, ticks + 10**9 - delta)
    assert lo < hi, "fixture clock columns inconsistent with its timestamps"
    for r in records:
        r["time_ns"] = DAY_NS + c0 * 10**9 + lo + (r["mono_ns"] - d0)
        del r["_clock_s"]
    return header, records
