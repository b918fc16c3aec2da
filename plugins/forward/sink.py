"""The `forward` sink: Fluent Forward protocol v1 to Fluent Bit / fluentd.

Over TCP (`host:port`, `[v6]:port`) or a unix socket (`unix:///path`),
optionally with TLS and the protocol's shared-key handshake, in Forward mode
(`[tag, [[time, record], ...], option]`) or PackedForward (`[tag, bin, option]`),
with EventTime (nanoseconds). Records are the jsonl schema.

Delivery: each chunk carries `option.chunk` and is only removed from the
buffer once the receiver answers `{"ack": chunk}`; on a timeout or a broken
connection the same chunk is sent again after a backoff (at least once: a
receiver restart can yield duplicates, never gaps). Chunks are bounded by
`chunk_events` and `chunk_bytes` (default far below Fluent Bit's default
Buffer_Max_Size of 6,144,000 bytes, which it enforces by closing the
connection); a chunk the receiver keeps closing the connection on is
reported as rejected and split. The network runs in its own thread; the
pipeline appends to a bounded buffer, and what does not fit is counted,
reported on stderr and in-band (a `lost` record, kind `forward_overflow`,
queued as soon as there is room — also when no further event comes). At
exit the buffer is flushed for up to `exit_timeout` seconds.

Accounting (exit summary): queued = events accepted into the buffer,
acknowledged = events the receiver acked (the summary's "written"), lost =
overflow plus what was still unacknowledged at exit.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import os
import socket
import ssl
import threading
import time
from typing import Any

import msgpack

from tcpstates.api import RunContext, Sink
from tcpstates.errors import UsageError
from tcpstates.events import Event
from tcpstates.options import option
from tcpstates.plugins.forward.protocol import (Handshake, event_time,
                                                parse_address, request, valid_tls_name)
from tcpstates.plugins.forward.transport import (CertificateNameMismatch, Connection, UntrustedReceiver,
                                                 checked_unix_socket, tls_context)
from tcpstates.records import Rfc3339, event_record, loss_record
from tcpstates.text import escape_text

__all__ = ["ForwardOptions", "ForwardSink", "parse_address", "event_time"]

#: Fluent Bit's forward input default Buffer_Max_Size; our default stays far below
FLUENT_BIT_BUFFER_MAX = 6_144_000


@dataclasses.dataclass
class ForwardOptions:
    address: str = option("127.0.0.1:24224", "receiver: HOST:PORT, [IPv6]:PORT or unix:///PATH")
    tag: str = option("tcpstates", "Fluent tag of every record")
    mode: str = option("forward", "forward (array of entries) or packed (PackedForward)",
                       choices=("forward", "packed"))
    ack: bool = option(True, "send a chunk id and wait for the receiver's ack (at-least-once)")
    chunk_events: int = option(1000, "most events per chunk", min=1, max=100000)
    chunk_bytes: int = option(1_000_000, "most bytes per chunk (Fluent Bit rejects a request over "
                              "its Buffer_Max_Size, default 6144000)", min=1024, max=64 << 20)
    buffer_events: int = option(100000, "events held while the receiver is slow or down; more are dropped and counted",
                                min=1, max=10_000_000)
    ack_timeout: float = option(10.0, "seconds to wait for an ack before resending the chunk",
                                min=0.001, max=3600)
    retry_min: float = option(0.2, "first reconnect delay, seconds (doubles up to retry_max)",
                              min=0.001, max=3600)
    retry_max: float = option(30.0, "longest reconnect delay, seconds", min=0.001, max=3600)
    exit_timeout: float = option(1.0, "seconds to keep delivering at exit (a stop takes at most this "
                                 "plus ~0.5 s, whatever the receiver does)", min=0, max=3600)
    shared_key: str = option("", "the receiver's Shared_Key: do the Forward handshake (HELO/PING/PONG)")
    self_hostname: str = option("", "our name in the handshake (default: this host's name)")
    username: str = option("", "user for the receiver's security.users (needs shared_key)")
    password: str = option("", "password for username")
    tls: bool = option(False, "connect with TLS")
    tls_verify: bool = option(True, "verify the receiver's certificate and name")
    tls_ca_file: str = option("", "CA certificates (PEM) to verify the receiver (default: the system's)")
    tls_cert_file: str = option("", "client certificate (PEM), if the receiver asks for one")
    tls_key_file: str = option("", "key of the client certificate (default: in tls_cert_file)")
    tls_server_name: str = option("", "name to verify the receiver's certificate against and send as SNI "
                                  "(default: the address's host; Fluent Bit's tls.vhost)")

    def validate(self) -> None:
        parse_address(self.address)
        if not self.tag:
            raise ValueError("tag: must not be empty")
        if self.buffer_events < self.chunk_events:
            raise ValueError("buffer_events: must be at least chunk_events")
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max: must be at least retry_min")
        if (self.username or self.password) and not self.shared_key:
            raise ValueError("username/password: the Forward handshake needs shared_key too")
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password: give both or neither")
        tls_set = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name")
                   if getattr(self, k)]
        if tls_set and not self.tls:
            raise ValueError(f"{tls_set[0]}: set tls = true to use it")
        if self.tls_server_name and not valid_tls_name(self.tls_server_name):
            raise ValueError(f"tls_server_name: {escape_text(self.tls_server_name)!r}: neither a host "
                             f"name nor an IP address")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file: needs tls_cert_file")
        if self.tls and not self.tls_verify and self.tls_ca_file:
            # a CA file says "verify against these": with verification off it
            # would be ignored without a word, and any receiver accepted
            raise ValueError("tls_ca_file: has no effect with tls_verify = false (nothing is verified); "
                             "remove one of them")


def _check_unix_receiver(path: str) -> None:
    """At start: a socket another user could have planted is a configuration
    error (exit 2), said at once rather than as a retried connection failure.
    A socket not there yet is the receiver's business (retried, as a refused
    connection); every connect checks again (transport.checked_unix_socket)."""
    try:
        fd = checked_unix_socket(path)
    except UntrustedReceiver as exc:
        raise UsageError(f"sinks forward: {exc.strerror}") from None
    except OSError:
        return
    if fd >= 0:
        os.close(fd)


class ForwardSink(Sink):
    """Fluent Forward v1 client with acks, handshake, TLS, backoff and a bounded buffer."""

    name = "forward"
    description = "Fluent Forward protocol v1 (Fluent Bit/fluentd forward input), acked, buffered"
    Options = ForwardOptions
    structured = True

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.family, self.sockaddr = parse_address(options.address)
        self._check_unix = os.geteuid() == 0    # started as root: also after --user
        if self.family == socket.AF_UNIX:
            _check_unix_receiver(self.sockaddr)
        try:
            self.tls = tls_context(options)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"sinks forward: TLS set-up failed: {escape_text(str(exc))}") from None
        self.server_name = options.tls_server_name or (
            self.sockaddr[0] if self.family != socket.AF_UNIX else "localhost")
        # buffer items: (packed [time, record] entry, 1 for an event / 0 for a lost record)
        self.buffer: collections.deque[tuple[bytes, int]] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.aborted = False      # close() cut the network thread short (not the receiver)
        self.deadline = float("inf")
        self.conn: Connection | None = None
        self._connecting: Any = None   # the socket of a connect in progress (see close)
        self.seq = 0
        self.rfc3339 = Rfc3339()
        self.packer = msgpack.Packer(use_bin_type=True)
        self.queued = 0          # events accepted into the buffer
        self.acknowledged = 0    # events acked by the receiver (or sent, with ack = false)
        self.overflow = 0        # events that did not fit
        self.left = 0            # events still unacknowledged at exit
        self.rejected = 0        # chunks the receiver rejected
        self._overflow_reported = 0
        self._chunk_limit = options.chunk_bytes
        self._connected = False
        self.thread = threading.Thread(target=self._run, name="tcpstates-forward", daemon=True)

    # -- pipeline side ---------------------------------------------------------
    def open(self) -> None:
        if self.options.tls and not self.options.tls_verify:
            # said at every start, so an unverified connection is never a surprise
            self.context.warn(f"forward sink: tls_verify = false: the certificate of "
                              f"{escape_text(self.options.address)} is not verified; anyone on the path "
                              f"can receive the events")
        self.thread.start()

    def _loss_entry_locked(self) -> None:
        """Queue the in-band `lost` record for overflow once there is room."""
        if self.overflow > self._overflow_reported and len(self.buffer) < self.options.buffer_events:
            count = self.overflow - self._overflow_reported
            self._overflow_reported = self.overflow
            self.seq += 1
            now = time.time_ns()
            rec = loss_record("forward_overflow", count, self.overflow, self.seq, now,
                              self.context.hostname, self.rfc3339)
            self.buffer.append((msgpack.packb([event_time(now), rec], use_bin_type=True), 0))
            self.cond.notify()

    def _enqueue(self, items: list[tuple[bytes, int]]) -> None:
        with self.cond:
            room = max(self.options.buffer_events - len(self.buffer), 0)
            if room < len(items):
                self.overflow += sum(flag for _, flag in items[room:])
                items = items[:room]
            self.buffer.extend(items)
            self.queued += sum(flag for _, flag in items)
            self._loss_entry_locked()
            self.cond.notify()
            overflowing = self.overflow > self._overflow_reported
        if overflowing:
            self.context.warn(f"forward sink: buffer of {self.options.buffer_events} events full "
                              f"({self.options.address} slow or down); dropping and counting",
                              once_key="forward-overflow")

    def write(self, batch: list[Event]) -> None:
        offset, host, fmt = self.context.clock_offset_ns, self.context.hostname, self.rfc3339
        pack = self.packer.pack
        items = []
        seq = self.seq
        for e in batch:
            seq += 1
            wall = e.ts_ns + offset
            items.append((pack([event_time(wall), event_record(e, seq, wall, host, fmt)]), 1))
        self.seq = seq
        self._enqueue(items)

    def write_loss(self, kind: str, count: int, total: int) -> None:
        self.seq += 1
        now = time.time_ns()
        rec = loss_record(kind, count, total, self.seq, now, self.context.hostname, self.rfc3339)
        self._enqueue([(self.packer.pack([event_time(now), rec]), 0)])

    def delivery_report(self) -> dict[str, int]:
        with self.cond:
            return {"queued": self.queued, "acknowledged": self.acknowledged,
                    "lost": self.overflow + self.left, "confirmed": int(self.options.ack)}

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.deadline = time.monotonic() + self.options.exit_timeout
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(self.options.exit_timeout)
        if self.thread.is_alive():
            # blocked in a connect, handshake, send or recv on a slow receiver:
            # cut it short (bounded exit)
            self.aborted = True
            conn = self.conn
            if conn is not None:
                conn.abort()
            pending = self._connecting
            if pending is not None:
                try:
                    pending.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.thread.join(0.5)
        with self.cond:
            self.left = sum(flag for _, flag in self.buffer)
        if self.overflow:
            self.context.warn(f"forward sink: {self.overflow} events dropped because the buffer was full")
        if self.left:
            self.context.warn(f"forward sink: {self.left} events not acknowledged by {self.options.address} "
                              f"within exit_timeout={self.options.exit_timeout}s")

    # -- network thread ----------------------------------------------------------
    def _connect(self) -> Connection:
        o = self.options
        handshake = (Handshake(o.shared_key, o.self_hostname or self.context.hostname or "localhost",
                               o.username, o.password) if o.shared_key else None)
        try:
            return Connection(self.family, self.sockaddr, timeout=o.ack_timeout, tls=self.tls,
                              server_name=self.server_name, handshake=handshake,
                              on_socket=self._set_connecting, check_unix=self._check_unix)
        finally:
            self._connecting = None

    def _set_connecting(self, sock: Any) -> None:
        self._connecting = sock

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _next_chunk_locked(self) -> list[tuple[bytes, int]]:
        chunk: list[tuple[bytes, int]] = []
        size = 0
        for item in self.buffer:
            if chunk and (len(chunk) >= self.options.chunk_events
                          or size + len(item[0]) > self._chunk_limit):
                break
            chunk.append(item)
            size += len(item[0])
        return chunk

    def _send(self, chunk: list[tuple[bytes, int]]) -> None:
        self._connected = False
        if self.conn is None:
            self.conn = self._connect()
        self._connected = True        # a failure from here on concerns this chunk
        chunk_id = base64.b64encode(os.urandom(16)).decode() if self.options.ack else None
        payload = request(msgpack.Packer(use_bin_type=True), self.options.tag,
                          [entry for entry, _ in chunk], self.options.mode, chunk_id)
        self.conn.send_chunk(payload, chunk_id)

    def _run(self) -> None:
        backoff = self.options.retry_min
        outage = False
        refused_in_a_row = 0      # same chunk, connection dropped after it was sent
        while True:
            with self.cond:
                while not self.buffer and not self.closing:
                    self.cond.wait()
                if not self.buffer or (self.closing and time.monotonic() > self.deadline):
                    return
                chunk = self._next_chunk_locked()
            try:
                self._send(chunk)
            except Exception as exc:   # refused, reset, timeout, TLS, handshake, protocol
                self._disconnect()
                if self.aborted:
                    # our own shutdown at the stop, not the receiver's doing: close()
                    # counts and reports what was left unacknowledged
                    return
                detail = escape_text(str(exc) if isinstance(exc, CertificateNameMismatch) else
                                       f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                dropped_after_send = self._connected and isinstance(exc, (ConnectionError, BrokenPipeError))
                refused_in_a_row = refused_in_a_row + 1 if dropped_after_send else 0
                if refused_in_a_row >= 2:
                    self._rejected(chunk)
                    refused_in_a_row = 0
                elif not outage:
                    outage = True
                    self.context.warn(f"forward sink: {self.options.address}: {detail}; retrying with "
                                      f"backoff, buffering up to {self.options.buffer_events} events")
                with self.cond:
                    if self.closing and time.monotonic() + backoff > self.deadline:
                        return
                    self.cond.wait(backoff)
                backoff = min(backoff * 2, self.options.retry_max)
                continue
            refused_in_a_row = 0
            with self.cond:
                for _ in chunk:
                    self.buffer.popleft()
                self.acknowledged += sum(flag for _, flag in chunk)
                self._loss_entry_locked()
            backoff = self.options.retry_min
            if outage:
                outage = False
                self.context.warn(f"forward sink: {self.options.address} reachable again", once_key=None)

    def _rejected(self, chunk: list[tuple[bytes, int]]) -> None:
        """The receiver closed the connection on this chunk twice: it rejects it."""
        self.rejected += 1
        size = sum(len(entry) for entry, _ in chunk)
        new_limit = max(size // 2, 1)
        # a receiver restarted twice in a row looks the same from here: the
        # wording says both, and a smaller chunk costs nothing but round trips
        self.context.warn(f"forward sink: {self.options.address} rejected a chunk of {len(chunk)} events "
                          f"({size} bytes): it closed the connection without an ack twice (Fluent Bit "
                          f"does so above its Buffer_Max_Size; or it restarted twice meanwhile); nothing "
                          f"is lost: sending chunks of at most {new_limit} bytes from now on",
                          once_key=None)
        self._chunk_limit = min(self._chunk_limit, new_limit)
