"""The optional C hot path (JSON Lines encoder, bcc rows) against the Python
reference: byte-identical output on the bcc fixtures, on JSON Lines, and on
events built to hit every edge (escapes, non-ASCII, unknown states, odd extras).
"""

from __future__ import annotations

import os
import random

import orjson
import pytest
from bccfixtures import MODES, fixture_records
from tracer import run_cli

from tcpstates.api import RunContext
from tcpstates.events import AF_INET, AF_INET6, Event
from tcpstates.plugins.bcc_table import format as bcc_format
from tcpstates.plugins.bcc_table.format import BccFormatter
from tcpstates.plugins.jsonl import sink as jsonl_sink
from tcpstates.plugins.jsonl.sink import JsonlOptions, JsonlSink

needs_c = pytest.mark.skipif(not (bcc_format.C_ROWS_AVAILABLE and jsonl_sink.C_ENCODER_AVAILABLE),
                             reason="C speed-ups not built (pure-Python install)")
COMMS = ["python3", "a\\x0ab", "é-ü", "x" * 15, "", 'q"uote', "back\\slash", "tab\tcr\r", "\x7fdel",
         "😀emoji", "ctl\x01\x1f", "a,b", "\udcff-surrogate"]


def events(n: int, seed: int = 1) -> list[Event]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        fam = rnd.choice((AF_INET, AF_INET6))
        extra: dict = rnd.choice([
            {}, {"owner_pid": rnd.randrange(1 << 22), "owner_comm": rnd.choice(COMMS), "owner_start": None,
                 "owner_cgroup_id": rnd.randrange(1 << 64), "owner_source": "io"},
            {"owner_pid": None, "owner_comm": None, "owner_source": "shared", "owner_candidates": [1, 2, 3]},
            {"flag": True, "neg": -5, "off": False, "big": 1 << 70},           # 1 << 70: orjson's error path
            {"ratio": 0.1}, {"nested": {"a": 1}}, {"pid": 99, "laddr": "forged"}, {1: "non-str key"},
            {"connection": None}, {"deep": [[1]]}, {"huge": (1 << 64) - 1, "low": -(1 << 63)},
        ])
        out.append(Event(
            ts_ns=rnd.randrange(1 << 62), skaddr=rnd.randrange(1 << 64),
            span_ns=rnd.choice([None, 0, 999, 1000, 1500, rnd.randrange(1 << 40), 123456789]),
            pid=rnd.randrange(1 << 32), tid=rnd.randrange(1 << 32), comm=rnd.choice(COMMS), family=fam,
            saddr="127.0.0.1" if fam == AF_INET else "fe80::1:2:3:4", sport=rnd.randrange(65536),
            daddr=rnd.choice(["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::dead:beef:1234:5678"]),
            dport=rnd.randrange(65536), oldstate=rnd.choice([1, 2, 7, 10, 12, 0, 13, 255]),
            newstate=rnd.choice([1, 3, 7, 10, 0, 16, 200]), cgroup_id=rnd.randrange(1 << 64), extra=extra))
    return out


def _jsonl(batch: list[Event], use_c: bool, tmp_path, name: str) -> bytes:
    path = tmp_path / name
    sink = JsonlSink(JsonlOptions(path=str(path)), RunContext(hostname="h\"ost\n", clock_offset_ns=-7))
    sink.use_c = use_c
    sink.open()
    for i in range(0, len(batch), 97):
        sink.write(batch[i:i + 97])
    sink.close()
    return path.read_bytes()


def _safe(batch: list[Event]) -> list[Event]:
    """Events orjson itself can serialise (the reference raises on the rest)."""
    out = []
    for e in batch:
        try:
            orjson.dumps(e.extra)
            orjson.dumps(e.comm)
        except (TypeError, orjson.JSONEncodeError):
            continue
        out.append(e)
    return out


@needs_c
def test_jsonl_c_encoder_is_byte_identical(tmp_path):
    batch = _safe(events(3000))
    c = _jsonl(batch, True, tmp_path, "c.jsonl")
    py = _jsonl(batch, False, tmp_path, "py.jsonl")
    assert c == py
    assert len(c.splitlines()) == len(batch)


@needs_c
def test_jsonl_c_encoder_skips_what_orjson_cannot_encode_as_python_does(tmp_path):
    batch = events(400)
    bad = [e for e in batch if not _safe([e])]
    assert bad
    c = _jsonl(batch, True, tmp_path, "c.jsonl")
    assert c == _jsonl(batch, False, tmp_path, "py.jsonl")
    assert len(c.splitlines()) == len(batch) - len(bad)


@needs_c
@pytest.mark.parametrize("wide", [False, True])
def test_text_c_rows_are_byte_identical(wide):
    batch = events(3000, seed=2)
    fmt = BccFormatter(csv=False, wide=wide, time_col=False, timestamp_col=False, wall_ns=lambda t: t)
    assert fmt.encoded(batch, use_c=True) == fmt.encoded(batch, use_c=False)
    assert fmt.encoded([], use_c=True) == b""


@pytest.mark.parametrize("name", sorted(MODES))
def test_bcc_fixtures_identical_with_and_without_speedups(name, fixtures_dir, tmp_path):
    path = fixtures_dir / "bcc" / name
    _header, records = fixture_records(path, MODES[name])
    trace = tmp_path / "trace.jsonl"
    trace.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    outs = []
    for pure in ("", "1"):
        env = {"TZ": "UTC", "TCPSTATES_NO_SPEEDUPS": pure}
        text = run_cli("--replay", str(trace), "--no-summary", *MODES[name], env=env)
        out = tmp_path / f"out{pure}.jsonl"
        jsonl = run_cli("--replay", str(trace), "--no-summary", "--sink", "jsonl",
                        "-o", f"sinks.jsonl.path={out}", env=env)
        assert text.returncode == 0 and jsonl.returncode == 0, (text.stderr, jsonl.stderr)
        outs.append((text.stdout, out.read_bytes()))
    assert outs[0] == outs[1]
    assert outs[0][0].decode() == path.read_text()


def test_doctor_names_the_hot_path():
    result = run_cli("doctor", env={"TCPSTATES_NO_SPEEDUPS": "1"})
    assert b"hot path" in result.stdout + result.stderr
    assert b"pure Python" in result.stdout + result.stderr


def test_env_switch_is_honoured():
    assert os.environ.get("TCPSTATES_NO_SPEEDUPS") is None or not bcc_format.C_ROWS_AVAILABLE
