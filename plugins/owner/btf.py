"""A minimal pure-Python reader of the running kernel's BTF (/sys/kernel/btf/vmlinux).

Enough to find byte offsets and sizes of (possibly nested, anonymous-union)
struct members, e.g. task_struct -> group_leader, so the owner probes read the
running kernel's own layout (passed to the BPF compile as -D flags) and never
a header tree's. No dependencies; ~0.3 s to index vmlinux BTF (~5-6 MB).
"""
from __future__ import annotations

import struct
from typing import Any

BTF_MAGIC = 0xEB9F
# kind numbers (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, \
    FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(1, 20)
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BTFError(Exception):
    pass


class BTF:
    def __init__(self, data: bytes):
        magic, version, flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError("not little-endian BTF (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: list[Any] = [None]   # id 0 is void; else (kind, name_off, size_or_type, kflag, extra)
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        u = struct.unpack_from
        while pos < end:
            name_off, info, size_or_type = u("<III", data, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = info >> 31
            extra: Any = None
            if kind == INT:
                pos += 4
            elif kind == ARRAY:
                extra = u("<III", data, pos)          # elem type, index type, nelems
                pos += 12
            elif kind in (STRUCT, UNION):
                extra = [u("<III", data, pos + 12 * i) for i in range(vlen)]
                pos += 12 * vlen
            elif kind == ENUM:
                pos += 8 * vlen
            elif kind == FUNC_PROTO:
                pos += 8 * vlen
            elif kind == VAR:
                pos += 4
            elif kind == DATASEC:
                pos += 12 * vlen
            elif kind == DECL_TAG:
                pos += 4
            elif kind == ENUM64:
                pos += 12 * vlen
            elif kind in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
                pass
            else:
                raise BTFError(f"unknown BTF kind {kind}")
            self.types.append((kind, name_off, size_or_type, kflag, extra))
        self._by_name: dict[tuple[int, str], int] = {}
        for tid, t in enumerate(self.types):
            if t is not None and t[1]:
                self._by_name.setdefault((t[0], self.name(t[1])), tid)

    @classmethod
    def from_file(cls, path: str = "/sys/kernel/btf/vmlinux") -> "BTF":
        with open(path, "rb") as f:
            return cls(f.read())

    def name(self, off: int) -> str:
        end = self.strings.index(b"\0", off)
        return self.strings[off:end].decode()

    def find(self, kind: int, name: str) -> int:
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise BTFError(f"no {name!r} of kind {kind} in BTF") from None

    def strip(self, tid: int) -> int:
        while self.types[tid] is not None and self.types[tid][0] in _MODIFIERS:
            tid = self.types[tid][2]
        return tid

    def sizeof(self, tid: int) -> int:
        tid = self.strip(tid)
        kind, _, size, _, extra = self.types[tid]
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return size
        if kind == PTR:
            return 8
        if kind == ARRAY:
            return extra[2] * self.sizeof(extra[0])
        raise BTFError(f"no size for kind {kind}")

    def _search(self, tid: int, member: str, base_bits: int):
        """Depth-first through anonymous struct/union members; returns
        (bit offset, bitfield size, member type id) or None."""
        tid = self.strip(tid)
        kind, _, _, kflag, members = self.types[tid]
        if kind not in (STRUCT, UNION):
            return None
        for name_off, mtype, off in members:
            bits, bsize = (off & 0xFFFFFF, off >> 24) if kflag else (off, 0)
            mname = self.name(name_off) if name_off else ""
            if mname == member:
                return base_bits + bits, bsize, mtype
            if not mname:
                hit = self._search(mtype, member, base_bits + bits)
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
