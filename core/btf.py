"""A minimal pure-Python reader of the running kernel's BTF (/sys/kernel/btf/vmlinux).

Enough to find byte offsets and sizes of (possibly nested, anonymous-union)
struct members, e.g. task_struct -> group_leader, so BPF code a plugin
contributes (the owner probes, the kernel stage's connection endings) reads the
running kernel's own layout (passed to the BPF compile as -D flags) and never
a header tree's. Part of the plugin API. No dependencies; ~0.08 s to index vmlinux BTF (~5-6 MB), types decoded on demand.
"""
from __future__ import annotations

import struct
from array import array
from typing import Any

# the running kernel's own BTF (CONFIG_DEBUG_INFO_BTF)
VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F
# kind numbers (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, \
    FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(1, 20)
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
# hostile or corrupt BTF must end in BTFError, never a hang or a RecursionError:
# a modifier chain (typedef of const of ...) and a nesting of anonymous
# members or arrays longer than any real kernel's is refused as a cycle
MAX_CHAIN = 64
MAX_SIZE = 1 << 32     # no kernel struct member is 4 GiB
HEADER = 24


class BTFError(Exception):
    pass


# bytes after the 12-byte common header, per kind (include/uapi/linux/btf.h)
_FIXED_TAIL = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_MEMBER = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_NO_TAIL = frozenset((PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG))


def _record_tail(kind: int, vlen: int) -> int:
    if kind in _PER_MEMBER:
        return _PER_MEMBER[kind] * vlen
    if kind in _FIXED_TAIL:
        return _FIXED_TAIL[kind]
    if kind in _NO_TAIL:
        return 0
    raise BTFError(f"unknown BTF kind {kind}")


class BTF:
    """The type section indexed, not decoded: one pass records where each
    type starts (an array of offsets) and the names of structs;
    a type is decoded when asked for. Decoding all ~130,000 types into
    Python objects cost ~50 MB at start and left ~10 MB behind for the whole
    run, for the handful of members the owner probes need."""

    def __init__(self, data: bytes):
        if len(data) < HEADER:
            raise BTFError(f"{len(data)} bytes: shorter than the BTF header")
        magic, version, flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError("not little-endian BTF (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        if hdr_len < HEADER or hdr_len + max(type_off + type_len, str_off + str_len) > len(data):
            raise BTFError("header or sections beyond the end of the data (truncated?)")
        self.data = data
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.starts = array("Q", [0])    # id 0 is void
        self._by_name: dict[str, int] = {}     # struct name -> its first id (member() starts there)
        self._decoded: dict[int, Any] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        u = struct.unpack_from
        starts = self.starts
        while pos < end:
            if pos + 12 > end:
                raise BTFError("type section does not end on a record boundary")
            name_off, info = u("<II", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind == STRUCT and name_off:
                self._by_name.setdefault(self.name(name_off), len(starts))
            starts.append(pos)
            pos += 12 + _record_tail(kind, vlen)
        if pos != end:
            raise BTFError("type section does not end on a record boundary")

    def _type(self, tid: int) -> Any:
        """(kind, name_off, size_or_type, kflag, extra) of type `tid` (None: void)."""
        if tid == 0:
            return None
        hit = self._decoded.get(tid)
        if hit is not None:
            return hit
        if not 0 < tid < len(self.starts):
            raise BTFError(f"type id {tid} out of range")
        pos = self.starts[tid]
        u = struct.unpack_from
        name_off, info, size_or_type = u("<III", self.data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        extra: Any = None
        if kind == ARRAY:
            extra = u("<III", self.data, pos + 12)          # elem type, index type, nelems
        elif kind in (STRUCT, UNION):
            extra = [u("<III", self.data, pos + 12 + 12 * i) for i in range(vlen)]
        out = self._decoded[tid] = (kind, name_off, size_or_type, kflag, extra)
        return out

    @classmethod
    def from_file(cls, path: str = VMLINUX) -> "BTF":
        with open(path, "rb") as f:
            return cls(f.read())

    def name(self, off: int) -> str:
        end = self.strings.find(b"\0", off)
        if not 0 <= off < len(self.strings) or end < 0:
            raise BTFError(f"name offset {off} outside the string section")
        try:
            return self.strings[off:end].decode()
        except UnicodeDecodeError:
            raise BTFError(f"name at offset {off} is not UTF-8") from None

    def find(self, kind: int, name: str) -> int:
        try:
            if kind != STRUCT:
                raise KeyError(name)     # only structs are looked up by name
            return self._by_name[name]
        except KeyError:
            raise BTFError(f"no {name!r} of kind {kind} in BTF") from None

    def strip(self, tid: int) -> int:
        for _ in range(MAX_CHAIN):
            t = self._type(tid)
            if t is None or t[0] not in _MODIFIERS:
                return tid
            tid = t[2]
        raise BTFError(f"type {tid}: a chain of more than {MAX_CHAIN} typedefs/modifiers (a cycle?)")

    def sizeof(self, tid: int, depth: int = 0) -> int:
        if depth > MAX_CHAIN:
            raise BTFError(f"type {tid}: arrays nested more than {MAX_CHAIN} deep (a cycle?)")
        tid = self.strip(tid)
        t = self._type(tid)
        if t is None:
            raise BTFError("no size for void")
        kind, _, size, _, extra = t
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            out = size
        elif kind == PTR:
            out = 8
        elif kind == ARRAY:
            out = extra[2] * self.sizeof(extra[0], depth + 1)
        else:
            raise BTFError(f"no size for kind {kind}")
        if out > MAX_SIZE:
            raise BTFError(f"type {tid}: {out} bytes is no member's size")
        return out

    def _search(self, tid: int, member: str, base_bits: int, depth: int = 0):
        """Depth-first through anonymous struct/union members; returns
        (bit offset, bitfield size, member type id) or None."""
        if depth > MAX_CHAIN:
            raise BTFError(f"type {tid}: anonymous members nested more than {MAX_CHAIN} deep (a cycle?)")
        tid = self.strip(tid)
        t = self._type(tid)
        if t is None:
            return None
        kind, _, _, kflag, members = t
        if kind not in (STRUCT, UNION):
            return None
        for name_off, mtype, off in members:
            bits, bsize = (off & 0xFFFFFF, off >> 24) if kflag else (off, 0)
            mname = self.name(name_off) if name_off else ""
            if mname == member:
                return base_bits + bits, bsize, mtype
            if not mname:
                hit = self._search(mtype, member, base_bits + bits, depth + 1)
                if hit:
                    return hit
        return None

    def member(self, struct_name: str, path: str) -> tuple[int, int]:
        """(byte offset, byte size) of a dotted member path such as
        '__sk_common.skc_dport' in struct struct_name."""
        tid = self.find(STRUCT, struct_name)
        bits = 0
        for part in path.split("."):
            hit = self._search(tid, part, 0)
            if hit is None:
                raise BTFError(f"struct {struct_name} has no member {path!r} ({part!r})")
            b, bsize, tid = hit
            if bsize:
                raise BTFError(f"{struct_name}.{path} is a bitfield")
            bits += b
        if bits % 8:
            raise BTFError(f"{struct_name}.{path} is not byte aligned")
        return bits // 8, self.sizeof(tid)


def offset_cflags(btf: BTF, fields: dict[str, tuple[str, str]],
                  sizes: dict[str, int]) -> list[str]:
    """`-DTCPSTATES_OFF_<NAME>=<byte offset>` for each NAME -> (struct, member
    path) of fields; a member whose size differs from sizes[NAME] (what the C
    reads) raises BTFError, so a probe never reads half of a member or past it."""
    out = []
    for macro, (struct_name, member) in fields.items():
        off, size = btf.member(struct_name, member)
        if macro in sizes and size != sizes[macro]:
            raise BTFError(f"{struct_name}.{member} is {size} bytes, expected {sizes[macro]}")
        out.append(f"-DTCPSTATES_OFF_{macro}={off}")
    return out
