#!/usr/bin/env python3
"""Instructions per event of decode + one sink, counted by callgrind (repeatable
on a busy machine, unlike seconds). Per-event figure = (count with R batches -
count with 1 batch) / ((R - 1) * N):

    valgrind --tool=callgrind python bench/instructions.py text 1
    valgrind --tool=callgrind python bench/instructions.py text 4
    (text = the -w table; `jsonl 4 owner` adds the owner enricher;
    TCPSTATES_NO_SPEEDUPS=1 measures the pure-Python path)
"""
import os
import socket
import struct
import sys

from tcpstates.api import RunContext
try:
    from tcpstates.plugins.bcc_table.sinks import TextOptions, TextSink
    from tcpstates.plugins.jsonl.sink import JsonlOptions, JsonlSink
    from tcpstates.plugins.kernel.decoder import EVENT_SIZE, EVENT_STRUCT, Decoder
except ImportError:   # the 0.1 layout, for before/after comparisons
    from tcpstates.events import EVENT_STRUCT, Decoder  # type: ignore[attr-defined]
    EVENT_SIZE = EVENT_STRUCT.size
    from tcpstates.plugins.bcc_sinks import TextOptions, TextSink  # type: ignore[no-redef]
    from tcpstates.plugins.jsonl_sink import JsonlOptions, JsonlSink  # type: ignore[no-redef]
n = 20000
OWNER = (bytes(40),) if EVENT_STRUCT.format.endswith("40s") else ()
data = b"".join(struct.pack("<II", EVENT_SIZE, 0) + EVENT_STRUCT.pack(
    10**9 + i * 1000, 0xffff888100000000 + (i % 512) * 0x40, (i % 7) * 1000 if i % 5 else 2**64 - 1,
    1, 4000 + i % 3, 4000 + i % 3, 40000 + i % 20000, 8080, 2, 1 + i % 9, 1 + (i + 1) % 9,
    socket.inet_aton("127.0.0.1") + bytes(12), socket.inet_aton("10.1.%d.%d" % (i % 4, i % 200)) + bytes(12),
    b"python3".ljust(16, b"\0"), *OWNER) for i in range(n))
ctx = RunContext()
sink = (TextSink(TextOptions(path=os.devnull, wide=True), ctx) if sys.argv[1] == "text"
        else JsonlSink(JsonlOptions(path=os.devnull), ctx))
sink.open()
d = Decoder()
owner = None
if len(sys.argv) > 3 and sys.argv[3] == "owner":      # the owner enricher, as jsonl runs by default
    from tcpstates.plugins.owner.enricher import OwnerEnricher, OwnerOptions
    owner = OwnerEnricher(OwnerOptions(scan_existing=False), ctx)
for _ in range(int(sys.argv[2])):
    batch = d.decode_block(data)[0]
    if owner is not None:
        owner.observe_batch(batch)
    sink.write(batch)
