"""Batch reader for a BPF ring buffer, straight from its memory mapping.

bcc's `open_ring_buffer` calls back into Python through ctypes once per
record, which costs more than everything else we do per event. The ring
buffer is designed to be consumed without the kernel: the consumer position
page is mapped read-write, the producer position and the data pages
read-only, and the data area is mapped twice in a row so a record that wraps
around the end is still contiguous. We walk the records in one pass, hand
the whole batch back as (buffer, offsets), then publish the new consumer
position, which is what lets the kernel reuse the space.

Layout (kernel/bpf/ringbuf.c, include/uapi/linux/bpf.h):
  offset 0            consumer_pos (u64), one page, PROT_READ|PROT_WRITE
  offset PAGE_SIZE    producer_pos (u64), one page, PROT_READ
  offset 2*PAGE_SIZE  data, size bytes, mapped twice
  record header       u32 len (bit 31 busy, bit 30 discard), u32 page offset
"""

from __future__ import annotations

import mmap
import os
import select
import struct

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBufferReader:
    """Consumes one BPF_MAP_TYPE_RINGBUF map given its fd and data size."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size must be a power of two, got {size}")
        page = mmap.PAGESIZE
        self.fd = map_fd
        self.size = size
        self._mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._data_start = page
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def register_wakeup_fd(self, fd: int) -> None:
        """Also wake `wait` when `fd` becomes readable (signal wake-up pipe)."""
        self._epoll.register(fd, select.EPOLLIN)

    def wait(self, timeout: float) -> None:
        """Sleep until the kernel signals data, a wake-up fd fires, or timeout."""
        for fd, _ in self._epoll.poll(timeout):
            if fd != self.fd:
                # drain the (non-blocking) wake-up pipe, or epoll stays ready
                try:
                    while os.read(fd, 4096):
                        pass
                except BlockingIOError:
                    pass

    def pending(self) -> int:
        """Bytes published by the producer and not yet consumed."""
        return _U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def read(self, record_size: int, max_records: int = 1 << 30) -> tuple[mmap.mmap, list[int]]:
        """Offsets of the committed records in the mapping, oldest first.

        The records stay valid until `commit()`; the caller decodes them from
        the returned mapping and then commits. Only records of exactly
        `record_size` bytes are returned (ours are fixed-size); others are
        skipped and counted in `foreign`.
        """
        mm = self._producer
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(mm, 0)[0]
        base = self._data_start
        mask = self._mask
        offsets = []
        append = offsets.append
        unpack_len = _U32.unpack_from
        while cons < prod and len(offsets) < max_records:
            hdr = base + (cons & mask)
            length = unpack_len(mm, hdr)[0]
            if length & BUSY_BIT:
                break   # reserved but not yet submitted: later records wait too
            real = length & ~(BUSY_BIT | DISCARD_BIT)
            if not length & DISCARD_BIT and real == record_size:
                append(hdr + HEADER_SIZE)
            cons += (real + HEADER_SIZE + 7) & ~7
        self._next_consumer = cons
        return mm, offsets

    def commit(self) -> None:
        """Release everything returned by the last `read()` to the kernel."""
        # x86 and arm64 stores of an aligned u64 through mmap are single
        # stores; the kernel reads consumer_pos with smp_load_acquire.
        _U64.pack_into(self._consumer, 0, self._next_consumer)

    def close(self) -> None:
        self._epoll.close()
        self._consumer.close()
        self._producer.close()
