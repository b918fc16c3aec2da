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

    def __init__(self, map_fd: int, size: int, *, epoll: bool = True) -> None:
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
        self.foreign = 0
        self._epoll = select.epoll()
        self._drain_fds: set[int] = set()
        if epoll:   # False only for tests over a plain memory file (not pollable)
            self._epoll.register(map_fd, select.EPOLLIN)

    def register_wakeup_fd(self, fd: int, drain: bool = True) -> None:
        """Also wake `wait` when `fd` becomes readable. `drain`: it is a
        non-blocking pipe (signal wake-ups) to empty after each wake."""
        self._epoll.register(fd, select.EPOLLIN)
        if drain:
            self._drain_fds.add(fd)

    def wait(self, timeout: float) -> set[int]:
        """Sleep until the kernel signals data, a wake-up fd fires, or timeout;
        the fds that fired."""
        fired = set()
        for fd, _ in self._epoll.poll(timeout):
            fired.add(fd)
            if fd in self._drain_fds:
                # empty the wake-up pipe, or epoll stays ready
                try:
                    while os.read(fd, 4096):
                        pass
                except BlockingIOError:
                    pass
        return fired

    def pending(self) -> int:
        """Bytes published by the producer and not yet consumed."""
        return _U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def read_block(self, max_bytes: int, record_size: int) -> bytes:
        """A copy of the committed records at the consumer position, back to back.

        For rings whose records all have `record_size` bytes (ours): the
        block ends before the first record that is reserved but not yet
        submitted. Two copies, on purpose: the first finds which headers are
        committed; only then is the data copied. A single copy is not safe:
        memcpy may load a record's tail before its header (glibc loads the
        last vector first), so a record committed during the copy could pair
        a fresh header with stale data — a silently wrong event.
        """
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._producer, 0)[0]
        step = record_size + HEADER_SIZE
        n = min(prod - cons, max_bytes)
        n -= n % step
        if n <= 0:
            return b""
        start = self._data_start + (cons & self._mask)
        first = self._producer[start:start + n]
        lengths = memoryview(first).cast("I")[::step // 4].tolist()
        if lengths.count(record_size) != len(lengths):
            committed = 0
            for length in lengths:
                if length != record_size:
                    break
                committed += 1
            n = committed * step
        return self._producer[start:start + n]

    def consume(self, nbytes: int) -> None:
        """Release `nbytes` from the consumer position to the kernel."""
        if nbytes:
            cons = _U64.unpack_from(self._consumer, 0)[0]
            # an aligned u64 store through the mapping is a single store on
            # x86 and arm64; the kernel reads consumer_pos with acquire semantics
            _U64.pack_into(self._consumer, 0, cons + nbytes)

    def skip_foreign(self, record_size: int) -> bool:
        """At records that are not ours (discarded — a filter in the kernel
        dropped the event after reserving it — or not `record_size` bytes):
        skip every one of them up to the next record of ours and return True.
        A record of ours — busy, or committed since the caller looked — is
        never skipped: False when the first one is ours.

        The whole run at once: a filter that drops most events leaves long
        runs of discarded records, and one read per record made a storm
        cost a reader call each (and once recursed past Python's limit).
        """
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._producer, 0)[0]
        pos, skipped = cons, 0
        while pos < prod:
            length = _U32.unpack_from(self._producer, self._data_start + (pos & self._mask))[0]
            if length & BUSY_BIT or length == record_size:
                break
            pos += ((length & ~(BUSY_BIT | DISCARD_BIT)) + HEADER_SIZE + 7) & ~7
            skipped += 1
        if not skipped:
            return False
        self.consume(pos - cons)
        self.foreign += skipped
        return True

    def close(self) -> None:
        self._epoll.close()
        self._consumer.close()
        self._producer.close()
