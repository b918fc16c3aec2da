"""Decoding the kernel stage's raw records into Events, a whole batch at a time.

The record layout is `struct tcpstates_event` in bpf/tcpstates.h; a test checks
that the C layout and `EVENT_STRUCT` agree.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from tcpstates import speedups
from tcpstates.events import AF_INET, Event, sanitize_text

# struct tcpstates_event in bpf/tcpstates.h
# The last 40 bytes are the owner fields (bpf/owner.bpf.h), handed on undecoded
# as extra[KERNEL_OWNER] when not all zero; the owner enricher decodes them.
EVENT_STRUCT = struct.Struct("<QQQQIIHHHBB16s16s16s40s")
EVENT_SIZE = EVENT_STRUCT.size
# A ring-buffer record: u32 length (busy/discard bits), u32 page offset, event.
# 8 + 136 = 144 is a multiple of 8, so records sit back to back.
RING_RECORD = struct.Struct("<II" + EVENT_STRUCT.format[1:])
RING_RECORD_SIZE = RING_RECORD.size
assert RING_RECORD_SIZE % 8 == 0
SPAN_UNKNOWN = (1 << 64) - 1
KERNEL_OWNER = "_kernel_owner"        # extra key of the raw owner fields (private to owner)
NO_OWNER = bytes(40)

_c_decode = speedups.load("tcpstates.plugins.kernel._decode")   # optional (setup.py); the Python path is the reference
C_DECODER_AVAILABLE = _c_decode is not None


class Decoder:
    """Turns raw kernel records into Events, with small caches.

    Addresses and thread names repeat heavily (a busy server talks to few
    peers), so formatting each distinct value once is most of the saving.
    The caches are bounded: they are simply cleared when they grow too big.
    """

    CACHE_LIMIT = 8192

    def __init__(self, use_c: bool = True) -> None:
        self._addr4: dict[bytes, str] = {}
        self._addr6: dict[bytes, str] = {}
        self._comm: dict[bytes, str] = {}
        self.use_c = use_c and _c_decode is not None   # connection records follow the same choice
        if self.use_c:
            self.decode_block = self._decode_block_c    # type: ignore[method-assign]

    def _decode_block_c(self, data: bytes) -> tuple[list[Event], int]:
        # the C decoder asks our caches and slow paths for every text it has
        # not memoised, so the escaping rules stay here (and in tcpstates.text)
        assert _c_decode is not None
        result: tuple[list[Event], int] = _c_decode.decode_block(
            data, Event, self._addr4, self._addr6, self._comm, self._slow_addr, self.comm, KERNEL_OWNER)
        return result

    def comm(self, raw: bytes) -> str:
        text = self._comm.get(raw)
        if text is None:
            if len(self._comm) >= self.CACHE_LIMIT:
                self._comm.clear()
            text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            text = self._comm[raw] = sanitize_text(text)
        return text

    def _slow_addr(self, family: int, raw: bytes) -> str:
        # Any family but AF_INET is rendered as IPv6, as it is looked up in the
        # IPv6 cache: the text is then a function of the raw bytes alone, which
        # the C decoder's memo (shared by every Decoder, outliving the caches)
        # relies on. The kernel only sends AF_INET and AF_INET6; another value
        # (a corrupt record) must not raise and lose the whole block.
        if family == AF_INET:
            cache, text = self._addr4, socket.inet_ntop(AF_INET, raw[:4])
        else:
            cache, text = self._addr6, socket.inet_ntop(socket.AF_INET6, raw)
        if len(cache) >= self.CACHE_LIMIT:
            cache.clear()
        cache[raw] = text
        return text

    def addr(self, family: int, raw: bytes) -> str:
        """An address as text, cached (outside the hot loop)."""
        return (self._addr4 if family == AF_INET else self._addr6).get(raw) or self._slow_addr(family, raw)

    def decode_block(self, data: bytes) -> tuple[list[Event], int]:
        """Decode back-to-back ring records (8-byte header + event) from `data`
        (the C decoder replaces this method when it is available).

        Stops at the first record whose header is not exactly ours (a busy,
        not yet submitted reservation, or a foreign record) and returns the
        events with the number of bytes they occupied.
        """
        usable = len(data) - len(data) % RING_RECORD_SIZE
        a4, a6, comms = self._addr4, self._addr6, self._comm
        slow_addr, slow_comm = self._slow_addr, self.comm
        out: list[Event] = []
        append = out.append
        for (hdr, _pgoff, ts, sk, span, cg, pid, tid, sport, dport, fam, old, new,
             saddr, daddr, rawcomm, owner) in RING_RECORD.iter_unpack(data[:usable] if usable != len(data) else data):
            if hdr != EVENT_SIZE:
                break
            if fam == AF_INET:
                s = a4.get(saddr) or slow_addr(fam, saddr)
                d = a4.get(daddr) or slow_addr(fam, daddr)
            else:
                s = a6.get(saddr) or slow_addr(fam, saddr)
                d = a6.get(daddr) or slow_addr(fam, daddr)
            append(Event(ts, sk, None if span == SPAN_UNKNOWN else span, pid, tid,
                         comms.get(rawcomm) or slow_comm(rawcomm), fam, s, sport, d, dport,
                         old, new, cg, {} if owner == NO_OWNER else {KERNEL_OWNER: owner}))
        return out, len(out) * RING_RECORD_SIZE

    def decode(self, buf: Any, offsets: Any) -> list[Event]:
        """Decode records at `offsets` in `buf` (perf-buffer path, tests)."""
        unpack = EVENT_STRUCT.unpack_from
        out = []
        for off in offsets:
            (ts, sk, span, cg, pid, tid, sport, dport, fam, old, new,
             saddr, daddr, rawcomm, owner) = unpack(buf, off)
            cache = self._addr4 if fam == AF_INET else self._addr6
            s = cache.get(saddr) or self._slow_addr(fam, saddr)
            d = cache.get(daddr) or self._slow_addr(fam, daddr)
            out.append(Event(ts, sk, None if span == SPAN_UNKNOWN else span, pid, tid,
                             self.comm(rawcomm), fam, s, sport, d, dport, old, new, cg,
                             {} if owner == NO_OWNER else {KERNEL_OWNER: owner}))
        return out
