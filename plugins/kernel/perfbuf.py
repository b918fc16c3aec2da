"""Reading BPF perf-event buffers (one per CPU) from their memory mappings.

Used for the spill buffer (records the ring refused) and, on kernels older
than 5.8, for the main event stream. Layout (include/uapi/linux/perf_event.h):
the first page is struct perf_event_mmap_page (data_head at 1024, data_tail
at 1032, data_offset/data_size at 1040/1048), then 2^n data pages. Records
start with struct perf_event_header {u32 type; u16 misc; u16 size} and may
wrap around the end of the data area.
"""

from __future__ import annotations

import mmap
import struct

PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<IHH")


class PerfBufferReader:
    def __init__(self, fds: dict[int, int], page_cnt: int) -> None:
        page = mmap.PAGESIZE
        self.fds = dict(fds)
        self.maps = []
        for fd in self.fds.values():
            mm = mmap.mmap(fd, (page_cnt + 1) * page, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
            offset = _U64.unpack_from(mm, 1040)[0] or page
            size = _U64.unpack_from(mm, 1048)[0] or page_cnt * page
            self.maps.append((mm, offset, size))
        self.lost = 0

    def pending(self) -> bool:
        """Any buffer holds unread records."""
        u64 = _U64.unpack_from
        return any(u64(mm, 1024)[0] != u64(mm, 1032)[0] for mm, _, _ in self.maps)

    def pending_samples(self) -> int:
        """How many samples are waiting (for the exit count of unread records)."""
        n = 0
        for mm, offset, size in self.maps:
            head, tail = _U64.unpack_from(mm, 1024)[0], _U64.unpack_from(mm, 1032)[0]
            while tail < head:
                rtype, _misc, rsize = _HEADER.unpack_from(mm, offset + tail % size)
                if rsize < 8 or tail % size + 8 > size:
                    break
                n += rtype == PERF_RECORD_SAMPLE
                tail += rsize
        return n

    def read(self, sample_size: int) -> list[bytes]:
        """Every pending sample's first `sample_size` bytes; lost counts accumulate."""
        out = []
        for mm, offset, size in self.maps:
            head = _U64.unpack_from(mm, 1024)[0]
            tail = _U64.unpack_from(mm, 1032)[0]
            if head == tail:
                continue
            # (x86/arm64: the kernel publishes data_head after the data with a
            # release store; this load sees the data it covers)
            # read everything between tail and head (wrapping) in one copy
            start = tail % size
            n = head - tail
            if start + n <= size:
                data = mm[offset + start:offset + start + n]
            else:
                data = mm[offset + start:offset + size] + mm[offset:offset + (start + n - size)]
            pos = 0
            while pos + 8 <= len(data):
                rtype, _misc, rsize = _HEADER.unpack_from(data, pos)
                if rsize < 8:
                    pos = n     # corrupt: never loop forever, skip to the head
                    break
                if pos + rsize > len(data):
                    # a record the head we read does not wholly cover: left in
                    # the buffer for the next read, never handed over cut short
                    # (a short sample failed the whole run in the decoder)
                    break
                if rtype == PERF_RECORD_SAMPLE:
                    raw_size = struct.unpack_from("<I", data, pos + 8)[0]
                    if raw_size >= sample_size:
                        out.append(data[pos + 12:pos + 12 + sample_size])
                elif rtype == PERF_RECORD_LOST:
                    self.lost += _U64.unpack_from(data, pos + 16)[0]
                pos += rsize
            # release what was read, whole records only
            _U64.pack_into(mm, 1032, tail + min(pos, n))
        return out

    def close(self) -> None:
        for mm, _, _ in self.maps:
            mm.close()
        self.maps = []
