"""A Fluent Forward v1 server for tests: the spec's server side, in a thread.

Accepts Message, Forward, PackedForward (bin or str) and
CompressedPackedForward (gzip) requests, answers `{"ack": chunk}` when a
chunk id is present, and records every entry. Misbehaviour on demand:
`ack=False` never answers; `drop_chunks=N` closes the connection and the
listener without acking the first N chunks, then listens again after
`restart_after` seconds (a receiver restart).
"""

from __future__ import annotations

import gzip
import os
import socket
import struct
import threading
import time

import msgpack


def decode_time(t) -> int:
    if isinstance(t, list):              # Fluent Bit v2+ sends [EventTime, metadata]
        t = t[0]
    if isinstance(t, msgpack.ExtType):
        assert t.code == 0 and len(t.data) == 8, t
        sec, nsec = struct.unpack(">II", t.data)
        return sec * 10**9 + nsec
    return int(t) * 10**9


class ForwardReceiver:
    def __init__(self, unix_path: str | None = None, ack: bool = True, drop_chunks: int = 0,
                 restart_after: float = 0.5, port: int = 0) -> None:
        self.unix_path = unix_path
        self.ack = ack
        self.drop_chunks = drop_chunks
        self.restart_after = restart_after
        self.entries: list[tuple[str, int, dict]] = []
        self.chunks: list[str] = []
        self.modes: set[str] = set()
        self.connections = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.listener = self._listen(port)
        self.address = (f"unix://{unix_path}" if unix_path else
                        f"127.0.0.1:{self.listener.getsockname()[1]}")
        self.port = None if unix_path else self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _listen(self, port: int = 0) -> socket.socket:
        if self.unix_path:
            if os.path.exists(self.unix_path):
                os.unlink(self.unix_path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self.unix_path)
        else:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        s.listen(16)
        s.settimeout(0.2)
        return s

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stopped.is_set():
                    return
                continue
            self.connections += 1
            if not self.drop_chunks:
                # concurrent clients (Fluent Bit's output has several workers)
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
                continue
            restart = self._handle(conn)
            if restart:
                port = self.port
                self.listener.close()                 # down: connects are refused
                time.sleep(self.restart_after)
                self.listener = self._listen(port or 0)

    def _handle(self, conn: socket.socket) -> bool:
        unpacker = msgpack.Unpacker(raw=False)
        conn.settimeout(0.2)
        with conn:
            while not self.stopped.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return False
                if not data:
                    return False
                unpacker.feed(data)
                for msg in unpacker:
                    with self.lock:
                        chunk = self._accept(msg)
                    if chunk is None:
                        continue
                    if self.drop_chunks > 0:
                        self.drop_chunks -= 1
                        with self.lock:               # "crashed" before acking: forget them
                            del self.entries[-self._last_count:]  # (serial mode: no other thread)
                        return True
                    with self.lock:
                        self.chunks.append(chunk)
                    if self.ack:
                        conn.sendall(msgpack.packb({"ack": chunk}))
        return False

    def _accept(self, msg) -> str | None:
        assert isinstance(msg, list), f"Fluent Bit rejects a non-array root: {msg!r}"
        tag, second = msg[0], msg[1]
        option = {}
        if isinstance(second, list):
            self.modes.add("forward")
            entries = second
            option = msg[2] if len(msg) > 2 else {}
        elif isinstance(second, (bytes, str)):
            raw = second.encode("latin-1") if isinstance(second, str) else second
            option = msg[2] if len(msg) > 2 else {}
            if option.get("compressed") == "gzip":
                raw = gzip.decompress(raw)
            self.modes.add("packed")
            unp = msgpack.Unpacker(raw=False)
            unp.feed(raw)
            entries = list(unp)
        else:
            self.modes.add("message")
            entries = [[second, msg[2]]]
            option = msg[3] if len(msg) > 3 else {}
        assert option.get("size", len(entries)) == len(entries)
        for t, record in entries:
            self.entries.append((tag, decode_time(t), record))
        self._last_count = len(entries)
        return option.get("chunk")

    def records(self) -> list[dict]:
        with self.lock:
            return [r for _, _, r in self.entries]

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()
