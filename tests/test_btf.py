"""The owner plugin's BTF reader: member offsets from a type section built
here byte by byte (so every answer is known), and from the running kernel's
own BTF where it exists."""

from __future__ import annotations

import os
import struct

import pytest

from tcpstates.plugins.owner import btf as B


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
