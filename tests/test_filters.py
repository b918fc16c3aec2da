"""Every built-in filter on replayed events and on real kernel events, and the
automatic push-down of port and family conditions into the kernel."""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path

import orjson
import pytest
from tracer import run_cli
from traffic import by_socket, free_port, parse_csv, refused, session, transitions

from tcpstates.testing import make_event, run_pipeline

ROOT = Path(__file__).resolve().parent.parent

EVENTS = [
    make_event(sport=0, dport=80, oldstate="CLOSE", newstate="SYN_SENT", pid=10, comm="curl"),
    make_event(sport=41000, dport=80, oldstate="SYN_SENT", newstate="ESTABLISHED", span_ns=150_000_000,
               pid=0, comm="swapper/0"),
    make_event(sport=41001, dport=81, oldstate="SYN_SENT", newstate="CLOSE", span_ns=40_000, pid=11,
               comm="wget"),
    make_event(family=10, saddr="2001:db8::5", daddr="2001:db8:1::9", sport=8443, dport=50000,
               oldstate="LISTEN", newstate="SYN_RECV", pid=12, comm="nginx: worker"),
    make_event(family=10, saddr="::ffff:10.1.2.3", daddr="::ffff:192.168.7.7", sport=8080, dport=50001,
               oldstate="ESTABLISHED", newstate="CLOSE_WAIT", span_ns=2_000_000_000, pid=13, comm="java"),
]


def _kept(config: str) -> list[int]:
    return [EVENTS.index(e) for e in run_pipeline(config, EVENTS, entry_points=False).events]


@pytest.mark.parametrize("config,kept", [
    ('use="state"\ntransitions=["SYN_SENT->CLOSE"]', [2]),
    ('use="state"\ntransitions=["SYN_SENT→CLOSE"]', [2]),
    ('use="state"\nold=["SYN_SENT"]', [1, 2]),
    ('use="state"\nnew=["close_wait", "SYN_RECV"]', [3, 4]),
    ('use="state"\nold=["SYN_SENT"]\nexclude=true', [0, 3, 4]),
    ('use="duration"\nmin_ms=100.0', [1, 4]),
    ('use="duration"\nmin_ms=100.0\nmax_ms=1000.0', [1]),
    ('use="duration"\nstates=["SYN_SENT"]\nmin_ms=100.0', [0, 1, 3, 4]),
    ('use="duration"\nmin_ms=0.0\nunknown="keep"', [0, 1, 2, 3, 4]),
    ('use="duration"\nmin_ms=0.0', [1, 2, 4]),
    ('use="process"\npid=[10, 12]', [0, 3]),
    ('use="process"\ncomm=["w*", "java"]', [2, 4]),
    ('use="process"\ncomm=["swapper/*"]\nexclude=true', [0, 2, 3, 4]),
    ('use="address"\nlocal=["2001:db8::/32"]', [3]),
    ('use="address"\nremote=["192.168.0.0/16"]', [4]),       # IPv4-mapped matches IPv4 nets
    ('use="address"\nlocal=["127.0.0.0/8", "10.0.0.0/8"]', [0, 1, 2, 4]),
    ('use="ports"\nlocal=["8000-8999"]', [3, 4]),
    ('use="ports"\nremote=[80]', [0, 1]),
    ('use="ports"\nlocal=["41000-41001"]\nremote=["81-90"]', [2]),
    ('use="family"\nfamily="ipv6"', [3, 4]),
])
def test_filter_on_replayed_events(config, kept):
    assert _kept("[[chain]]\n" + config + "\n") == kept


def test_filters_chain_in_order():
    assert _kept('[[chain]]\nuse="family"\nfamily="ipv4"\n[[chain]]\nuse="state"\nnew=["CLOSE"]\n') == [2]


def test_filters_through_the_real_cli_replay(tmp_path):
    from tcpstates.records import Rfc3339, event_record
    fmt = Rfc3339()
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(event_record(e, i + 1, e.ts_ns, "h", fmt)) + b"\n"
                               for i, e in enumerate(EVENTS)))
    r = run_cli("--replay", str(trace), "-s", "--no-summary", "-o",
                'chain=[{use="duration", states=["SYN_SENT"], min_ms=100.0}, {use="state", old=["SYN_SENT"]}]')
    assert r.returncode == 0, r.stderr
    rows = parse_csv(r.stdout.decode())
    assert [(x["OLDSTATE"], x["NEWSTATE"], x["MS"]) for x in rows] == [("SYN_SENT", "ESTABLISHED", "150.000")]


def test_duration_bounds_equal_to_a_span_keep_it_through_the_real_cli_replay(tmp_path):
    """min_ms/max_ms are inclusive, also for values like 2.01 or 1.001 whose
    float times 10^6 lies just below the whole ns (2009999.9999999998): an
    event of exactly 2.010 ms passes max_ms = 2.01, one of 1.000 ms fails
    min_ms = 1.001."""
    from tcpstates.records import Rfc3339, event_record
    fmt = Rfc3339()
    trace = tmp_path / "t.jsonl"
    spans_us = [1000, 1001, 2009, 2010, 2011]
    events = [make_event(oldstate="SYN_SENT", newstate="ESTABLISHED", span_ns=us * 1000, sport=41000 + i)
              for i, us in enumerate(spans_us)]
    trace.write_bytes(b"".join(orjson.dumps(event_record(e, i + 1, e.ts_ns, "h", fmt)) + b"\n"
                               for i, e in enumerate(events)))
    r = run_cli("--replay", str(trace), "-s", "--no-summary", "-o",
                'chain=[{use="duration", min_ms=1.001, max_ms=2.01}]')
    assert r.returncode == 0, r.stderr
    assert [x["MS"] for x in parse_csv(r.stdout.decode())] == ["1.001", "2.009", "2.010"]


def test_repository_config_is_valid_including_its_commented_examples(tmp_path):
    text = (ROOT / "tcpstates.toml").read_text()
    tomllib.loads(text)
    # the commented [[chain]] examples must be valid too: uncomment and load
    uncommented = re.sub(r"^# (\[\[chain\]\]|[a-z_]+ = .*)$", r"\1", text, flags=re.M)
    assert uncommented.count("[[chain]]") > text.count("\n[[chain]]")
    cfg = tmp_path / "tcpstates.toml"
    cfg.write_text(uncommented.replace("/var/log/tcpstates/events.jsonl", str(tmp_path / "e.jsonl")))
    r = run_cli("--config", str(cfg), "--replay", "/dev/null", "--no-summary")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"SKADDR ")


@pytest.mark.kernel
def test_every_filter_on_real_kernel_events(tracer):
    port, other = free_port(), free_port()
    chain = ('chain=[{use="ports", remote=[%d, %d]}, {use="state", transitions=["SYN_SENT->CLOSE"]},'
             ' {use="address", remote=["127.0.0.0/8"]}, {use="process", comm=["no-such-*"], exclude=true},'
             ' {use="duration", min_ms=0.0}, {use="family", family="ipv4"}]') % (port, other)
    t = tracer("-s", "-o", chain)
    refused(port)
    refused(other)
    session(socket.AF_INET, port, hold=0.01, server_delay=0.0)   # no failed connect in here
    refused(port, socket.AF_INET6)                                 # family filter drops it
    rc, out, err = t.stop()
    assert rc == 0, err
    rows = parse_csv(out)
    assert sorted(int(r["RPORT"]) for r in rows) == sorted([port, other])
    assert all((r["OLDSTATE"], r["NEWSTATE"], r["IP"]) == ("SYN_SENT", "CLOSE", "4") for r in rows)


@pytest.mark.kernel
def test_port_and_family_conditions_are_pushed_into_the_kernel(tracer):
    port = free_port()
    t = tracer("-s", "-o", f'chain=[{{use="ports", local=["{port}-{port}"]}}, {{use="family", family="ipv4"}}]')
    session(socket.AF_INET, port, hold=0.01, server_delay=0.0)
    session(socket.AF_INET, free_port(), hold=0.01, server_delay=0.0)
    session(socket.AF_INET6, free_port(socket.AF_INET6), hold=0.01, server_delay=0.0)
    rc, out, err = t.stop()
    lives = by_socket(parse_csv(out), {port})
    assert sorted(transitions(l)[1] for l in lives) == ["LISTEN", "SYN_RECV"]
    # the other sessions never reached user space: seen == kept, nothing filtered there
    m = re.search(r"(\d+) events seen, (\d+) kept", err)
    assert m and m.group(1) == m.group(2) == str(len(parse_csv(out)))


def test_the_documented_example_config_does_not_change_the_output(tmp_path):
    """tcpstates.toml as shipped (its active parts) prints exactly what no config
    prints: a connect's first event (CLOSE->SYN_SENT, local port 0) included."""
    recs = []
    for i, (old, new, lport) in enumerate([("CLOSE", "SYN_SENT", 0), ("SYN_SENT", "ESTABLISHED", 40000),
                                           ("ESTABLISHED", "FIN_WAIT1", 40000), ("FIN_WAIT2", "CLOSE", 40000)]):
        recs.append({"type": "state_change", "v": 1, "seq": i + 1, "time": "2026-11-27T08:00:00.000000000Z",
                     "time_ns": 1795766400 * 10**9 + i, "mono_ns": 10**9 + i, "host": "h", "skaddr": "ffff1",
                     "family": "ipv4", "laddr": "127.0.0.1", "lport": lport, "raddr": "127.0.0.1",
                     "rport": 80, "oldstate": old, "newstate": new, "span_us": 5, "pid": 1, "tid": 1,
                     "comm": "curl", "cgroup_id": 0})
    rec_file = tmp_path / "r.jsonl"
    rec_file.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with_example = run_cli("--config", str(ROOT / "tcpstates.toml"), "--replay", str(rec_file), "--no-summary")
    without = run_cli("--config", str(empty), "--replay", str(rec_file), "--no-summary")
    assert with_example.returncode == 0 and without.returncode == 0, with_example.stderr
    assert with_example.stdout == without.stdout
    assert with_example.stdout.count(b"\n") == 1 + len(recs)


def test_a_name_with_a_backslash_is_matched_as_it_is_shown():
    # names are escaped once where they enter (escape_name): a backslash is
    # doubled, a newline is \x0a; a pattern matches that form, and one with a
    # lone backslash is refused (tests/test_bad_input_table.py)
    from tcpstates.text import escape_name
    events = [make_event(pid=20, comm=escape_name("a\\b")), make_event(pid=21, comm=escape_name("a\nb")),
              make_event(pid=22, comm="ab")]
    assert [e.comm for e in events[:2]] == ["a\\\\b", "a\\x0ab"]

    def kept(patterns: str) -> list[int]:
        config = f'[[chain]]\nuse="process"\ncomm=[{patterns}]\n'
        return [e.pid for e in run_pipeline(config, events, entry_points=False).events]
    assert kept(r"'a\\b'") == [20]
    assert kept(r"'a\x0ab'") == [21]
    assert kept(r"'a\*'") == [20, 21]          # a glob after the backslash stands for the escape
    assert kept("'a*b'") == [20, 21, 22]


@pytest.mark.parametrize("pattern,refused", [
    ("a\\b", True), ("trailing\\", True), ("a\\b*", True), ("a\\xZZ", True),
    ("unit-by\\x2duuid*", True),          # a printable character is never escaped: write \\x2d
    ("a\\u0041", True), ("x\\x0", True),
    ("a\\\\b", False), ("a\\x0ab", False), ("a\\u0085", False), ("a\\xff", False),
    ("*\\b", False), ("*\\", False), ("a?\\b", False), ("[\\][\\]", False), ("a\\*", False), ("x\\x0*", False),
])
def test_a_pattern_is_refused_exactly_when_no_escaped_name_can_match_it(pattern, refused):
    from tcpstates.text import lone_backslash
    assert lone_backslash(pattern) is refused


def test_no_refused_pattern_matches_any_escaped_name():
    # every pattern of up to 5 characters over an alphabet of glob characters,
    # backslashes and escape letters, against every name of up to 3 characters
    # (backslash, newline, C1, plain) as escape_name shows it
    import fnmatch
    import itertools

    from tcpstates.text import escape_name, lone_backslash
    shown = [escape_name("".join(p)) for n in range(4) for p in itertools.product("a\\\n\x85x0", repeat=n)]
    refused = 0
    for n in range(1, 6):
        for chars in itertools.product("a\\*?x0u", repeat=n):
            pattern = "".join(chars)
            if lone_backslash(pattern):
                refused += 1
                assert not any(fnmatch.fnmatchcase(s, pattern) for s in shown), pattern
    assert refused > 1000        # the alphabet does produce refusals
