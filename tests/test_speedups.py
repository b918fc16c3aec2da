"""The optional C hot path (JSON Lines encoder, bcc rows) against the Python
reference: byte-identical output on the bcc fixtures, on JSON Lines, and on
events built to hit every edge (escapes, non-ASCII, unknown states, odd extras).
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time

import orjson
import pytest
from bccfixtures import MODES, replay_records
from tracer import run_cli

from tcpstates.api import RunContext
from tcpstates.events import AF_INET, AF_INET6, Event, TcpState
from tcpstates.plugins.bcc_table import format as bcc_format
from tcpstates.plugins.bcc_table.format import BccFormatter
from tcpstates.plugins.container import enricher as container_enricher
from tcpstates.plugins.jsonl import sink as jsonl_sink
from tcpstates.plugins.jsonl.sink import JsonlOptions, JsonlSink
from tcpstates.plugins.kernel import decoder as kernel_decoder
from tcpstates.plugins.kernel.decoder import EVENT_SIZE, EVENT_STRUCT, NO_OWNER, SPAN_UNKNOWN, Decoder

needs_c = pytest.mark.skipif(not (bcc_format.C_ROWS_AVAILABLE and jsonl_sink.C_ENCODER_AVAILABLE),
                             reason="C speed-ups not built (pure-Python install)")
COMMS = ["python3", "a\\x0ab", "é-ü", "x" * 15, "", 'q"uote', "back\\slash", "tab\tcr\r", "\x7fdel",
         "😀emoji", "ctl\x01\x1f", "a,b", "\udcff-surrogate"]


def events(n: int, seed: int = 1) -> list[Event]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        # plain ints as the decoder makes them (an IntEnum family is not ours to
        # render in C: those few take the Python path)
        fam = rnd.choice((2, 2, 10, 10, 2, 10, 2, 10, AF_INET, AF_INET6))
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
            dport=rnd.randrange(65536), oldstate=rnd.choice([1, 2, 7, 10, 12, 0, 13, 255, 256]),
            newstate=rnd.choice([1, 3, 7, 10, 0, 16, 200, 300, 1 << 33]), cgroup_id=rnd.randrange(1 << 64), extra=extra))
    return out


def _jsonl(batch: list[Event], use_c: bool, tmp_path, name: str, fallbacks: list | None = None) -> bytes:
    path = tmp_path / name
    sink = JsonlSink(JsonlOptions(path=str(path)), RunContext(hostname="h\"ost\n", clock_offset_ns=-7))
    sink.use_c = use_c
    if fallbacks is not None:       # the events the C encoder handed back to Python
        one = sink._one
        sink._one = lambda e, seq: fallbacks.append(e) or one(e, seq)
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
    fallbacks: list = []
    c = _jsonl(batch, True, tmp_path, "c.jsonl", fallbacks)
    py = _jsonl(batch, False, tmp_path, "py.jsonl")
    assert c == py
    assert len(c.splitlines()) == len(batch)
    # C really encoded most events (floats, nested objects, IntEnum go to Python)
    assert 0 < len(fallbacks) < len(batch) * 3 // 4


@needs_c
def test_jsonl_c_encoder_sizes_its_output_from_the_last_batch_safely(tmp_path):
    """The encoder builds each batch in a bytes object sized from the previous
    batch's bytes per event: a batch of huge lines (the size grows mid-batch),
    then small ones, one-event and empty batches all come out exact."""
    small = _safe(events(300, seed=5))
    huge = []
    for i, e in enumerate(_safe(events(40, seed=6))):
        e.extra = {"blob": "\x01" * (20_000 + i)}   # 6 bytes of JSON per character
        huge.append(e)
    for order in ([huge, small, small[:1], []], [small, huge, small]):
        outs = []
        for use_c in (True, False):
            path = tmp_path / f"{use_c}.jsonl"
            path.unlink(missing_ok=True)
            sink = JsonlSink(JsonlOptions(path=str(path)), RunContext(hostname="h"))
            sink.use_c = use_c
            sink.open()
            for batch in order:
                sink.write(batch)
            sink.close()
            outs.append(path.read_bytes())
        assert outs[0] == outs[1]
        assert len(outs[0].splitlines()) == sum(len(b) for b in order)


@needs_c
def test_jsonl_c_encoder_skips_what_orjson_cannot_encode_as_python_does(tmp_path):
    batch = events(400)
    bad = [e for e in batch if not _safe([e])]
    assert bad
    c = _jsonl(batch, True, tmp_path, "c.jsonl")
    assert c == _jsonl(batch, False, tmp_path, "py.jsonl")
    assert len(c.splitlines()) == len(batch) - len(bad)


@needs_c
@pytest.mark.parametrize("owner", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_text_c_rows_are_byte_identical(wide, owner):
    batch = events(3000, seed=2)
    if owner:   # container fields too, and an owner name C cannot encode (a surrogate)
        for i, e in enumerate(batch[:300]):
            e.extra = {**e.extra, "owner_pid": i, "owner_comm": COMMS[i % len(COMMS)],
                       "container_name": COMMS[(i + 3) % len(COMMS)], "cgroup": "/x"}
    fmt = BccFormatter(csv=False, wide=wide, time_col=False, timestamp_col=False, wall_ns=lambda t: t,
                       owner=owner)
    fallbacks = []
    one = fmt._one_encoded
    fmt._one_encoded = lambda e: fallbacks.append(e) or one(e)
    assert fmt.encoded(batch, use_c=True) == fmt.encoded(batch, use_c=False)
    # C really rendered its share of rows (what it leaves to Python: escapes and
    # backslashes, non-ASCII, IntEnum): 5 of the 13 COMMS are C's to render
    assert 0 < len(fallbacks) < len(batch) * 9 // 10
    assert fmt.encoded([], use_c=True) == b""


@needs_c
@pytest.mark.parametrize("wide", [False, True])
def test_text_c_owner_columns_memo_follows_every_value(wide):
    """The C rows remember owner columns by the identity of the values they
    are made of: events sharing value objects (as enrichers make them), then
    the same objects with one value changed, with or without a cgroup, with
    look-alike values of other types (True for 1, 1.0), two formatters (-w
    and not) in turn — every row as Python renders it."""
    shared = {"owner_pid": 4242, "owner_comm": "nginx", "container_name": "web-1", "k8s_pod": None}
    variants = [shared, {**shared, "container_name": "web-2"}, {**shared, "cgroup": "/system.slice/x"},
                {**shared, "systemd_unit": "x.service"}, {**shared, "owner_pid": True},
                {**shared, "owner_pid": 1}, {**shared, "owner_pid": 1.0}, {**shared, "owner_comm": None},
                {**shared, "k8s_pod": "api-0", "k8s_namespace": "prod"}, {**shared, "pod_uid": "u-1"},
                {**shared, "container_id": "c" * 64, "container_name": None}, {}]
    batch = _safe(events(len(variants) * 60, seed=9))
    for i, e in enumerate(batch):
        e.comm, e.saddr, e.daddr = "python3", "127.0.0.1", "10.0.0.1"   # plain rows: C renders them
        e.extra = dict(variants[i % len(variants)])   # a copy of each, values shared as enrichers do
    for w in (wide, not wide, wide):
        fmt = BccFormatter(csv=False, wide=w, time_col=False, timestamp_col=False, wall_ns=lambda t: t,
                           owner=True)
        c, py = fmt.encoded(batch, use_c=True), fmt.encoded(batch, use_c=False)
        assert c == py
        assert b" web-2 " in c or b"web-2" in c


@needs_c
def test_text_c_rows_of_an_event_subclass_read_its_attributes(tmp_path):
    """C reads Event's slots directly; a subclass whose field is a property
    (not a slot) is read through getattr, so its rows are still Python's."""
    class Shown(Event):
        @property   # type: ignore[override]
        def comm(self) -> str:
            return "from-property"

        @comm.setter
        def comm(self, value: str) -> None:
            pass

    plain = _safe(events(50, seed=4))
    odd = [Shown(**{f: getattr(e, f) for f in Event.__dataclass_fields__}) for e in plain]
    for e in plain:
        e.comm, e.saddr, e.daddr = "python3", "127.0.0.1", "10.0.0.1"
    for e in odd:
        e.saddr, e.daddr = "127.0.0.1", "10.0.0.1"
    fmt = BccFormatter(csv=False, wide=True, time_col=False, timestamp_col=False, wall_ns=lambda t: t)
    mixed = [x for pair in zip(plain, odd) for x in pair]
    c = fmt.encoded(mixed, use_c=True)
    assert c == fmt.encoded(mixed, use_c=False)
    assert c.count(b"from-property") == len(odd)


@pytest.mark.parametrize("name", sorted(MODES))
def test_bcc_fixtures_identical_with_and_without_speedups(name, fixtures_dir, tmp_path):
    path = fixtures_dir / "bcc" / name
    _header, records, _foreign = replay_records(path, MODES[name])
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


# -- the kernel record decoder (plugins/kernel/_decode.c) -------------------------------

needs_c_decoder = pytest.mark.skipif(not kernel_decoder.C_DECODER_AVAILABLE,
                                     reason="C decoder not built (pure-Python install)")
RAW_COMMS = [b"python3", b"a\nb", "é-ü".encode(), b"x" * 16, b"", b'q"uote', b"back\\slash", b"tab\tcr\r",
             b"\x7fdel", "😀".encode(), b"ctl\x01\x1f", b"a,b", b"\xff\xfe bad utf8", b"\xe2\x82",
             b"nul\0after-nul", b"\x1b[31mred"]


def raw_records(n: int, seed: int) -> bytes:
    """Ring records as the kernel lays them out, built to hit every edge."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        # plain ints as the decoder makes them (an IntEnum family is not ours to
        # render in C: those few take the Python path)
        fam = rnd.choice((2, 2, 10, 10, 2, 10, 2, 10, AF_INET, AF_INET6))
        def addr() -> bytes:
            if fam == AF_INET:
                return rnd.choice([bytes([127, 0, 0, 1]), bytes([10, 0, rnd.randrange(3), 1]),
                                   bytes(4), b"\xff" * 4]) + bytes(12)
            return rnd.choice([bytes(15) + b"\1", b"\xfe\x80" + bytes(13) + b"\1",
                               bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]), rnd.randbytes(16)])
        owner = rnd.choice([NO_OWNER, rnd.randbytes(40), bytes(39) + b"\1"])
        out.append(struct.pack("<II", EVENT_SIZE, rnd.randrange(1 << 32)) + EVENT_STRUCT.pack(
            rnd.randrange(1 << 64), rnd.randrange(1 << 64),
            rnd.choice([SPAN_UNKNOWN, 0, 1, SPAN_UNKNOWN - 1, rnd.randrange(1 << 64)]),
            rnd.randrange(1 << 64), rnd.choice([0, rnd.randrange(1 << 32), (1 << 32) - 1]),
            rnd.randrange(1 << 32), rnd.randrange(65536), rnd.randrange(65536), fam,
            rnd.choice([1, 2, 7, 10, 12, 0, 13, 255]), rnd.choice([1, 3, 7, 0, 16, 200]),
            addr(), addr(), rnd.choice(RAW_COMMS).ljust(16, b"\0")[:16], owner))
    return b"".join(out)


def _both(data: bytes) -> tuple[tuple[list[Event], int], tuple[list[Event], int]]:
    return Decoder(use_c=True).decode_block(data), Decoder(use_c=False).decode_block(data)


@needs_c_decoder
def test_c_decoder_equals_python_on_random_records():
    data = raw_records(5000, seed=3)
    c, py = _both(data)
    assert c[1] == py[1] == len(data)
    assert len(c[0]) == 5000
    assert c[0] == py[0]
    assert any(e.extra for e in c[0]) and any(e.span_ns is None for e in c[0])
    assert any("\ufffd" in e.comm for e in c[0]) and any("\\x" in e.comm for e in c[0])
    # the rendered rows too (the memo must hand out the very texts Python made)
    fmt = BccFormatter(csv=False, wide=True, time_col=False, timestamp_col=False, wall_ns=lambda t: t)
    assert fmt.encoded(c[0], use_c=False) == fmt.encoded(py[0], use_c=False)


@needs_c_decoder
def test_c_decoder_stops_where_python_stops():
    data = raw_records(50, seed=4)
    step = 8 + EVENT_SIZE
    busy = data[:10 * step] + struct.pack("<I", EVENT_SIZE | (1 << 31)) + data[10 * step + 4:]
    for block in (busy, data[:-1], data[:step - 1], b"", data[:5 * step] + b"\0" * step):
        c, py = _both(block)
        assert c == py
    assert _both(busy)[0][1] == 10 * step


@needs_c_decoder
def test_c_decoder_renders_an_unknown_family_like_python():
    # it used to raise in both only while no C Decoder of the process had
    # memoised the IPv6 '::' (see the test of odd families below)
    bad = struct.pack("<II", EVENT_SIZE, 0) + EVENT_STRUCT.pack(
        1, 2, 3, 4, 5, 6, 7, 8, 3, 1, 7, bytes(16), bytes(16), b"x".ljust(16, b"\0"), NO_OWNER)
    c, py = _both(bad)
    assert c == py and c[0][0].saddr == "::" and c[1] == len(bad)


@needs_c_decoder
def test_c_decoder_survives_cache_clearing():
    dec_c, dec_py = Decoder(use_c=True), Decoder(use_c=False)
    dec_c.CACHE_LIMIT = dec_py.CACHE_LIMIT = 3        # clear the Python caches all the time
    for seed in range(5):
        data = raw_records(400, seed=10 + seed)
        assert dec_c.decode_block(data) == dec_py.decode_block(data)


def raw_conn_records(n: int, seed: int) -> bytes:
    """Connection records (`--connections`) as the kernel lays them out: the
    state-change part from raw_records, then start, last, 16 state times,
    the flags and the error, built to hit every edge (no state, every state, huge
    times, unclosed, a first state outside the table)."""
    from tcpstates.plugins.kernel.conndecoder import CONN_RING_RECORD, CONN_SIZE, NSTATES
    rnd = random.Random(seed)
    step = 8 + EVENT_SIZE
    events = raw_records(n, seed)
    out = []
    for i in range(n):
        head = struct.unpack_from("<II", events, i * step)
        fields = EVENT_STRUCT.unpack_from(events, i * step + 8)
        states = rnd.choice([[0] * NSTATES, [rnd.randrange(1 << 64) for _ in range(NSTATES)],
                             [rnd.choice([0, 0, 1, 999, 10**9, (1 << 64) - 1]) for _ in range(NSTATES)]])
        out.append(CONN_RING_RECORD.pack(
            CONN_SIZE, head[1], *fields, rnd.randrange(1 << 64), rnd.randrange(1 << 64), *states,
            rnd.choice([7, 10, 2, 0, 255]), rnd.choice([0, 1, 2]), rnd.choice([0, 1, 1, 255]),
            rnd.choice([0, 1, 1, 7]), rnd.choice([0, 111, 110, -1, (1 << 31) - 1, -(1 << 31)])))
    return b"".join(out)


def _conn_both(data: bytes) -> tuple[tuple[list[Event], int], tuple[list[Event], int]]:
    from tcpstates.plugins.kernel.conndecoder import decode_conn_block
    return decode_conn_block(Decoder(use_c=True), data), decode_conn_block(Decoder(use_c=False), data)


@needs_c_decoder
def test_c_connection_decoder_equals_python_on_random_records():
    from tcpstates.events import CONNECTION, Connection
    from tcpstates.plugins.bcc_table.connections import ConnectionFormatter
    data = raw_conn_records(3000, seed=21)
    c, py = _conn_both(data)
    assert c[1] == py[1] == len(data)
    assert len(c[0]) == 3000
    assert c[0] == py[0]
    # the same keys in the same order (JSON Lines writes extra in its order)
    assert [list(e.extra) for e in c[0]] == [list(e.extra) for e in py[0]]
    conns = [e.extra[CONNECTION] for e in c[0]]
    assert all(type(x) is Connection for x in conns)
    assert any(not x.closed and x.end_ns is None for x in conns) and any(x.closed for x in conns)
    assert any(x.state_ns == {} for x in conns) and any(len(x.state_ns) == 16 for x in conns)
    assert all(0 not in x.state_ns.values() for x in conns)
    for wide in (False, True):
        fmt = ConnectionFormatter(csv=False, wide=wide, time_col=False, timestamp_col=False,
                                  wall_ns=lambda t: t)
        assert fmt.encoded(c[0]) == fmt.encoded(py[0])


@needs_c_decoder
def test_c_connection_decoder_stops_where_python_stops():
    from tcpstates.plugins.kernel.conndecoder import CONN_RING_RECORD_SIZE, CONN_SIZE
    data = raw_conn_records(40, seed=22)
    step = CONN_RING_RECORD_SIZE
    busy = data[:7 * step] + struct.pack("<I", CONN_SIZE | (1 << 31)) + data[7 * step + 4:]
    state_change = raw_records(3, seed=5)      # a state-change record is foreign here
    for block in (busy, data[:-1], data[:step - 1], b"", data[:5 * step] + b"\0" * step,
                  data[:2 * step] + state_change):
        c, py = _conn_both(block)
        assert c == py
    assert _conn_both(busy)[0][1] == 7 * step


@needs_c_decoder
def test_c_connection_decoder_survives_cache_clearing():
    dec_c, dec_py = Decoder(use_c=True), Decoder(use_c=False)
    dec_c.CACHE_LIMIT = dec_py.CACHE_LIMIT = 3
    from tcpstates.plugins.kernel.conndecoder import decode_conn_block
    for seed in range(4):
        data = raw_conn_records(300, seed=30 + seed)
        assert decode_conn_block(dec_c, data) == decode_conn_block(dec_py, data)


def _outcome(fn, *args):
    """What a decoder call gives: its result, or the type of what it raised."""
    try:
        return fn(*args)
    except Exception as exc:   # the comparison is the point: any exception type
        return type(exc)


@needs_c_decoder
@pytest.mark.parametrize("family", [0, 1, 3, 17, 255, 65535])
def test_c_decoders_equal_python_on_a_family_neither_ipv4_nor_ipv6(family):
    """A family the kernel never sends (TCP traces IPv4 and IPv6 only): its
    addresses are IPv6 text, both ways. Before, the Python decoder raised
    (inet_ntop: the whole block lost) unless its own IPv6 cache held the
    bytes, while the C decoder answered from its memo, shared by every
    Decoder: the two differed after another Decoder had seen the bytes, or
    after a cache was cleared."""
    from tcpstates.plugins.kernel.conndecoder import CONN_RING_RECORD, CONN_SIZE, decode_conn_block
    addr = bytes(15) + b"\x07"
    def fields(fam, a):
        return (1, 2, 3, 4, 5, 6, 7, 8, fam, 1, 7, a, a, b"x".ljust(16, b"\0"), NO_OWNER)
    def state_change(fam, a=addr):
        return struct.pack("<II", EVENT_SIZE, 0) + EVENT_STRUCT.pack(*fields(fam, a))
    def connection(fam, a=addr):
        return CONN_RING_RECORD.pack(CONN_SIZE, 0, *fields(fam, a), 10, 20, *([0] * 16), 1, 1, 1, 1, 0)
    for record, decode in ((state_change, lambda dec, data: dec.decode_block(data)),
                           (connection, decode_conn_block)):
        decode(Decoder(use_c=True), record(AF_INET6))          # the C memo now holds '::7'
        for warm in (False, True):
            got = []
            for use_c in (True, False):
                dec = Decoder(use_c=use_c)
                if warm:
                    dec.CACHE_LIMIT = 2
                    # seen, then cleared out of this Decoder's cache by others
                    others = [record(AF_INET6, bytes(15) + bytes([i])) for i in (7, 8, 9, 10)]
                    decode(dec, b"".join(others))
                got.append(_outcome(decode, dec, record(family)))
            assert got[0] == got[1]
            (events, used) = got[0]
            assert used == len(record(family)) and events[0].saddr == events[0].daddr == "::7"
    assert Decoder(use_c=False).decode(EVENT_STRUCT.pack(*fields(family, addr)), [0])[0].saddr == "::7"


@needs_c_decoder
@pytest.mark.parametrize(("pure", "method"), [("1", "decode_block"), ("", "_decode_block_c")])
def test_no_speedups_switch_decides_the_decoder(pure, method):
    code = "from tcpstates.plugins.kernel import decoder; print(decoder.Decoder().decode_block.__name__)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TCPSTATES_NO_SPEEDUPS": pure},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == method


@needs_c
@pytest.mark.parametrize("wide", [False, True])
def test_text_c_rows_hand_formatting_matches_printf_at_the_edges(wide):
    """The C rows format numbers by hand: widths overflowing, the largest
    values, and durations at and beyond the exact-decimal bound (2^40 µs)."""
    spans = [0, 999, 1000, 1499, 1500, 999_999, 1_000_000, (1 << 40) * 1000 - 1, (1 << 40) * 1000,
             (1 << 40) * 1000 + 500_000, (1 << 53) * 1000, (1 << 53) * 1000 + 999, (1 << 64) - 1,
             123_456_789_012_345_678]
    rnd = random.Random(5)
    batch = [Event(ts_ns=0, skaddr=rnd.choice([0, 1, (1 << 64) - 1, 0xabcdef]), span_ns=span,
                   pid=rnd.choice([0, 7, 99999, 123456, (1 << 32) - 1]), tid=0,
                   comm=rnd.choice(["", "x" * 9, "y" * 10, "z" * 11, "w" * 16, "v" * 17]),
                   family=rnd.choice([AF_INET, AF_INET6]),
                   saddr=rnd.choice(["", "1.2.3.4", "255.255.255.255", "a" * 39, "b" * 45]),
                   sport=rnd.choice([0, 65535, 12345]), daddr="::1", dport=rnd.choice([0, 80, 65535]),
                   oldstate=rnd.choice([0, 1, 12, 13, 255]), newstate=rnd.choice([7, 99, 100]))
             for span in spans for _ in range(8)]
    fmt = BccFormatter(csv=False, wide=wide, time_col=False, timestamp_col=False, wall_ns=lambda t: t)
    assert fmt.encoded(batch, use_c=True) == fmt.encoded(batch, use_c=False)


@pytest.mark.kernel
@needs_c_decoder
def test_c_decoder_on_real_kernel_records_prints_what_python_prints():
    """Real traffic through the real probe: the C decoder is the one in use, and
    every block it decoded gives the same Events, and the same -w table bytes,
    when decoded again by the pure-Python decoder."""
    from traffic import free_port, session

    from tcpstates.plugins.kernel.probe import KernelProbe
    probe = KernelProbe(ring_pages=64, max_sockets=4096, buffer="ring", local_ports=None,
                        remote_ports=None, family=None, poll_s=0.01)
    try:
        assert probe.decoder.decode_block.__name__ == "_decode_block_c"   # what plain tcpstates runs
        blocks: list[bytes] = []
        real = probe._decode_block

        def keep(data: bytes):
            blocks.append(bytes(data))
            return real(data)
        probe._decode_block = keep
        ports = {free_port(AF_INET), free_port(AF_INET6)}
        p4, p6 = sorted(ports)
        session(AF_INET, p4, hold=0.01, server_delay=0.0)
        session(AF_INET6, p6, hold=0.01, server_delay=0.0)
        got: list[Event] = []
        deadline = time.monotonic() + 10
        # per session: the listener (2 changes) + client and server child (5 each): 12
        while time.monotonic() < deadline and sum(1 for e in got if {e.sport, e.dport} & ports) < 24:
            got += probe.read(0.2)
    finally:
        probe.close()
    ours = [e for e in got if {e.sport, e.dport} & ports]
    assert len(ours) == 24, ours
    assert {e.family for e in ours} == {AF_INET, AF_INET6}
    c_events = [e for b in blocks for e in Decoder(use_c=True).decode_block(b)[0]]
    py_events = [e for b in blocks for e in Decoder(use_c=False).decode_block(b)[0]]
    assert c_events == py_events
    assert [e for e in c_events if {e.sport, e.dport} & ports] == ours
    fmt = BccFormatter(csv=False, wide=True, time_col=False, timestamp_col=False, wall_ns=lambda t: t)
    assert fmt.encoded(c_events, use_c=True) == fmt.encoded(py_events, use_c=False)


# -- the owner enricher's loop (plugins/owner/_observe.c) ----------------------

def _owner_batches(seed: int) -> list[list]:
    """Batches hitting every branch of OwnerEnricher.observe_batch: kernel owners
    (repeated tails: cache hits; accepts by processes in and out of a watched
    listener's holders), listener changes, accept-queue events without an owner,
    sockets without anything, extras with other keys, and an object that is not
    the slotted Event."""
    from tcpstates.plugins.owner.enricher import KERNEL_OWNER, RAW_OWNER
    rnd = random.Random(seed)
    tails = [RAW_OWNER.pack(rnd.randrange(1 << 40), rnd.randrange(1 << 64), pid, how,
                            rnd.choice([b"nginx", b"a\nb\x1b[31m", b"\xff\xfe", b"w" * 16]))
             for pid in (100, 200, 300) for how in (1, 2, 3)]

    class Loose:     # duck-typed, not the slots dataclass: the C loop hands it back whole
        def __init__(self, **kw):
            self.__dict__.update(kw)

    batches = []
    for _ in range(20):
        batch = []
        for _ in range(rnd.randrange(0, 60)):
            sk = rnd.choice([0xffff0001, 0xffff0002, 0xffff0003])
            # listener changes (which drop the cached holders) are rare, as in life
            old, new = rnd.choice([(10, 3), (3, 1), (1, 8), (8, 9), (9, 7), (1, 4)] * 20 + [(7, 10), (10, 7)])
            extra: dict = {}
            # a connection in the accept queue has no kernel owner yet
            if (old, new) not in ((10, 3), (3, 1)) and rnd.random() < 0.7:
                extra[KERNEL_OWNER] = rnd.choice(tails)
            if rnd.random() < 0.2:
                extra["container_id"] = "abc"
            fam = rnd.choice([2, 2, 10, AF_INET])     # plain ints, as the decoder makes them
            kw = dict(ts_ns=rnd.randrange(1 << 60), skaddr=sk, span_ns=None, pid=1, tid=1, comm="c",
                      family=fam, saddr=rnd.choice(["127.0.0.1", "10.0.0.1"]) if fam == AF_INET else "::1",
                      sport=rnd.choice([18080, 18081]), daddr="127.0.0.1",
                      dport=rnd.randrange(1, 65536), oldstate=old, newstate=new, cgroup_id=0, extra=extra)
            if rnd.random() < 0.05:      # IntEnum states compare as ints in Python
                kw["oldstate"], kw["newstate"] = TcpState(old), TcpState(new)
            if batch and KERNEL_OWNER in extra and rnd.random() < 0.05:
                kw["extra"] = batch[-1].extra        # one dict shared by two events
            batch.append(Loose(**kw) if rnd.random() < 0.05 else Event(**kw))
        batches.append(batch)
    return batches


def _run_owner(use_c: bool, seed: int):
    import copy

    from tcpstates.plugins.owner.enricher import OwnerEnricher, OwnerOptions
    from tcpstates.plugins.owner.sockowners import PortHolders
    enricher = OwnerEnricher(OwnerOptions(scan_existing=False), RunContext())
    enricher.use_c = use_c
    # port 18080: listener holders cached and fresh (the C loop answers from the
    # cache); 18081: stale (Python looks it up again, finding nobody)
    fresh = (time.monotonic() + 3600, {
        (AF_INET, "127.0.0.1"): {"owner_pid": 100, "owner_comm": "srv", "owner_start": 5,
                                 "owner_source": "listener"},
        (AF_INET6, "::"): {"owner_pid": None, "owner_comm": None, "owner_source": "shared",
                           "owner_candidates": [100, 200]}})
    stale = (0.0, {(AF_INET, "0.0.0.0"): {"owner_pid": 1, "owner_source": "listener"}})
    watch = enricher.watches[18080] = PortHolders(18080, 1.0)
    watch.held = {100: {1}}            # 200 and 300 accepting there are hand-offs
    invalidated = []
    watch.invalidate = lambda: invalidated.append(1)
    out = []
    for batch in copy.deepcopy(_owner_batches(seed)):
        # as if a look-up had just found them (a listener change in the last
        # batch dropped them)
        enricher.listeners[18080], enricher.listeners[18081] = fresh, stale
        enricher.observe_batch(batch)
        out.append([(type(e).__name__, e.extra) for e in batch])
    return out, sorted(enricher.queued), sorted(enricher.owned), len(invalidated)


@pytest.mark.skipif(not __import__("tcpstates.plugins.owner.enricher", fromlist=["x"]).C_OBSERVE_AVAILABLE,
                    reason="C speed-ups not built (pure-Python install)")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_owner_loop_equals_python(seed):
    c, py = _run_owner(True, seed), _run_owner(False, seed)
    assert c == py
    assert c[3] > 0                     # the hand-off branch was taken
    assert any(x[1].get("owner_source") == "accept" for batch in c[0] for x in batch)
    assert any(x[0] == "Loose" for batch in c[0] for x in batch)
    sources = {x[1].get("owner_source") for batch in c[0] for x in batch}
    assert {"listener", "shared", "unknown", "accept", "io", "syscall"} <= sources


@pytest.mark.skipif(not __import__("tcpstates.plugins.owner.enricher", fromlist=["x"]).C_OBSERVE_AVAILABLE,
                    reason="C speed-ups not built (pure-Python install)")
@pytest.mark.parametrize("case", ["intenum_listen", "intenum_close_queued", "float_state", "shared_extra",
                                  "outside_reference"])
def test_c_owner_loop_equals_python_on_odd_events(case):
    """What an adversarial review found: states that are IntEnums or floats
    (equal as ints in Python), one extra dict shared by two events, a dict
    someone else holds. Each must come out as the Python loop leaves it."""
    from tcpstates.plugins.owner.enricher import KERNEL_OWNER, RAW_OWNER, OwnerEnricher, OwnerOptions
    raw = RAW_OWNER.pack(123, 5, 100, 1, b"srv")

    def ev(**kw) -> Event:
        d = dict(ts_ns=1, skaddr=0xff01, span_ns=None, pid=1, tid=1, comm="c", family=2, saddr="127.0.0.1",
                 sport=18080, daddr="127.0.0.1", dport=5555, oldstate=1, newstate=4, cgroup_id=0, extra={})
        d.update(kw)
        return Event(**d)

    def batch() -> tuple[list[Event], dict]:
        held: dict = {KERNEL_OWNER: raw}
        return {
            "intenum_listen": [ev(oldstate=TcpState.LISTEN, newstate=TcpState.CLOSE, extra={KERNEL_OWNER: raw})],
            "intenum_close_queued": [ev(oldstate=TcpState.SYN_RECV, newstate=TcpState.CLOSE)],
            "float_state": [ev(oldstate=10.0, newstate=7, extra={KERNEL_OWNER: raw})],
            "shared_extra": [ev(extra=held), ev(skaddr=0xff02, extra=held)],
            "outside_reference": [ev(extra=held)],
        }[case], held

    def run(use_c: bool):
        enricher = OwnerEnricher(OwnerOptions(scan_existing=False), RunContext())
        enricher.use_c = use_c
        enricher.listeners[18080] = (time.monotonic() + 3600,
                                     {(2, "127.0.0.1"): {"owner_pid": 9, "owner_source": "listener"}})
        enricher.queued.add(0xff01)
        events, held = batch()
        enricher.observe_batch(events)
        return ([e.extra for e in events], [e.extra is held for e in events], held, sorted(enricher.queued),
                sorted(enricher.listeners))

    assert run(True) == run(False)


def _container_batches(seed: int) -> list[list[Event]]:
    """Batches whose owners repeat (the C loop's hits), come earlier than a
    hit, need the on-CPU cgroup, or are not plain ints (Python's path)."""
    rnd = random.Random(seed)
    me = os.getpid()
    cg_path = open("/proc/self/cgroup").read().split("::", 1)[1].strip()
    my_cg = os.stat("/sys/fs/cgroup" + cg_path).st_ino        # kernfs node id = cgroup id
    with open(f"/proc/{me}/stat") as f:
        my_start = int(f.read().rsplit(")", 1)[1].split()[19])
    owners = [
        {"owner_pid": me, "owner_cgroup_id": my_cg, "owner_start": my_start},
        {"owner_pid": me, "owner_cgroup_id": 0, "owner_start": my_start},      # the on-CPU task's cgroup
        {"owner_pid": me, "owner_start": my_start},
        {"owner_pid": me, "owner_cgroup_id": my_cg, "owner_start": my_start + 1},   # another process
        {"owner_pid": 1, "owner_cgroup_id": None, "owner_start": None},
        {"owner_pid": (1 << 22) + 7, "owner_cgroup_id": (1 << 60) + 3, "owner_start": 5},    # gone
        {"owner_pid": str(me), "owner_cgroup_id": my_cg},                        # replayed oddities
        {"owner_pid": me, "owner_cgroup_id": "", "owner_start": my_start},
        {"owner_pid": me, "owner_cgroup_id": my_cg, "owner_start": float(my_start)},
        {"owner_pid": True, "owner_cgroup_id": my_cg},
        {},
    ]
    now = time.monotonic_ns()
    batches = []
    for _ in range(6):
        batch = []
        for _ in range(rnd.randrange(1, 400)):
            extra = dict(rnd.choice(owners), owner_comm="x")
            batch.append(Event(
                # after this process started, in any order; a few at boot (before it: "another process")
                ts_ns=rnd.choice((now + rnd.randrange(10**9),) * 9 + (1,)), skaddr=rnd.randrange(1 << 64), span_ns=None,
                pid=rnd.choice((me, me, 1, 4242)), tid=me, comm="python3", family=2, saddr="127.0.0.1",
                sport=rnd.randrange(65536), daddr="127.0.0.1", dport=80, oldstate=1, newstate=4,
                cgroup_id=rnd.choice((my_cg, my_cg, 0, (1 << 61) + 9)), extra=extra))
        batches.append(batch)
    return batches


@pytest.mark.skipif(not container_enricher.C_ENRICH_AVAILABLE, reason="C speed-ups not built (pure-Python install)")
@pytest.mark.parametrize("seed", range(4))
def test_container_c_loop_equals_python(seed):
    """The container enricher's C loop (_enrich.c) gives every event what the
    Python loop gives it, with the caches of both starting alike."""
    results = []
    for use_c in (False, True):
        enricher = container_enricher.ContainerEnricher(container_enricher.ContainerOptions(names=False),
                                                        RunContext())
        enricher.use_c = use_c
        out = []
        for batch in _container_batches(seed):
            enricher.enrich_batch(batch)
            out.extend(e.extra for e in batch)
        results.append(out)
    py, c = results
    assert c == py
    assert sum(1 for x in py if "cgroup" in x) > 100         # the hits path ran, not only misses
    assert any("cgroup" not in x for x in py)                # and some owners stayed unknown


def test_container_c_loop_is_what_runs():
    """Built: enrich_batch takes the C loop (a hit is answered without Python's one())."""
    if not container_enricher.C_ENRICH_AVAILABLE:
        pytest.skip("C speed-ups not built (pure-Python install)")
    enricher = container_enricher.ContainerEnricher(container_enricher.ContainerOptions(names=False), RunContext())
    batch = _container_batches(0)[0]
    calls = []
    one = enricher._enrich_one
    enricher._enrich_one = lambda e: (calls.append(e), one(e))    # type: ignore[method-assign]
    enricher.enrich_batch(batch)
    assert 0 < len(calls) < len(batch)
