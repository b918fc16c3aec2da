"""The owner plugin's BTF reader: member offsets from a type section built
here byte by byte (so every answer is known), and from the running kernel's
own BTF where it exists."""

from __future__ import annotations

import os
import struct

import pytest

from tcpstates import btf as B


class Blob:
    """A little-endian BTF blob: types appended in order (ids from 1)."""

    def __init__(self) -> None:
        self.types = b""
        self.strings = b"\0"
        self.count = 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, size_or_type: int, tail: bytes = b"", vlen: int = 0,
            kflag: int = 0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + tail
        self.count += 1
        return self.count

    def struct(self, kind: int, name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        tail = b"".join(struct.pack("<III", self.name(m), t, bits) for m, t, bits in members)
        return self.add(kind, name, size, tail, vlen=len(members))

    def bytes(self) -> bytes:
        hdr = struct.pack("<HBBI", B.BTF_MAGIC, 1, 0, 24)
        return hdr + struct.pack("<IIII", 0, len(self.types), len(self.types), len(self.strings)) \
            + self.types + self.strings


def sample() -> bytes:
    b = Blob()
    u32 = b.add(B.INT, "unsigned int", 4, struct.pack("<I", 32))            # 1
    u64 = b.add(B.INT, "long long unsigned int", 8, struct.pack("<I", 64))  # 2
    ptr = b.add(B.PTR, "", 0)                                                # 3: void *
    typedef = b.add(B.TYPEDEF, "u32_t", u32)                                 # 4
    arr = b.add(B.ARRAY, "", 0, struct.pack("<III", u32, u32, 16))           # 5: u32[16]
    b.add(B.ENUM, "e", 4, struct.pack("<Ii", b.name("E0"), 0), vlen=1)       # 6: skipped over
    anon = b.struct(B.UNION, "", 8, [("alt_a", u64, 0), ("alt_b", ptr, 0)])  # 7
    inner = b.struct(B.STRUCT, "inner", 16, [("x", u32, 0), ("", anon, 64)])  # 8
    b.struct(B.STRUCT, "outer", 96, [("head", typedef, 0), ("in", inner, 64),
                                      ("table", arr, 192), ("tail", u64, 704)])  # 9
    return b.bytes()


def test_member_offsets_and_sizes_through_typedefs_and_anonymous_unions():
    btf = B.BTF(sample())
    assert btf.member("outer", "head") == (0, 4)          # through a typedef
    assert btf.member("outer", "in.x") == (8, 4)
    assert btf.member("outer", "in.alt_a") == (16, 8)     # inside an anonymous union
    assert btf.member("outer", "in.alt_b") == (16, 8)     # a pointer
    assert btf.member("outer", "table") == (24, 64)       # u32[16]
    assert btf.member("outer", "tail") == (88, 8)


def test_missing_names_and_broken_sections_are_btf_errors():
    btf = B.BTF(sample())
    with pytest.raises(B.BTFError, match="no member"):
        btf.member("outer", "in.nope")
    with pytest.raises(B.BTFError, match="no 'absent'"):
        btf.member("absent", "x")
    with pytest.raises(B.BTFError, match="bad magic"):
        B.BTF(b"\0" * 64)
    blob = sample()
    # a section whose length cuts the last record short
    hdr = bytearray(blob)
    type_len = struct.unpack_from("<I", hdr, 12)[0]
    struct.pack_into("<I", hdr, 12, type_len - 4)
    with pytest.raises(B.BTFError, match="record boundary"):
        B.BTF(bytes(hdr))
    # an unknown kind
    bad = Blob()
    bad.add(31, "x", 0)
    with pytest.raises(B.BTFError, match="unknown BTF kind 31"):
        B.BTF(bad.bytes())


def test_bitfields_and_unaligned_members_are_refused():
    blob = Blob()
    u = blob.add(B.INT, "unsigned int", 4, struct.pack("<I", 32))
    tail = struct.pack("<III", blob.name("odd"), u, 3) + struct.pack("<III", blob.name("bf"), u, (4 << 24) | 32)
    blob.add(B.STRUCT, "flags", 8, tail, vlen=2, kflag=1)   # kflag: bitfield sizes in the offsets
    btf = B.BTF(blob.bytes())
    with pytest.raises(B.BTFError, match="not byte aligned"):
        btf.member("flags", "odd")
    with pytest.raises(B.BTFError, match="bitfield"):
        btf.member("flags", "bf")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="this kernel has no BTF")
def test_the_running_kernels_btf_answers_what_the_owner_probes_ask():
    btf = B.BTF.from_file()
    off, size = btf.member("task_struct", "group_leader")
    assert size == 8 and 0 < off < 16384
    off, size = btf.member("sock", "__sk_common.skc_family")
    assert size == 2
    # only what was asked for is decoded
    assert len(btf._decoded) < 200


def _cut(blob: bytes, keep: int) -> bytes:
    return blob[:keep]


def _with_header(blob: bytes, offset: int, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into("<I", out, offset, value)
    return bytes(out)


def _typedef_cycle() -> bytes:
    b = Blob()
    b.add(B.TYPEDEF, "A", 2)
    b.add(B.TYPEDEF, "B", 1)
    b.struct(B.STRUCT, "s", 8, [("a", 1, 0)])
    return b.bytes()


def _self_typedef() -> bytes:
    b = Blob()
    b.add(B.TYPEDEF, "A", 1)
    b.struct(B.STRUCT, "s", 8, [("a", 1, 0)])
    return b.bytes()


def _anonymous_member_of_itself() -> bytes:
    b = Blob()
    b.struct(B.STRUCT, "s", 8, [("", 1, 0)])
    return b.bytes()


def _array_of_itself() -> bytes:
    b = Blob()
    b.add(B.ARRAY, "", 0, struct.pack("<III", 1, 1, 4))
    b.struct(B.STRUCT, "s", 8, [("a", 1, 0)])
    return b.bytes()


def _name_outside_strings() -> bytes:
    b = Blob()
    u = b.add(B.INT, "int", 4, struct.pack("<I", 32))
    b.types += struct.pack("<III", b.name("s"), (B.STRUCT << 24) | 1, 8) + struct.pack("<III", 9999, u, 0)
    return b.bytes()


def _not_utf8_name() -> bytes:
    b = Blob()
    b.strings += b"\xff\xfe\0"
    b.types += struct.pack("<III", 1, B.STRUCT << 24, 8)
    return b.bytes()


def _void_member() -> bytes:
    b = Blob()
    b.add(B.TYPEDEF, "v", 0)
    b.struct(B.STRUCT, "s", 8, [("a", 1, 0)])
    return b.bytes()


def _huge_array() -> bytes:
    b = Blob()
    u = b.add(B.INT, "int", 4, struct.pack("<I", 32))
    a = b.add(B.ARRAY, "", 0, struct.pack("<III", u, u, 2**32 - 1))
    b.struct(B.STRUCT, "s", 8, [("a", a, 0)])
    return b.bytes()


HOSTILE = {
    "empty": lambda: b"",
    "header-cut": lambda: _cut(sample(), 10),
    "types-cut": lambda: _cut(sample(), 40),
    "strings-cut": lambda: _cut(sample(), len(sample()) - 3),
    "hdr-len-huge": lambda: _with_header(sample(), 4, 10**9),
    "str-len-huge": lambda: _with_header(sample(), 20, 10**9),
    "type-len-4": lambda: _with_header(sample(), 12, 4),
    "typedef-cycle": _typedef_cycle,
    "typedef-of-itself": _self_typedef,
    "anonymous-member-of-itself": _anonymous_member_of_itself,
    "array-of-itself": _array_of_itself,
    "name-outside-strings": _name_outside_strings,
    "name-not-utf8": _not_utf8_name,
    "void-member": _void_member,
    "array-of-16-GiB": _huge_array,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_btf_is_a_btf_error_never_a_hang_or_another_exception(case):
    import signal

    def hang(*_):
        raise TimeoutError("the BTF reader hung")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        with pytest.raises(B.BTFError):
            btf = B.BTF(HOSTILE[case]())
            btf.member("s", "a")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_owner_support_with_cyclic_btf_falls_back_in_one_line(tmp_path):
    from tcpstates.plugins.owner import kernel
    b = Blob()
    b.add(B.TYPEDEF, "A", 2)
    b.add(B.TYPEDEF, "B", 1)
    b.struct(B.STRUCT, "task_struct", 8, [("group_leader", 1, 0)])
    path = tmp_path / "vmlinux"
    path.write_bytes(b.bytes())
    s = kernel.owner_support(16, btf_path=str(path), io=False)
    assert not s.identity and "-DTCPSTATES_OWNER_TASK=1" not in s.cflags
    assert any("task offsets in BTF" in m and "cycle" in m for m in s.missing), s.missing


def _owner_btf(protocol_size: int, type_size: int | None, family: bool = True) -> bytes:
    """task_struct as the owner probes need it, and a struct sock whose
    protocol/type/family are as given (sizes in bytes; None: no such member)."""
    b = Blob()
    ints = {n: b.add(B.INT, f"u{8 * n}", n, struct.pack("<I", 8 * n)) for n in (1, 2, 4, 8)}
    ptr = b.add(B.PTR, "", 0)
    comm = b.add(B.ARRAY, "", 0, struct.pack("<III", ints[1], ints[4], 16))
    b.struct(B.STRUCT, "task_struct", 64, [("group_leader", ptr, 0), ("start_boottime", ints[8], 64),
                                           ("comm", comm, 128)])
    common = b.struct(B.STRUCT, "sock_common", 32, [("skc_family" if family else "skc_other", ints[2], 128)])
    members = [("__sk_common", common, 0), ("sk_socket", ptr, 512), ("sk_protocol", ints[protocol_size], 640)]
    if type_size is not None:
        members.append(("sk_type", ints[type_size], 672))
    b.struct(B.STRUCT, "sock", 128, members)
    return b.bytes()


@pytest.mark.parametrize("protocol,type_,family,raw,why", [
    (2, 2, True, True, None),
    (1, 2, True, False, "sock.sk_protocol is 1 bytes, expected 2"),
    (2, 1, True, False, "sock.sk_type is 1 bytes, expected 2"),
    (2, None, True, False, "no member 'sk_type'"),
    (2, 2, False, True, None),           # the family is not read: type and protocol tell TCP
])
def test_raw_send_recv_probes_need_protocol_and_type_at_their_sizes(tmp_path, io_tracefs, protocol, type_,
                                                                         family, raw, why):
    """The raw probes read a socket's protocol and type (a NETLINK_XFRM socket
    has protocol 6 too, but is never a stream): a BTF where one is missing or
    of another size keeps the perf-event form, and says why."""
    from tcpstates.plugins.owner import kernel
    path = tmp_path / "vmlinux"
    path.write_bytes(_owner_btf(protocol, type_, family))
    s = kernel.owner_support(1024, btf_path=str(path))
    assert s.io and s.identity, s.missing
    assert s.io_raw is raw and ("-DTCPSTATES_OWNER_IO_RAW=1" in s.cflags) is raw
    if raw:
        assert {"-DTCPSTATES_OFF_SOCK_SK_PROTOCOL=80", "-DTCPSTATES_OFF_SOCK_SK_TYPE=84"} <= set(s.cflags)
    else:
        said = [m for m in s.missing if "send/recv probes attach as perf-event" in m]
        assert len(said) == 1 and why in said[0], s.missing
        assert "-DTCPSTATES_TP_IO_FAMILY" in " ".join(s.cflags)   # the perf-event form checks it


def _file_btf(member: str, size: int):
    b = Blob()
    u64 = b.add(B.INT, "long unsigned int", size, struct.pack("<I", size * 8))
    b.struct(B.STRUCT, "file", 256, [("f_mode", u64, 0), (member, u64, 176 * 8)])
    return B.BTF(b.bytes())


@pytest.mark.parametrize("member,size,answer", [
    ("f_ref", 8, ["-DTCPSTATES_OFF_FILE_F_REF=176", "-DTCPSTATES_FILE_REF_ONE=0"]),   # file_ref_t, Linux >= 6.13
    ("f_count", 8, ["-DTCPSTATES_OFF_FILE_F_REF=176", "-DTCPSTATES_FILE_REF_ONE=1"]),  # atomic_long_t before
    ("f_count", 4, "is 4 bytes"),           # a 32-bit kernel: no close tracking rather than a misread
    ("f_other", 8, "neither f_ref nor f_count"),
])
def test_the_close_probe_reads_the_file_reference_count_the_kernel_has(member, size, answer):
    from tcpstates.plugins.owner import kernel
    btf = _file_btf(member, size)
    if isinstance(answer, list):
        assert kernel._file_refs(btf) == answer
    else:
        with pytest.raises(kernel.BTFError, match=answer):
            kernel._file_refs(btf)
