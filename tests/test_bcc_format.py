"""bcc compatibility of the text and CSV sinks, byte for byte.

Fixture rows (real bcc output) are turned into records, replayed through the
real CLI with the fixture's flags, and must come out identical. The filter
fixtures (-L, -D, -4, -6) are replayed with foreign records between their rows
that the flag must drop, so they pass only if the flag filters replayed events.
Headers are checked for every combination of -T -t -w -s.
"""

from __future__ import annotations

import itertools
import os

import orjson
import pytest
from bccfixtures import MODES, replay_records
from tracer import run_cli

from tcpstates.plugins.bcc_table.format import BccFormatter
from tcpstates.events import Event

UTC = {"TZ": "UTC"}


@pytest.mark.parametrize("name", sorted(MODES))
def test_replayed_fixture_is_reproduced_byte_for_byte(name, fixtures_dir, tmp_path):
    path = fixtures_dir / "bcc" / name
    _header, records, _foreign = replay_records(path, MODES[name])
    trace = tmp_path / "trace.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    result = run_cli("--replay", str(trace), "--no-summary", *MODES[name], env=UTC)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert result.stdout.decode() == path.read_text()


FILTER_FLAGS = ("-L", "-D", "-4", "-6")


@pytest.mark.parametrize("name", sorted(n for n, f in MODES.items() if set(f) & set(FILTER_FLAGS)))
def test_filter_fixture_is_not_reproduced_without_its_flag(name, fixtures_dir, tmp_path):
    # the byte-for-byte test above proves the filter only if the foreign
    # records would show without it: replay the same trace minus the flag
    path = fixtures_dir / "bcc" / name
    flags = MODES[name]
    _header, records, foreign = replay_records(path, flags)
    assert foreign >= len(path.read_text().splitlines()) - 1
    trace = tmp_path / "trace.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    assert flags[0] in FILTER_FLAGS and len(flags) == (2 if flags[0] in ("-L", "-D") else 1)
    result = run_cli("--replay", str(trace), "--no-summary", env=UTC)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(path.read_text().splitlines()) + foreign


def _expected_header(csv: bool, wide: bool, time_col: bool, ts_col: bool, fixtures_dir) -> str:
    base = "csv.txt" if csv else "wide.txt" if wide else "default.txt"
    line = (fixtures_dir / "bcc" / base).read_text().splitlines()[0]
    prefix = ""
    if csv:
        prefix = ("TIME," if time_col else "") + ("TIME(s)," if ts_col else "")
    else:
        prefix = ("TIME     " if time_col else "") + ("TIME(s)   " if ts_col else "")
    return prefix + line


@pytest.mark.parametrize("flags", ["".join(c) for n in range(5) for c in itertools.combinations("Ttws", n)])
def test_header_for_every_flag_combination(flags, fixtures_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    args = ["--replay", str(empty), "--no-summary"] + ([f"-{flags}"] if flags else [])
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    expected = _expected_header("s" in flags, "w" in flags, "T" in flags, "t" in flags, fixtures_dir)
    assert result.stdout.decode() == expected + "\n"
    assert not expected.endswith(" ")


def test_fixture_headers_agree_with_the_composition_rule(fixtures_dir):
    # the rule used above, checked against every fixture that has prefixes
    for name, (csv, wide, t_col, ts_col) in {"csv_tT.txt": (1, 0, 1, 1), "wide_tT.txt": (0, 1, 1, 1),
                                             "time.txt": (0, 0, 1, 0), "timestamp.txt": (0, 0, 0, 1)}.items():
        got = (fixtures_dir / "bcc" / name).read_text().splitlines()[0]
        assert got == _expected_header(bool(csv), bool(wide), bool(t_col), bool(ts_col), fixtures_dir)


def _event(**kw) -> Event:
    base = dict(ts_ns=10**12, skaddr=0xffff888102df3780, span_ns=None, pid=1, tid=1, comm="x",
                family=2, saddr="127.0.0.1", sport=80, daddr="127.0.0.1", dport=5555,
                oldstate=1, newstate=4)
    base.update(kw)
    return Event(**base)


def _fmt(**kw) -> BccFormatter:
    opts = dict(csv=False, wide=False, time_col=False, timestamp_col=False, wall_ns=lambda t: t)
    opts.update(kw)
    return BccFormatter(**opts)


def test_comm_truncated_to_10_by_default_and_16_when_wide_but_not_in_csv():
    e = _event(comm="ksoftirqd/0-long-name")
    assert " ksoftirqd/ " in _fmt().lines([e])[0]
    assert " ksoftirqd/0-long-" not in _fmt(wide=True).lines([e])[0]
    assert " ksoftirqd/0-long " in _fmt(wide=True).lines([e])[0]
    assert ",ksoftirqd/0-long-name," in _fmt(csv=True).lines([e])[0]


def test_wide_address_columns_are_39_and_long_addresses_push_right():
    addr = "2001:db8:1234:5678:9abc:def0:1234:5678"
    line = _fmt(wide=True).lines([_event(family=10, saddr=addr, daddr="::1")])[0]
    assert f" 6  {addr} " in line
    start = line.index(addr)
    assert line.index(" 80 ", start) + 1 - start == 40
    narrow = _fmt().lines([_event(family=10, saddr=addr)])[0]
    assert f" {addr} 80 " in narrow   # default width 15 is a minimum: the row shifts


def test_ms_is_microsecond_resolution_and_unknown_prints_zero():
    assert _fmt().lines([_event(span_ns=100_321_999)])[0].endswith(" 100.321")
    assert _fmt().lines([_event(span_ns=None)])[0].endswith(" 0.000")


def test_unknown_state_number_prints_as_number_like_bcc():
    line = _fmt().lines([_event(oldstate=13, newstate=7)])[0]
    assert "13          -> CLOSE" in line


def test_csv_quotes_only_values_that_need_it():
    line = _fmt(csv=True).lines([_event(comm='a,b"c')])[0]
    assert ',"a,b""c",' in line
    assert _fmt(csv=True).lines([_event(comm="plain")])[0].count('"') == 0


def test_timestamp_counts_from_first_printed_event():
    f = _fmt(timestamp_col=True)
    first = f.lines([_event(ts_ns=7_000_123_456)])
    later = f.lines([_event(ts_ns=7_250_500_999)])
    assert first[0].startswith("0.000000  ")
    assert later[0].startswith("0.250377  ")


def test_time_column_is_local_wall_clock_of_the_event():
    os.environ["TZ"] = "UTC"
    import time
    time.tzset()
    f = _fmt(time_col=True, wall_ns=lambda ts: ts + 3600 * 10**9 * 5 + 61 * 10**9)
    assert f.lines([_event(ts_ns=0)])[0].startswith("05:01:01 ")
