"""The `forward` sink: Fluent Forward protocol v1 to Fluent Bit / fluentd.

Over TCP (`host:port`, `[v6]:port`) or a unix socket (`unix:///path`), in
Forward mode (`[tag, [[time, record], ...], option]`) or PackedForward
(`[tag, bin(entries), option]`), with EventTime (msgpack ext type 0: uint32
seconds + uint32 nanoseconds, big-endian). Records are the jsonl schema.

Delivery: each chunk carries `option.chunk` (base64 of 128 random bits) and
is only removed from the buffer once the receiver answers `{"ack": chunk}`;
on a timeout or a broken connection the same chunk is sent again after a
backoff (so delivery is at least once; a receiver restart can yield
duplicates, never gaps). The network runs in its own thread; the pipeline
only appends to a bounded buffer, and what does not fit is counted, reported
on stderr and in-band (a `lost` record, kind `forward_overflow`). At exit the
buffer is flushed for up to `exit_timeout` seconds; anything left is reported.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import os
import socket
import struct
import threading
import time
from typing import Any

import msgpack

from tcpstates.api import RunContext, Sink
from tcpstates.events import Event
from tcpstates.options import option
from tcpstates.records import Rfc3339, event_record, loss_record


def event_time(ns: int) -> msgpack.ExtType:
    sec, nsec = divmod(ns, 1_000_000_000)
    return msgpack.ExtType(0, struct.pack(">II", sec & 0xFFFFFFFF, nsec))


def parse_address(text: str) -> tuple[int, Any]:
    """(family, sockaddr) for "host:port", "[v6]:port" or "unix:///path"."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        path = path[2:] if path.startswith("//") else path
        if not path.startswith("/"):
            raise ValueError(f"address: unix socket path must be absolute, got {text!r}")
        return socket.AF_UNIX, path
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise ValueError(f"address: expected HOST:PORT, [IPv6]:PORT or unix:///PATH, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET if ":" not in host else socket.AF_INET6, (host, int(port))


@dataclasses.dataclass
class ForwardOptions:
    address: str = option("127.0.0.1:24224", "receiver: HOST:PORT, [IPv6]:PORT or unix:///PATH")
    tag: str = option("tcpstates", "Fluent tag of every record")
    mode: str = option("forward", "forward (array of entries) or packed (PackedForward)",
                       choices=("forward", "packed"))
    ack: bool = option(True, "send a chunk id and wait for the receiver's ack (at-least-once)")
    chunk_events: int = option(1000, "most events per chunk", min=1, max=100000)
    buffer_events: int = option(100000, "events held while the receiver is slow or down; more are dropped and counted",
                                min=1, max=10_000_000)
    ack_timeout: float = option(10.0, "seconds to wait for an ack before resending the chunk",
                                min=0.001, max=86400)
    retry_min: float = option(0.2, "first reconnect delay, seconds (doubles up to retry_max)",
                              min=0.001, max=3600)
    retry_max: float = option(30.0, "longest reconnect delay, seconds", min=0.001, max=3600)
    exit_timeout: float = option(5.0, "seconds to keep delivering at exit", min=0.001, max=3600)

    def validate(self) -> None:
        parse_address(self.address)
        if not self.tag:
            raise ValueError("tag: must not be empty")
        if self.buffer_events < self.chunk_events:
            raise ValueError("buffer_events: must be at least chunk_events")



class ForwardSink(Sink):
    """Fluent Forward v1 client with acks, backoff and a bounded buffer."""

    name = "forward"
    description = "Fluent Forward protocol v1 (Fluent Bit/fluentd forward input), acked, buffered"
    Options = ForwardOptions
    structured = True

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.family, self.sockaddr = parse_address(options.address)
        self.buffer: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.deadline = float("inf")
        self.sock: socket.socket | None = None
        self.seq = 0
        self.rfc3339 = Rfc3339()
        self.delivered = 0
        self.overflow = 0
        self._overflow_reported = 0
        self.chunks_sent = 0
        self.thread = threading.Thread(target=self._run, name="tcpstates-forward", daemon=True)

    # -- pipeline side ---------------------------------------------------------
    def open(self) -> None:
        self.thread.start()

    def _enqueue(self, items: list[tuple[int, dict[str, Any]]]) -> None:
        with self.cond:
            room = self.options.buffer_events - len(self.buffer)
            if room < len(items):
                self.overflow += len(items) - max(room, 0)
                items = items[:max(room, 0)]
            if self.overflow > self._overflow_reported and len(self.buffer) + len(items) < self.options.buffer_events:
                count = self.overflow - self._overflow_reported
                self._overflow_reported = self.overflow
                self.seq += 1
                now = time.time_ns()
                items.append((now, loss_record("forward_overflow", count, self.overflow, self.seq,
                                               now, self.context.hostname, self.rfc3339)))
            self.buffer.extend(items)
            self.cond.notify()
        if self.overflow > self._overflow_reported:
            self.context.warn(f"forward sink: buffer of {self.options.buffer_events} events full "
                              f"({self.options.address} slow or down); dropping and counting",
                              once_key="forward-overflow")

    def write(self, batch: list[Event]) -> None:
        offset, host, fmt = self.context.clock_offset_ns, self.context.hostname, self.rfc3339
        items = []
        seq = self.seq
        for e in batch:
            seq += 1
            wall = e.ts_ns + offset
            items.append((wall, event_record(e, seq, wall, host, fmt)))
        self.seq = seq
        self._enqueue(items)

    def write_loss(self, kind: str, count: int, total: int) -> None:
        self.seq += 1
        now = time.time_ns()
        self._enqueue([(now, loss_record(kind, count, total, self.seq, now, self.context.hostname,
                                         self.rfc3339))])

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.deadline = time.monotonic() + self.options.exit_timeout
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(self.options.exit_timeout + self.options.ack_timeout + 1)
        left = len(self.buffer)
        if self.overflow:
            self.context.warn(f"forward sink: {self.overflow} events dropped because the buffer was full")
        if left:
            self.context.warn(f"forward sink: {left} events not delivered to {self.options.address} "
                              f"within exit_timeout={self.options.exit_timeout}s")
        self._disconnect()

    # -- network thread ----------------------------------------------------------
    def _connect(self) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.settimeout(self.options.ack_timeout)
        try:
            s.connect(self.sockaddr)
        except OSError:
            s.close()
            raise
        if self.family != socket.AF_UNIX:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _disconnect(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _payload(self, chunk: list[tuple[int, dict[str, Any]]], chunk_id: str | None) -> bytes:
        opt: dict[str, Any] = {"size": len(chunk)}
        if chunk_id is not None:
            opt["chunk"] = chunk_id
        if self.options.mode == "packed":
            entries = b"".join(msgpack.packb([event_time(t), r]) for t, r in chunk)
            return msgpack.packb([self.options.tag, entries, opt], use_bin_type=True)
        return msgpack.packb([self.options.tag, [[event_time(t), r] for t, r in chunk], opt],
                             use_bin_type=True)

    def _await_ack(self, sock: socket.socket, chunk_id: str) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        deadline = time.monotonic() + self.options.ack_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no ack")
            sock.settimeout(remaining)
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("receiver closed the connection before acking")
            unpacker.feed(data)
            for reply in unpacker:
                if isinstance(reply, dict) and reply.get("ack") == chunk_id:
                    return

    def _send(self, chunk: list[tuple[int, dict[str, Any]]]) -> None:
        if self.sock is None:
            self.sock = self._connect()
        chunk_id = base64.b64encode(os.urandom(16)).decode() if self.options.ack else None
        self.sock.settimeout(self.options.ack_timeout)
        self.sock.sendall(self._payload(chunk, chunk_id))
        if chunk_id is not None:
            self._await_ack(self.sock, chunk_id)
        self.chunks_sent += 1

    def _run(self) -> None:
        backoff = self.options.retry_min
        outage = False
        while True:
            with self.cond:
                while not self.buffer and not self.closing:
                    self.cond.wait()
                if not self.buffer or (self.closing and time.monotonic() > self.deadline):
                    return
                chunk = [self.buffer[i] for i in range(min(len(self.buffer), self.options.chunk_events))]
            try:
                self._send(chunk)
            except (OSError, ValueError) as exc:   # incl. timeouts, refused, reset
                self._disconnect()
                if not outage:
                    outage = True
                    self.context.warn(f"forward sink: {self.options.address}: {exc or type(exc).__name__}; "
                                      f"retrying with backoff, buffering up to "
                                      f"{self.options.buffer_events} events")
                with self.cond:
                    if self.closing and time.monotonic() + backoff > self.deadline:
                        return
                    self.cond.wait(backoff)
                backoff = min(backoff * 2, self.options.retry_max)
                continue
            with self.cond:
                for _ in chunk:
                    self.buffer.popleft()
            self.delivered += len(chunk)
            backoff = self.options.retry_min
            if outage:
                outage = False
                self.context.warn(f"forward sink: {self.options.address} reachable again", once_key=None)
