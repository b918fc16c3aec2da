"""The kernel stage's trickiest logic on synthetic buffers, without the kernel.

The ring and perf buffer readers are given memory files laid out exactly as the
kernel lays out its mappings (the ring's data area mapped twice in a row, the
perf page header's head/tail); the decoder is given records packed with its own
struct and checked field by field; the C record layout is compiled with the C
compiler and compared with the decoder's struct; cflags and `-o` overrides are
checked as parsed.
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import struct
import subprocess

import pytest

from tcpstates.config import apply_override, parse_override
from tcpstates.errors import UsageError
from tcpstates.plugins.kernel.bcccompat import bcc_needs_debugfs
from tcpstates.plugins.kernel.decoder import (
    EVENT_SIZE,
    EVENT_STRUCT,
    RING_RECORD_SIZE,
    SPAN_UNKNOWN,
    Decoder,
)
from tcpstates.plugins.kernel.headers import generic_trees
from tcpstates.plugins.kernel.perfbuf import PERF_RECORD_LOST, PERF_RECORD_SAMPLE, PerfBufferReader
from tcpstates.plugins.kernel.probe import bpf_source_dir, build_cflags
from tcpstates.plugins.kernel.ringbuf import BUSY_BIT, DISCARD_BIT, RingBufferReader

PAGE = mmap.PAGESIZE


def event_bytes(i: int, *, family: int = socket.AF_INET, span: int = 1000, comm: bytes = b"curl") -> bytes:
    saddr = socket.inet_pton(family, "127.0.0.1" if family == socket.AF_INET else "::1")
    return EVENT_STRUCT.pack(1_000 + i, 0xffff0000 + i, span, 7, 100 + i, 200 + i, 40000 + i, 80,
                             family, 7, 2, saddr.ljust(16, b"\0"), saddr.ljust(16, b"\0"),
                             comm.ljust(16, b"\0"), bytes(40))


# -- ring buffer ---------------------------------------------------------------------------

class FakeRing:
    """A memory file with the ring map's layout: consumer page, producer page,
    then the data area twice (the kernel maps it twice so wrapped records are
    contiguous; here every write goes to both copies)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * size)
        self.mm = mmap.mmap(self.fd, 2 * PAGE + 2 * size)
        self.prod = 0

    def put(self, pos: int, data: bytes) -> None:
        for i, b in enumerate(data):
            off = (pos + i) % self.size
            self.mm[2 * PAGE + off] = b
            self.mm[2 * PAGE + self.size + off] = b

    def record(self, payload: bytes, *, busy: bool = False, discard: bool = False) -> int:
        """Reserve and (unless busy) commit a record at the producer position."""
        at = self.prod
        length = len(payload) | (BUSY_BIT if busy else 0) | (DISCARD_BIT if discard else 0)
        self.put(at, struct.pack("<II", length, 0) + payload)
        self.prod += (len(payload) + 8 + 7) & ~7
        struct.pack_into("<Q", self.mm, PAGE, self.prod)
        return at

    def commit(self, at: int, payload_len: int) -> None:
        self.put(at, struct.pack("<I", payload_len))

    def set_consumer(self, pos: int) -> None:
        struct.pack_into("<Q", self.mm, 0, pos)
        self.prod = max(self.prod, pos)
        struct.pack_into("<Q", self.mm, PAGE, self.prod)

    def consumer(self) -> int:
        return struct.unpack_from("<Q", self.mm, 0)[0]


@pytest.fixture
def ring():
    fake = FakeRing(4 * PAGE)
    reader = RingBufferReader(fake.fd, fake.size, epoll=False)
    yield fake, reader
    reader.close()
    fake.mm.close()
    os.close(fake.fd)


def test_ring_reads_committed_records_back_to_back_and_releases_them(ring):
    fake, reader = ring
    for i in range(5):
        fake.record(event_bytes(i))
    block = reader.read_block(1 << 20, EVENT_SIZE)
    events, used = Decoder().decode_block(block)
    assert [e.pid for e in events] == [100, 101, 102, 103, 104] and used == 5 * RING_RECORD_SIZE
    assert reader.pending() == 5 * RING_RECORD_SIZE
    reader.consume(used)
    assert fake.consumer() == used and reader.pending() == 0


def test_ring_record_wrapping_around_the_end_is_read_whole(ring):
    fake, reader = ring
    # start two and a half records before the end of the data area
    start = fake.size - 2 * RING_RECORD_SIZE - RING_RECORD_SIZE // 2 - 4
    start -= start % 8
    fake.set_consumer(start)
    for i in range(4):
        fake.record(event_bytes(i, comm=b"wrap%d" % i))
    events, used = Decoder().decode_block(reader.read_block(1 << 20, EVENT_SIZE))
    assert [e.comm for e in events] == ["wrap0", "wrap1", "wrap2", "wrap3"]
    assert [e.sport for e in events] == [40000, 40001, 40002, 40003]
    reader.consume(used)
    assert fake.consumer() == start + 4 * RING_RECORD_SIZE


def test_ring_stops_before_a_busy_record_and_resumes_once_committed(ring):
    fake, reader = ring
    fake.record(event_bytes(0))
    busy_at = fake.record(event_bytes(1), busy=True)
    fake.record(event_bytes(2))
    events, used = Decoder().decode_block(reader.read_block(1 << 20, EVENT_SIZE))
    assert [e.pid for e in events] == [100]
    reader.consume(used)
    assert not reader.skip_foreign(EVENT_SIZE), "a busy record of ours must never be skipped"
    fake.commit(busy_at, EVENT_SIZE)
    events, used = Decoder().decode_block(reader.read_block(1 << 20, EVENT_SIZE))
    assert [e.pid for e in events] == [101, 102]


def test_ring_skips_discarded_and_foreign_records_but_not_ours(ring):
    fake, reader = ring
    fake.record(event_bytes(0), discard=True)
    fake.record(b"x" * 20)                      # a foreign size
    fake.record(event_bytes(2))
    assert reader.read_block(1 << 20, EVENT_SIZE) == b""
    assert reader.skip_foreign(EVENT_SIZE)      # the whole run of foreign records at once
    assert not reader.skip_foreign(EVENT_SIZE), "our committed record is not foreign"
    assert reader.foreign == 2
    events, _ = Decoder().decode_block(reader.read_block(1 << 20, EVENT_SIZE))
    assert [e.pid for e in events] == [102]


def test_ring_skips_a_long_run_of_discarded_records_in_one_call_and_stops_at_a_busy_one(ring):
    # a kernel filter that drops most events (the state and duration filters
    # discard a reserved record) leaves thousands of discarded records in a row
    fake, reader = ring
    n = (fake.size // 2) // RING_RECORD_SIZE
    for i in range(n):
        fake.record(event_bytes(i), discard=True)
    busy_at = fake.record(event_bytes(7), busy=True)
    fake.record(event_bytes(8), discard=True)
    assert reader.read_block(1 << 20, EVENT_SIZE) == b""
    assert reader.skip_foreign(EVENT_SIZE)
    assert reader.foreign == n
    assert not reader.skip_foreign(EVENT_SIZE), "a busy record of ours must never be skipped"
    fake.commit(busy_at, EVENT_SIZE)
    events, used = Decoder().decode_block(reader.read_block(1 << 20, EVENT_SIZE))
    assert [e.pid for e in events] == [107]


def test_ring_block_is_bounded_by_max_bytes(ring):
    fake, reader = ring
    for i in range(10):
        fake.record(event_bytes(i))
    block = reader.read_block(3 * RING_RECORD_SIZE + 5, EVENT_SIZE)
    assert len(block) == 3 * RING_RECORD_SIZE


def test_ring_size_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        RingBufferReader(-1, 3 * PAGE)


# -- perf buffer ---------------------------------------------------------------------------

class FakePerf:
    """One CPU's perf mapping: struct perf_event_mmap_page, then data pages."""

    def __init__(self, pages: int) -> None:
        self.size = pages * PAGE
        self.fd = os.memfd_create("perf")
        os.ftruncate(self.fd, PAGE + self.size)
        self.mm = mmap.mmap(self.fd, PAGE + self.size)
        struct.pack_into("<QQ", self.mm, 1040, PAGE, self.size)
        self.head = 0

    def put(self, record: bytes) -> None:
        for i, b in enumerate(record):
            self.mm[PAGE + (self.head + i) % self.size] = b
        self.head += len(record)
        struct.pack_into("<Q", self.mm, 1024, self.head)

    def sample(self, payload: bytes) -> None:
        raw = struct.pack("<I", len(payload)) + payload
        raw += b"\0" * (-(8 + len(raw)) % 8)
        self.put(struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 8 + len(raw)) + raw)

    def lost(self, n: int) -> None:
        self.put(struct.pack("<IHHQQ", PERF_RECORD_LOST, 0, 24, 1, n))

    def tail(self) -> int:
        return struct.unpack_from("<Q", self.mm, 1032)[0]


def test_perf_reader_samples_losses_and_wrap_around():
    sample_size = -(-(12 + EVENT_SIZE) // 8) * 8      # header + size word + event, 8-aligned
    fake = FakePerf(1)
    reader = PerfBufferReader({0: fake.fd}, 1)
    try:
        fake.sample(event_bytes(0))
        fake.lost(3)
        assert len(reader.read(EVENT_SIZE)) == 1 and reader.lost == 3
        assert fake.tail() == fake.head
        # move the positions close to the end of the data area, then write
        # samples that wrap around it
        while fake.head % fake.size < fake.size - 2 * sample_size:
            fake.sample(event_bytes(0))
            reader.read(EVENT_SIZE)
        for i in range(3):
            fake.sample(event_bytes(i + 1))
        assert fake.head % fake.size < 3 * sample_size, "the samples wrapped"
        samples = reader.read(EVENT_SIZE)
        events = Decoder().decode(b"".join(samples), range(0, len(samples) * EVENT_SIZE, EVENT_SIZE))
        assert [e.pid for e in events] == [101, 102, 103]
    finally:
        reader.close()
        fake.mm.close()
        os.close(fake.fd)


def test_perf_reader_never_loops_on_a_corrupt_record_size():
    fake = FakePerf(1)
    reader = PerfBufferReader({0: fake.fd}, 1)
    try:
        fake.put(struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 0) + b"\0" * 8)   # size 0
        assert reader.read(EVENT_SIZE) == []
        assert fake.tail() == fake.head
    finally:
        reader.close()
        fake.mm.close()
        os.close(fake.fd)


def test_perf_reader_never_hands_over_a_sample_its_head_cuts_short():
    """A head that ends inside a record (seen once in ~25 perf-buffer storms
    with buffer_pages = 1: the reader handed a 28-byte sample to the decoder,
    whose struct.error ended the run as an internal error). The real kernel
    cannot be made to show it on demand, hence the memory-file buffer: the
    whole records are read, the cut one is left and read once it is whole."""
    fake = FakePerf(1)
    reader = PerfBufferReader({0: fake.fd}, 1)
    try:
        fake.sample(event_bytes(0))
        fake.sample(event_bytes(1))
        whole = fake.head
        # the second sample published only in part
        struct.pack_into("<Q", fake.mm, 1024, whole - 40)
        samples = reader.read(EVENT_SIZE)
        assert [len(x) for x in samples] == [EVENT_SIZE]
        assert fake.tail() < whole - 40, "the cut record stays unread"
        struct.pack_into("<Q", fake.mm, 1024, whole)
        samples += reader.read(EVENT_SIZE)
        events = Decoder().decode(b"".join(samples), range(0, len(samples) * EVENT_SIZE, EVENT_SIZE))
        assert [e.pid for e in events] == [100, 101] and fake.tail() == whole
    finally:
        reader.close()
        fake.mm.close()
        os.close(fake.fd)


# -- decoder -------------------------------------------------------------------------------

def test_decoder_fields_unknown_span_ipv6_and_hostile_comm():
    block = b"".join(struct.pack("<II", EVENT_SIZE, 0) + e for e in (
        event_bytes(0, span=SPAN_UNKNOWN, comm=b"a\nb\x1b[31m"),
        event_bytes(1, family=socket.AF_INET6, span=5),
    ))
    events, used = Decoder().decode_block(block + struct.pack("<II", 12, 0) + b"\0" * EVENT_SIZE)
    assert used == 2 * RING_RECORD_SIZE, "decoding stops at the first record that is not ours"
    first, second = events
    assert first.span_ns is None and first.comm == "a\\x0ab\\x1b[31m"
    assert (first.saddr, first.sport, first.daddr, first.dport) == ("127.0.0.1", 40000, "127.0.0.1", 80)
    assert (first.oldstate, first.newstate, first.cgroup_id, first.tid) == (7, 2, 7, 200)
    assert second.saddr == "::1" and second.span_ns == 5 and second.family == socket.AF_INET6


EVENT_FIELDS = ["ts_ns", "skaddr", "span_ns", "cgroup_id", "pid", "tid", "sport", "dport", "family",
                "oldstate", "newstate", "saddr", "daddr", "comm"]
OWNER_FIELDS = ["owner_start_ns", "owner_cgroup_id", "owner_pid", "owner_how", "owner_comm"]
CONN_FIELDS = ["start_ns", "last_ns", "state_ns", "first_state", "complete", "closed", "error_flags", "error"]
CPU_FIELDS = ["hits", "done", "start_ns", "filtered", "ringed", "spilled", "drops", "reserved", "running",
              "nested_other"]
AGG_FIELDS = ["events", "state_sum_ns", "state_hist", "transitions", "extra_sum_ns", "extra_hist"]
C_CONSTANTS = ["TCPSTATES_NSTATES", "TCPSTATES_AGG_BUCKETS", "TCPSTATES_AGG_EXTRA",
               "TCPSTATES_AGG_HANDSHAKE", "TCPSTATES_AGG_LIFETIME"]


def _compile_and_run(tmp_path, body: str) -> str:
    """Compile a C program including bpf/tcpstates.h (as the BPF side does) and run it."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler: apt-get install gcc (./test.sh installs it)")
    prog = tmp_path / "layout.c"
    prog.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <string.h>\n"
        "typedef uint64_t u64; typedef uint32_t u32; typedef uint16_t u16; typedef uint8_t u8; typedef int32_t s32;\n"
        '#include "tcpstates.h"\n'
        '#define F(s, f) printf("%s %s %zu %zu\\n", #s, #f, offsetof(struct s, f), sizeof(((struct s *)0)->f));\n'
        '#define S(s) printf("%s sizeof %zu 0\\n", #s, sizeof(struct s));\n'
        '#define K(k) printf("const %s %d 0\\n", #k, (int)(k));\n'
        "int main(void) {\n" + body + "return 0; }\n")
    subprocess.run([cc, "-Wall", "-I", str(bpf_source_dir()), "-o", str(tmp_path / "layout"), str(prog)],
                   check=True)
    return subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout


def _c_layouts(tmp_path) -> dict[str, dict[str, tuple[int, int]]]:
    """struct → member → (offset, size), "sizeof" → (size, 0); "const" → name → (value, 0)."""
    members = {"tcpstates_event": EVENT_FIELDS + OWNER_FIELDS,
               "tcpstates_conn_event": [f"ev.{f}" for f in EVENT_FIELDS + OWNER_FIELDS] + CONN_FIELDS,
               "tcpstates_cpu": CPU_FIELDS, "tcpstates_agg": AGG_FIELDS}
    body = "".join(f"F({s}, {f})\n" for s, fs in members.items() for f in fs)
    body += "".join(f"S({s})\n" for s in members) + "".join(f"K({k})\n" for k in C_CONSTANTS)
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for line in _compile_and_run(tmp_path, body).splitlines():
        struct_name, member, a, b = line.split()
        out.setdefault(struct_name, {})[member] = (int(a), int(b))
    return out


def _py_layout(fmt: str, split: bool = False) -> list[tuple[int, int]]:
    """(offset, size) of each item of a struct format, in order; `split`: "8Q"
    is eight items (eight fields), not one (an array)."""
    items = _format_items(fmt)
    if split:
        items = [one for item in items
                 for one in ([item[-1]] * int(item[:-1]) if item[:-1] and item[-1] not in "sx" else [item])]
    layout, offset = [], 0
    for item in items:
        size = struct.calcsize("<" + item)
        layout.append((offset, size))
        offset += size
    return layout


def _owner_tail(c: dict[str, tuple[int, int]], prefix: str = "") -> tuple[int, int]:
    """The owner fields as one span, as the decoder hands them on ("40s")."""
    start = c[prefix + "owner_start_ns"][0]
    last = c[prefix + "owner_comm"]
    return start, last[0] + last[1] - start


def test_c_record_layout_matches_the_decoder(tmp_path):
    """Compile bpf/tcpstates.h with the C compiler: every field of every record
    user space reads — the event with its owner tail, the connection record, the
    per-CPU state and the aggregates — must sit where the Python unpacks it."""
    from tcpstates.plugins.kernel import aggregates, conndecoder, cpustate
    from tcpstates.plugins.owner.enricher import RAW_OWNER

    c = _c_layouts(tmp_path)
    const = {k: v for k, (v, _) in c["const"].items()}
    # the event: 14 fields, then the owner tail the decoder hands on undecoded
    ev = c["tcpstates_event"]
    assert [ev[f] for f in EVENT_FIELDS] + [_owner_tail(ev)] == _py_layout(EVENT_STRUCT.format)
    assert ev["sizeof"][0] == EVENT_SIZE
    # the owner tail, field by field, as the owner enricher unpacks it
    tail_start, tail_size = _owner_tail(ev)
    assert [(ev[f][0] - tail_start, ev[f][1]) for f in OWNER_FIELDS] == _py_layout(RAW_OWNER.format)
    assert tail_size == RAW_OWNER.size
    # the connection record: the event, then start/last, state_ns[16], four flags, the error
    conn = c["tcpstates_conn_event"]
    want = ([conn[f"ev.{f}"] for f in EVENT_FIELDS] + [_owner_tail(conn, "ev.")]
            + [conn[f] for f in CONN_FIELDS])
    assert want == _py_layout(conndecoder.CONN_STRUCT.format)
    assert conn["sizeof"][0] == conndecoder.CONN_SIZE and const["TCPSTATES_NSTATES"] == conndecoder.NSTATES
    # the per-CPU state: ten u64, the first seven named as cpustate reads them, the
    # tenth where the probe reads it, the row padded to 128 bytes (its own cache lines)
    cpu = c["tcpstates_cpu"]
    assert [cpu[f] for f in CPU_FIELDS] == _py_layout(cpustate.CPU_STATE.format, split=True)
    assert tuple(CPU_FIELDS[:len(cpustate.FIELDS)]) == cpustate.FIELDS
    assert cpu["sizeof"][0] == cpustate.CPU_STATE_SIZE == 128
    assert CPU_FIELDS[cpustate.NESTED_OTHER] == "nested_other"
    # the aggregates: one flat row of u64 words (what C writes is read back below)
    assert c["tcpstates_agg"]["sizeof"][0] == aggregates.AGG_SIZE
    assert (const["TCPSTATES_AGG_BUCKETS"], const["TCPSTATES_AGG_EXTRA"]) == (aggregates.BUCKETS,
                                                                              len(aggregates.EXTRA))
    assert (const["TCPSTATES_AGG_HANDSHAKE"], const["TCPSTATES_AGG_LIFETIME"]) == (
        aggregates.EXTRA.index("handshake"), aggregates.EXTRA.index("lifetime"))


def test_aggregates_written_by_c_read_back_by_the_reader(tmp_path):
    """A struct tcpstates_agg filled in C, each array with a value at a distinct
    index, is read by AggregateReader.snapshot() (its words, as the mapping holds
    them) into exactly those histograms and counts."""
    from tcpstates.plugins.kernel import aggregates
    out = _compile_and_run(tmp_path, """
        struct tcpstates_agg a; memset(&a, 0, sizeof a);
        a.events = 3; a.state_sum_ns[4] = 1000; a.state_hist[4][7] = 5; a.transitions[2][7] = 9;
        a.extra_sum_ns[TCPSTATES_AGG_LIFETIME] = 77; a.extra_hist[TCPSTATES_AGG_LIFETIME][3] = 6;
        a.extra_hist[TCPSTATES_AGG_HANDSHAKE][2] = 8;
        const unsigned char *p = (const unsigned char *)&a;
        for (size_t i = 0; i < sizeof a; i++) printf("%02x", p[i]);
        """)
    reader = aggregates.AggregateReader.__new__(aggregates.AggregateReader)   # no BPF maps: bytes
    reader.ncpus = 1
    reader._agg = bytes.fromhex(out)
    reader._ports = bytes(2 * aggregates.PORTS * 8)
    snap = reader.snapshot()
    assert snap.events == 3 and snap.transitions == {(2, 7): 9}
    assert list(snap.states) == [4] and snap.states[4].sum_ns == 1000
    assert snap.states[4].buckets == [5 if i == 7 else 0 for i in range(aggregates.BUCKETS)]
    assert snap.extra["lifetime"].sum_ns == 77 and snap.extra["lifetime"].buckets[3] == 6
    assert snap.extra["handshake"].buckets[2] == 8 and snap.extra["handshake"].count == 8


def _format_items(fmt: str) -> list[str]:
    """'<QQ16s' → ['Q', 'Q', '16s']."""
    items, count = [], ""
    for ch in fmt.lstrip("<=!>@"):
        if ch.isdigit():
            count += ch
        else:
            items.append(count + ch)
            count = ""
    return items


# -- cflags and overrides ---------------------------------------------------------------------

def test_cflags_carry_exactly_the_switches_asked_for(tmp_path):
    plain = build_cflags(tmp_path, max_sockets=1024, ring_pages=64, buffer="ring", filter_lport=False,
                         filter_dport=False, family=None, no_wakeup=False)
    assert plain == [f"-I{tmp_path}", "-DTCPSTATES_MAX_SOCKETS=1024", "-DTCPSTATES_RINGBUF_PAGES=64",
                     "-Wno-macro-redefined"]
    full = build_cflags(tmp_path, max_sockets=2048, ring_pages=8, buffer="perf", filter_lport=True,
                        filter_dport=True, family=socket.AF_INET6, no_wakeup=True)
    assert set(full) - set(plain) >= {"-DTCPSTATES_PERF_BUFFER=1", "-DTCPSTATES_FILTER_LPORT=1",
                                      "-DTCPSTATES_FILTER_DPORT=1", "-DTCPSTATES_FAMILY=10",
                                      "-DTCPSTATES_WAKEUP_FLAGS=1", "-DTCPSTATES_MAX_SOCKETS=2048"}
    assert "-DTCPSTATES_MAX_SOCKETS=1024" not in full


@pytest.mark.parametrize("text,parts,value", [
    ("sinks.text.wide=true", ["sinks", "text", "wide"], True),
    ("sinks.a.path=/tmp/x.jsonl", ["sinks", "a", "path"], "/tmp/x.jsonl"),
    ("chain.0.min_ms=1.5", ["chain", "0", "min_ms"], 1.5),
    ("tcpstates.sinks=[\"a\", \"b\"]", ["tcpstates", "sinks"], ["a", "b"]),
    ("sinks.a.tag=\"x=y\"", ["sinks", "a", "tag"], "x=y"),
    ("sinks.a.tag=x=y", ["sinks", "a", "tag"], "x=y"),
])
def test_override_parsing(text, parts, value):
    assert parse_override(text) == (parts, value)


@pytest.mark.parametrize("text", ["novalue", "=1", "a..b=1", ".a=1"])
def test_bad_overrides_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_override(text)


def test_override_addresses_chain_entries_by_index_only():
    tree = {"chain": [{"use": "duration"}]}
    apply_override(tree, ["chain", "0", "min_ms"], 5.0)
    assert tree["chain"][0]["min_ms"] == 5.0
    for parts in (["chain", "1", "x"], ["chain", "x", "y"], ["chain", "v"]):
        with pytest.raises(UsageError):
            apply_override(tree, parts, 1)


def _header_tree(root, name, kconfig=False, generated=False):
    tree = root / name
    (tree / "include" / "linux").mkdir(parents=True)
    if kconfig:
        (tree / "include" / "linux" / "kconfig.h").write_text("/* kconfig */\n")
    if generated:
        (tree / "include" / "generated").mkdir()
    return tree


def test_generic_headers_ubuntu_picks_the_configured_tree_not_its_common_half(tmp_path):
    # Ubuntu: linux-headers-V (common: kconfig.h, no autoconf) + linux-headers-V-generic (complete)
    _header_tree(tmp_path, "linux-headers-6.8.0-151", kconfig=True)
    generic = _header_tree(tmp_path, "linux-headers-6.8.0-151-generic", kconfig=True, generated=True)
    assert generic_trees(tmp_path) == [(generic, None)]


def test_generic_headers_debian_pairs_the_arch_tree_with_its_common_tree(tmp_path):
    common = _header_tree(tmp_path, "linux-headers-6.1.0-56-common", kconfig=True)
    arch = _header_tree(tmp_path, "linux-headers-6.1.0-56-amd64", generated=True)
    _header_tree(tmp_path, "linux-headers-6.1.0-55-amd64", generated=True)   # its common is gone
    assert generic_trees(tmp_path) == [(arch, common)]


@pytest.mark.parametrize("version, needs", [("0.18.0", True), ("0.25.0", True), ("0.26.0", False),
                                            ("0.29.1", False), ("1.0", False), ("?", False)])
def test_only_bcc_before_0_26_needs_the_debugfs_tracing_path(version, needs):
    assert bcc_needs_debugfs(version) is needs


def test_recursion_misses_are_read_again_through_the_descriptor_kept_from_the_start():
    """The program's fdinfo is opened once (as root, before --user drops it and
    leaves the process non-dumpable) and re-read from offset 0 each time: the
    second reading sees the new count, never the end of the first one."""
    from tcpstates.plugins.kernel.probe import RecursionMisses
    r, w = os.pipe()
    counter = RecursionMisses(r)          # a real fdinfo: no such line, so 0
    assert counter.fd >= 0 and counter.read() == 0
    counter.close()
    memfd = os.memfd_create("fdinfo")
    os.write(memfd, b"prog_type:\t5\nrecursion_misses:\t7\n")
    counter = RecursionMisses(memfd)
    os.close(counter.fd)
    counter.fd = os.dup(memfd)            # a stand-in with the line the kernel writes
    assert (counter.read(), counter.read()) == (7, 7)
    os.pwrite(memfd, b"prog_type:\t5\nrecursion_misses:\t9\n", 0)
    assert counter.read() == 9
    counter.close()
    assert counter.fd == -1 and counter.read() == 0
    for fd in (r, w, memfd):
        os.close(fd)


class _Fixed:
    """A stand-in for the kernel's counters (RecursionMisses, CpuState): fixed
    values, since no real nesting can be had on demand for a unit test."""

    def __init__(self, misses: int, rows: list[tuple[int, ...]]) -> None:
        self._misses, self._rows = misses, rows

    def read(self) -> int:
        return self._misses

    def rows(self) -> list[tuple[int, ...]]:
        return self._rows

    def totals(self) -> dict[str, int]:
        return {}


def _row(hits: int = 0, nested_other: int = 0) -> tuple[int, ...]:
    return (hits, hits, 0, 0, hits, 0, 0, 0, 0, nested_other)


@pytest.mark.parametrize("misses, rescue_rows, lost", [
    (10, [_row(3, 2), _row(1, 0)], 4),     # 3 + 1 rescued, 2 of MPTCP/SCTP sockets: 4 lost
    (5, [_row(2, 3), _row(0, 0)], 0),      # every skip taken or not TCP's
    (0, [_row(0, 0), _row(0, 0)], 0),      # nothing skipped
    (1, [_row(2, 0), _row(0, 0)], 0),      # the test-only nesting fake: rescues no miss counts
])
def test_kernel_misses_are_the_skips_nobody_took_and_not_tcp_ones_are_not_lost(misses, rescue_rows, lost):
    from tcpstates.plugins.kernel.probe import KernelProbe
    probe = object.__new__(KernelProbe)      # the accounting only, without a kernel
    probe.ncpus = 2
    main_rows = [_row(100), _row(50)]
    probe.misses = _Fixed(misses, [])
    probe.cpu = _Fixed(0, main_rows + rescue_rows)
    got, rows = probe._misses_and_rows()
    assert got == lost and rows == main_rows + rescue_rows
    assert probe._seen()[2] == lost
    assert probe.kernel_counts()["not_tcp_when_nested"] == sum(r[9] for r in rescue_rows)
