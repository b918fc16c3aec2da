#!/usr/bin/env python3
"""User-space cost per event of the hot path, without the kernel.

Builds ring-buffer records in memory exactly as the kernel lays them out,
then times decode → pipeline (no chain) → sink into /dev/null, per sink.
Run by hand: `python bench/hotpath.py`. Figures are µs per event, best of 5.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import sys
import time

from tcpstates.api import RunContext
from tcpstates.plugins.kernel.decoder import EVENT_SIZE, EVENT_STRUCT, Decoder


def records(n: int) -> bytes:
    out = []
    for i in range(n):
        out.append(struct.pack("<II", EVENT_SIZE, 0) + EVENT_STRUCT.pack(
            10**9 + i * 1000, 0xffff888100000000 + (i % 512) * 0x40, (i % 7) * 1000 if i % 5 else 2**64 - 1,
            1, 4000 + i % 3, 4000 + i % 3, 40000 + i % 20000, 8080, 2, 1 + i % 9, 1 + (i + 1) % 9,
            socket.inet_aton("127.0.0.1") + bytes(12), socket.inet_aton("10.1.%d.%d" % (i % 4, i % 200)) + bytes(12),
            b"python3".ljust(16, b"\0"), bytes(40)))
    return b"".join(out)


def conn_records(n: int) -> bytes:
    """Connection records (`--connections`) as the kernel lays them out."""
    from tcpstates.plugins.kernel.conndecoder import CONN_RING_RECORD, CONN_SIZE
    states = [0] * 16
    states[2], states[1], states[4], states[5] = 50_000, 3_000_000, 40_000, 20_000
    out = []
    for i in range(n):
        out.append(CONN_RING_RECORD.pack(
            CONN_SIZE, 0, 10**9 + i * 1000, 0xffff888100000000 + (i % 512) * 0x40, 20_000, 1, 4000 + i % 3,
            4000 + i % 3, 40000 + i % 20000, 8080, 2, 5, 7,
            socket.inet_aton("127.0.0.1") + bytes(12), socket.inet_aton("10.1.%d.%d" % (i % 4, i % 200)) + bytes(12),
            b"python3".ljust(16, b"\0"), bytes(40), 10**9 + i * 1000 - 3_110_000, 10**9 + i * 1000,
            *states, 7, 1, 1, 1, 0))
    return b"".join(out)


def connections() -> None:
    """µs per connection record: decode, then the text and JSON Lines sinks."""
    from tcpstates.plugins.bcc_table.sinks import TextOptions, TextSink
    from tcpstates.plugins.jsonl.sink import JsonlOptions, JsonlSink
    from tcpstates.plugins.kernel.conndecoder import decode_conn_block
    n = 50_000
    data = conn_records(n)
    ctx = RunContext()
    ctx.records = "connection"
    decoder = Decoder()
    best = min(_timed(lambda: decode_conn_block(decoder, data)) for _ in range(5))
    print(f"connections: decode {best / n * 1e6:.2f} µs/record")
    events = decode_conn_block(decoder, data)[0]
    assert len(events) == n
    for name, sink in (("text", TextSink(TextOptions(path=os.devnull), ctx)),
                       ("jsonl", JsonlSink(JsonlOptions(path=os.devnull), ctx))):
        sink.open()
        per = min(_timed(lambda: sink.write(events)) for _ in range(5))
        print(f"connections: {name:5s} sink {per / n * 1e6:.2f} µs/record")


def main() -> None:
    from tcpstates.plugins.bcc_table.sinks import CsvOptions, CsvSink, TextOptions, TextSink
    from tcpstates.plugins.jsonl.sink import JsonlOptions, JsonlSink
    n = 100_000
    data = records(n)
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    ctx = RunContext()
    sinks = {
        "text": TextSink(TextOptions(path=os.devnull), ctx),
        "csv": CsvSink(CsvOptions(path=os.devnull), ctx),
        "jsonl": JsonlSink(JsonlOptions(path=os.devnull), ctx),
    }
    decoder = Decoder()
    best = min(_timed(lambda: decoder.decode_block(data)) for _ in range(5))
    print(f"decode          {best / n * 1e6:.2f} µs/event")
    events, _ = decoder.decode_block(data)
    from tcpstates.plugins.owner.enricher import OwnerEnricher, OwnerOptions
    owner = OwnerEnricher(OwnerOptions(scan_existing=False), ctx)
    per = min(_timed(lambda: owner.observe_batch(decoder.decode_block(data)[0])) for _ in range(5))
    print(f"decode + owner  {per / n * 1e6:.2f} µs/event")
    owned = decoder.decode_block(data)[0]
    owner.observe_batch(owned)
    jl = sinks["jsonl"]
    jl.open()
    per = min(_timed(lambda: jl.write(owned)) for _ in range(5))
    print(f"jsonl sink, events with owner fields {per / n * 1e6:.2f} µs/event")
    for name, sink in sinks.items():
        sink.open()
        if os.environ.get("TCPSTATES_NO_SPEEDUPS"):
            name += "(py)"
        per = min(_timed(lambda: sink.write(events)) for _ in range(5))
        both = min(_timed(lambda: sink.write(decoder.decode_block(data)[0])) for _ in range(5))
        print(f"{name:6s} sink     {per / n * 1e6:.2f} µs/event; decode + sink {both / n * 1e6:.2f}")
    connections()
    sys.stdout.flush()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
