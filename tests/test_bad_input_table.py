"""Every option of every built-in stage, fed values of the wrong type, out of
range, empty and unknown — through the real CLI config path; and hostile
replay input. One line, exit status 2 (or counted skips), never a traceback."""

from __future__ import annotations

import os
import typing

import orjson
import pytest
from tracer import run_cli

from tcpstates.api import Warner
from tcpstates.options import option_fields
from tcpstates.registry import make_plugin_manager

REGISTRY = make_plugin_manager(entry_points=False, warner=Warner())


def _wrong_values(tp) -> list:
    """Values that can never be valid for a field of type `tp`."""
    text = str(tp)
    if tp is bool:
        return ["yes", 1, [True]]
    if tp is int:
        return ["12", 1.5, True, [1]]
    if tp is float:
        return ["fast", True, [1.0]]
    if tp is str:
        return [5, True, ["a"], {"a": 1}]
    if "list" in text:
        return ["notalist", 5, {"a": 1}, [{"nested": "table"}]]
    if "float" in text and "None" in text:
        return ["x", [1]]
    return [object()]


def _cases():
    for info in REGISTRY.all():
        if info.kind == "source" and info.name != "kernel" and info.name != "replay":
            continue
        hints = typing.get_type_hints(info.cls.Options)
        for f in option_fields(info.cls.Options):
            for value in _wrong_values(hints[f.name]):
                yield info.kind, info.name, f.name, value


def _toml(kind: str, name: str, key: str, value) -> tuple[str, str]:
    literal = orjson.dumps(value).decode().replace(":", "=") if not isinstance(value, dict) else "{a = 1}"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        literal = "[{nested = \"table\"}]"
    if kind == "sink":
        return f"[sinks.{name}]\n{key} = {literal}\n", f"sinks.{name}.{key}"
    if kind == "source":
        return f"[sources.{name}]\n{key} = {literal}\n", f"sources.{name}.{key}"
    return f'[[chain]]\nuse = "{name}"\n{key} = {literal}\n', f"chain[0].{key}"


CASES = list(_cases())


@pytest.mark.parametrize("kind,name,key,value", CASES,
                         ids=[f"{k}:{n}.{o}={v!r}"[:60] for k, n, o, v in CASES])
def test_every_option_rejects_wrong_types(tmp_path, kind, name, key, value):
    text, where = _toml(kind, name, key, value)
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    r = run_cli("--config", str(cfg), "--replay", os.devnull)
    err = r.stderr.decode()
    assert r.returncode == 2, (text, err)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tcpstates: error: {where}"), (where, err)


OUT_OF_RANGE = [
    ("[sources.kernel]\nbuffer_pages = 0\n", "buffer_pages"),
    ("[sources.kernel]\nbuffer_pages = 1048576\n", "buffer_pages"),
    ("[sources.kernel]\npoll_ms = 0\n", "poll_ms"),
    ("[sources.kernel]\nbuffer = \"huge\"\n", "buffer"),
    ("[sources.replay]\nmax_line_bytes = 1\n", "max_line_bytes"),
    ("[sinks.jsonl]\nmax_bytes = -1\n", "max_bytes"),
    ("[sinks.jsonl]\nkeep = 0\n", "keep"),
    ("[sinks.jsonl]\npath = \"\"\n", "path: empty"),
    ("[sinks.text]\npath = \"\"\n", "path: empty"),
    ("[sinks.forward]\naddress = \"nohost\"\n", "address"),
    ("[sinks.forward]\nmode = \"fast\"\n", "mode"),
    ("[sinks.forward]\nchunk_events = 0\n", "chunk_events"),
    ("[sinks.forward]\nbuffer_events = 5\n", "buffer_events"),
    ("[sinks.forward]\nack_timeout = 0.0\n", "ack_timeout"),
    ("[sinks.journal]\nidentifier = \"\"\n", "identifier"),
    ("[[chain]]\nuse = \"duration\"\nmin_ms = -1.0\n", "min_ms"),
    ("[[chain]]\nuse = \"duration\"\nmin_ms = 10.0\nmax_ms = 5.0\n", "max_ms"),
    ("[[chain]]\nuse = \"duration\"\nunknown = \"maybe\"\n", "unknown"),
    ("[[chain]]\nuse = \"ports\"\nlocal = [0]\n", "chain[0].local[0]: expected at least 1, got 0"),
    ("[[chain]]\nuse = \"ports\"\nremote = [80, 65536]\n", "chain[0].remote[1]: expected at most 65535"),
    ("[[chain]]\nuse = \"ports\"\nremote = [\"0-80\"]\n", "out of range"),
    ("[[chain]]\nuse = \"ports\"\nremote = [\"\"]\n", "empty entry"),
    ("[[chain]]\nuse = \"family\"\nfamily = \"ipx\"\n", "family"),
    ("[[chain]]\nuse = \"state\"\nold = [\"SLEEPING\"]\n", "unknown TCP state"),
    ("[[chain]]\nuse = \"process\"\n", "give pid or comm"),
    ("[[chain]]\nuse = \"process\"\npid = [1]\nfield = \"other\"\n", "field"),
    # names are matched as shown, a backslash doubled: a lone one can never match
    ("[[chain]]\nuse = \"process\"\ncomm = ['ok', 'a\\b*']\n",
     "comm: the pattern a\\b* can never match: names are matched as shown, with a backslash "
     "doubled and a control byte as \\xNN; write a\\\\b* for a backslash"),
    ("[[chain]]\nuse = \"process\"\ncomm = ['trailing\\']\n", "the pattern trailing\\ can never match"),
    ("[[chain]]\nuse = \"workload\"\npod = ['web-*']\nimage = ['C:\\img']\n",
     "image: the pattern C:\\img can never match"),
    ("[[chain]]\nuse = \"address\"\n", "give local or remote"),
    ("[[chain]]\nuse = \"workload\"\n", "give container_id"),
    ("[[chain]]\nuse = \"workload\"\ncontainer_id = [\"\"]\n", "empty prefix"),
    ("[[chain]]\nuse = \"owner\"\nmax_sockets = 1\n", "max_sockets"),
    ("[[chain]]\nuse = \"family\"\nfamily = \"ipv4\"\n[[chain]]\nuse = \"family\"\nfamily = \"ipv6\"\n", None),
    ("[tcpstates]\nowner = \"sometimes\"\n", "owner"),
    ("[tcpstates]\nsource = \"nosuch\"\n", "unknown source"),
    ("[tcpstates]\nsinks = [\"text\", \"text\"]\n", "given twice"),
    ("[sinks.a]\ntype = \"jsonl\"\ntype2 = 1\n", "sinks.a.type2: unknown option"),
    # digits of other scripts: str.isdigit() takes them and int() reads them (9464)
    ("[tcpstates]\nsinks = [\"metrics\"]\n[sinks.metrics]\nlisten = \"127.0.0.1:\u0669\u0664\u0666\u0664\"\n",
     "listen: expected HOST:PORT"),
    # more digits than int() converts (4,300): its ValueError told the user to call
    # sys.set_int_max_str_digits()
    ("[tcpstates]\nsinks = [\"metrics\"]\n[sinks.metrics]\nlisten = \"127.0.0.1:" + "9" * 5000 + "\"\n",
     "listen: expected HOST:PORT"),
    ("[tcpstates]\nsinks = [\"forward\"]\n[sinks.forward]\naddress = \"127.0.0.1:" + "9" * 5000 + "\"\n",
     "address: expected HOST:PORT"),
]


@pytest.mark.parametrize("text,needle", OUT_OF_RANGE, ids=[t.replace("\n", " ")[:50] for t, _ in OUT_OF_RANGE])
def test_out_of_range_empty_conflicting_values(tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    sink = [] if "sinks = " in text else ["--sink", "text"]
    r = run_cli("--config", str(cfg), "--replay", os.devnull, *sink)
    if needle is None:
        # conflicting but harmless combinations must still not crash
        assert r.returncode in (0, 2) and b"Traceback" not in r.stderr
        return
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err


def _good(**kw) -> bytes:
    rec = {"type": "state_change", "v": 1, "seq": 1, "time": "t", "time_ns": 1795766400 * 10**9,
           "mono_ns": 10**9, "host": "h", "skaddr": "ff", "family": "ipv4", "laddr": "10.0.0.1",
           "lport": 1, "raddr": "10.0.0.2", "rport": 2, "oldstate": "LISTEN", "newstate": "CLOSE",
           "span_us": 5, "pid": 1, "tid": 1, "comm": "x", "cgroup_id": 0}
    rec.update(kw)
    return orjson.dumps(rec)


HOSTILE = [
    b'{"type":"state_change","v":1,"seq":1,"time_n',            # truncated line
    b"\xff\xfe not utf-8 at all \xc3\x28",                       # invalid UTF-8
    b"[1, 2, 3]",                                                # not an object
    _good(lport="80"),                                           # wrong types
    _good(lport=70000),
    _good(family="ipx"),
    _good(oldstate="SLEEPING"),
    _good(span_us=-1),
    _good(skaddr="xyz"),
    _good(pid=None),
    b"x" * (2 << 20),                                            # a huge line (2 MiB)
]


def test_hostile_replay_input_is_skipped_counted_and_reported(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b"\n".join([_good(seq=1)] + HOSTILE + [_good(seq=2), b""]))
    r = run_cli("--replay", str(trace), "-s")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    assert len(r.stdout.splitlines()) == 3            # header + the two good records
    assert f"{len(HOSTILE)} unreadable records skipped" in err.splitlines()[-1]
    reported = [l for l in err.splitlines() if "skipped record" in l]
    assert len(reported) == 5 and reported[0].startswith(f"tcpstates: {trace}:2: skipped record: not valid JSON")
    assert any(":13: skipped record: line longer than" in l for l in err.splitlines()) or len(reported) == 5


def test_hostile_replay_with_strict_stops_at_the_first_bad_record(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(_good() + b"\n" + HOSTILE[3] + b"\n" + _good() + b"\n")
    r = run_cli("--replay", str(trace), "-s", "--strict")
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and ":2: skipped record: field 'lport'" in err
    assert r.stdout.decode().count("\n") == 2          # what was already written stays


# -- hostile values for every option (issue 14): never a traceback or an internal error ----------
# One line per kind of value; each option of each registered stage gets all of them.
HOSTILE_VALUES = {
    "nan": "nan", "inf": "inf", "-inf": "-inf", "negative": "-1", "huge int": str(2**63),
    "huger int": "1" + "0" * 40, "huge float": "1e308", "empty": '""', "nul": '"a\\u0000b"',
    "escape": '"\\u001b[31m\\n"', "empty list": "[]", "nested": "[[[[[[1]]]]]]",
}


def _hostile_cases():
    for info in REGISTRY.all():
        if info.kind == "source" and info.name not in ("kernel", "replay"):
            continue
        for f in option_fields(info.cls.Options):
            for label, literal in HOSTILE_VALUES.items():
                yield info.kind, info.name, f.name, label, literal


HOSTILE_CASES = list(_hostile_cases())
NON_FINITE = {"nan", "inf", "-inf"}


def _is_numeric(tp) -> bool:
    """An option holding numbers: int or float, alone, optional or in a list."""
    if tp in (int, float):
        return True
    return any(_is_numeric(arg) for arg in typing.get_args(tp))


def _field(name: str, kind: str, key: str):
    info = REGISTRY.get(kind, name)
    return next(f for f in option_fields(info.cls.Options) if f.name == key), \
        typing.get_type_hints(info.cls.Options)[key]


def _must_refuse(kind: str, name: str, key: str, label: str, literal: str) -> bool:
    """Values a numeric option can never take: non-finite numbers, and numbers
    outside its declared [min, max] (a float for an integer, too)."""
    field, tp = _field(name, kind, key)
    if not _is_numeric(tp):
        return False
    if label in NON_FINITE:
        return True
    try:
        value = int(literal)
    except ValueError:
        try:
            value = float(literal)
        except ValueError:
            return False
    # one number (int, float, or optional): lists are refused for not being lists
    scalar = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
    if scalar not in ([int], [float]):
        return False
    if isinstance(value, float) and scalar == [int]:
        return True
    low, high = field.metadata.get("min"), field.metadata.get("max")
    return (low is not None and value < low) or (high is not None and value > high)


def _override(kind: str, name: str, key: str) -> tuple[str, list[str]]:
    if kind == "sink":
        return f"sinks.{name}.{key}", ["--sink", name]
    if kind == "source":
        return f"sources.{name}.{key}", []
    return f"chain.0.{key}", []


@pytest.mark.parametrize("kind,name,key,label,literal", HOSTILE_CASES,
                         ids=[f"{k}:{n}.{o}={lab}" for k, n, o, lab, _ in HOSTILE_CASES])
def test_every_option_survives_hostile_values(tmp_path, kind, name, key, label, literal):
    cfg = tmp_path / "c.toml"
    table = f'[[chain]]\nuse = "{name}"\n' if kind in ("filter", "enricher") else ""
    cfg.write_text(table)
    where, extra = _override(kind, name, key)
    args = ["--config", str(cfg), "--replay", os.devnull, "--no-summary", "-o", f"{where}={literal}", *extra]
    if kind == "sink" and name not in ("text", "csv"):
        args += ["-o", f"sinks.{name}.path={tmp_path / 'out'}"] if key != "path" and name == "jsonl" else []
    r = run_cli(*args, timeout=30)
    err = r.stderr.decode()
    assert "Traceback" not in err and "internal error" not in err, err
    assert "\x1b" not in err and "\x00" not in err
    if _must_refuse(kind, name, key, label, literal):
        # NaN, infinities and numbers out of the option's range: refused up front
        assert r.returncode == 2 and err.count("\n") == 1 and f".{key}" in err, (r.returncode, err)
        if label in NON_FINITE and "float" in str(_field(name, kind, key)[1]):
            assert f"expected a finite number, got {label}" in err, err      # says what is wrong
    elif r.returncode != 0:
        assert r.returncode in (1, 2) and err.count("\n") == 1, err


NUMERIC_OPTIONS = [(info.kind, info.name, f.name) for info in REGISTRY.all()
                   for f in option_fields(info.cls.Options)
                   if _is_numeric(typing.get_type_hints(info.cls.Options)[f.name])]


def test_the_hostile_corpus_has_numeric_options():
    # the refusals above are checked for these; an empty list would check nothing
    assert len(NUMERIC_OPTIONS) >= 25 and ("source", "kernel", "poll_ms") in NUMERIC_OPTIONS


@pytest.mark.parametrize("kind,name,key", NUMERIC_OPTIONS, ids=[f"{k}:{n}.{o}" for k, n, o in NUMERIC_OPTIONS])
def test_every_numeric_option_declares_its_bounds(kind, name, key):
    """option(min=..., max=...): `tcpstates plugins` shows the range and the
    schema refuses what is outside it; an option without one would take 1e308."""
    field, _ = _field(name, kind, key)
    low, high = field.metadata.get("min"), field.metadata.get("max")
    assert low is not None and high is not None, f"{kind} {name}: option {key} has no min/max"
    assert low <= high and high < 1e300
