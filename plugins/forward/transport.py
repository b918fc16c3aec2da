"""One connection to a Forward receiver: connect, TLS, handshake, bounded replies.

Every blocking call has a timeout, and `abort()` (from another thread, at
exit) shuts the socket down so a blocked send or recv returns at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from typing import Any

import msgpack

from tcpstates.errors import UsageError
from tcpstates.security import open_checked_file
from tcpstates.text import escape_text

from tcpstates.plugins.forward.protocol import MAX_REPLY_BYTES, Handshake, ProtocolError

CONNECT_TIMEOUT = 10.0
#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


class UntrustedReceiver(OSError):
    """As root: the unix socket could have been put there by another user, who
    would then read every event (the rule for a FIFO output, docs/security.md)."""


def checked_unix_socket(path: str, enforce: bool | None = None) -> int:
    """An O_PATH descriptor of the unix socket `path` to connect through
    (/proc/self/fd/N: the very inode checked), or -1 when not root (no check).

    As root, every directory on the (resolved) way must be changeable only by
    root — or by the owner of a directory that root placed where only root can
    (a receiver's own run directory, /run/td-agent) — and the socket must belong
    to root or such an owner (`enforce`: whether to check; default: as root;
    the sink keeps checking after --user dropped root, since who may plant a
    socket there does not change). A socket another user left in /tmp, or in a
    directory of theirs there, is refused: UntrustedReceiver. FileNotFoundError
    and other OSErrors as connect() would give them."""
    if not (os.geteuid() == 0 if enforce is None else enforce):
        return -1
    real = os.path.realpath(path)
    trusted = {0}
    where, where_st = "/", os.lstat("/")
    parts = [p for p in real.split("/") if p]
    for i, name in enumerate(parts):
        entry = where.rstrip("/") + "/" + name
        st = os.lstat(entry)
        dir_ok = where_st.st_uid in trusted and not where_st.st_mode & 0o022
        # a sticky directory (/tmp): only root's entries cannot be replaced by others
        if not dir_ok and not (where_st.st_mode & 0o1000 and st.st_uid == 0):
            why = (f"{escape_text(entry)} belongs to uid {st.st_uid} in the shared directory "
                   f"{escape_text(where)} (mode {where_st.st_mode & 0o7777:o})" if where_st.st_mode & 0o1000 else
                   f"{escape_text(entry)} is in {escape_text(where)}, which others can change "
                   f"(owner uid {where_st.st_uid}, mode {where_st.st_mode & 0o7777:o})")
            raise UntrustedReceiver(errno.EPERM, f"refusing to send events as root to {escape_text(path)}: "
                                    f"{why}; whoever put a socket there would read every event")
        if i == len(parts) - 1:
            if stat.S_ISSOCK(st.st_mode) and st.st_uid not in trusted:
                raise UntrustedReceiver(errno.EPERM, f"refusing to send events as root to {escape_text(path)}: "
                                        f"the socket belongs to uid {st.st_uid}, who owns no directory root "
                                        f"placed on its way; put the receiver's socket in a directory of its own")
            fd = os.open(real, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise UntrustedReceiver(errno.EAGAIN, f"{escape_text(path)} changed while it was checked")
            return fd
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o022:
            # root (or someone trusted) put this directory here: its owner keeps what is below
            trusted.add(st.st_uid)
        where, where_st = entry, st
    raise FileNotFoundError(errno.ENOENT, "no socket name in the path")


def _connect(raw: socket.socket, family: int, sockaddr: Any, check_unix: bool | None) -> None:
    if family != socket.AF_UNIX:
        raw.connect(sockaddr)
        return
    fd = checked_unix_socket(sockaddr, check_unix)
    try:
        if fd < 0:
            raw.connect(sockaddr)
        elif os.path.exists(f"/proc/self/fd/{fd}"):
            raw.connect(f"/proc/self/fd/{fd}")   # the inode checked, not the path again
        else:
            raw.connect(sockaddr)                # no /proc: by path, right after the check
    finally:
        if fd >= 0:
            os.close(fd)


class CertificateNameMismatch(Exception):
    """The receiver's certificate is not issued for the name we check: said in
    words that name the host and the option, not as OpenSSL's error code."""


@contextlib.contextmanager
def _checked(path: str, what: str, secret: bool = False) -> Iterator[str]:
    """A name through which ssl reads the file `path` after the checks,
    the very file checked (its open descriptor), not the path looked up again."""
    fd = open_checked_file(path, what, secret=secret)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@contextlib.contextmanager
def _names(what: str, path: str, holds: str) -> Iterator[None]:
    """OpenSSL's complaint about a file's contents, with the option and the
    path it came from (OpenSSL only knows /proc/self/fd/N, and often not even
    that: '[SSL] PEM lib')."""
    try:
        yield
    except ssl.SSLError as exc:
        raise UsageError(f"{what}: {escape_text(path)} does not hold {holds} (PEM) "
                         f"({escape_text(exc.reason or str(exc))}); check the file") from None


def tls_context(options: Any) -> ssl.SSLContext | None:
    """The client TLS context for the options, or None without `tls`.

    The CA, certificate and key files are checked as any file read as root
    (security.open_checked_file: raises UsageError); ssl.SSLError/OSError for
    invalid contents (reported at start-up).
    """
    if not options.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.tls_verify:
        if options.tls_ca_file:
            # a CA file others can change lets them vouch for any receiver
            with _checked(options.tls_ca_file, "sinks.forward.tls_ca_file") as ca, \
                    _names("sinks.forward.tls_ca_file", options.tls_ca_file, "usable CA certificates"):
                ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if options.tls_cert_file:
        with contextlib.ExitStack() as files:
            cert = files.enter_context(_checked(options.tls_cert_file, "sinks.forward.tls_cert_file",
                                                secret=not options.tls_key_file))
            key = (files.enter_context(_checked(options.tls_key_file, "sinks.forward.tls_key_file", secret=True))
                   if options.tls_key_file else None)
            shown = (f"{options.tls_cert_file} and {options.tls_key_file}" if options.tls_key_file
                     else options.tls_cert_file)
            with _names("sinks.forward.tls_cert_file", shown, "a usable certificate and its private key"):
                ctx.load_cert_chain(cert, key)
    return ctx


def _wrap(tls: ssl.SSLContext, raw: socket.socket, server_name: str) -> ssl.SSLSocket:
    try:
        return tls.wrap_socket(raw, server_hostname=server_name)
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code not in _NAME_MISMATCH:
            raise
        # the usual cause: the address is an IP (or another name) and the
        # certificate names the receiver's DNS name
        raise CertificateNameMismatch(
            f"TLS: the receiver's certificate is not valid for {escape_text(server_name)!r} "
            f"(name mismatch); set tls_server_name to a name it is issued for") from None


class Connection:
    def __init__(self, family: int, sockaddr: Any, *, timeout: float, tls: ssl.SSLContext | None,
                 server_name: str, handshake: Handshake | None,
                 on_socket: Any = None, check_unix: bool | None = None) -> None:
        self.timeout = timeout
        raw = socket.socket(family, socket.SOCK_STREAM)
        self.sock: socket.socket = raw
        if on_socket is not None:
            # the caller can cut a slow connect/TLS/handshake short from another thread
            on_socket(raw)
        try:
            raw.settimeout(min(timeout, CONNECT_TIMEOUT))
            _connect(raw, family, sockaddr, check_unix)
            if family != socket.AF_UNIX:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                self.sock = _wrap(tls, raw, server_name)
            self.sock.settimeout(timeout)
            self.unpacker = msgpack.Unpacker(raw=True, max_buffer_size=MAX_REPLY_BYTES)
            if handshake is not None:
                handshake_deadline = time.monotonic() + timeout
                self.sock.sendall(handshake.ping(self.read_message(handshake_deadline)))
                try:
                    pong = self.read_message(handshake_deadline)
                except ConnectionError:
                    # Fluent Bit answers a wrong shared_key with no PONG at all: it
                    # logs "shared_key mismatch" and closes (a wrong password gets
                    # a PONG that says why)
                    raise ConnectionError("receiver closed the connection instead of answering our "
                                          "PING: it refused our shared_key (Fluent Bit logs "
                                          "'shared_key mismatch')") from None
                handshake.check_pong(pong)
        except BaseException:
            self.close()
            raise

    def read_message(self, deadline: float) -> Any:
        """The next msgpack message, reading at most MAX_REPLY_BYTES for it."""
        received = 0
        while True:
            for message in self.unpacker:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from the receiver")
            self.sock.settimeout(remaining)
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("receiver closed the connection")
            received += len(data)
            if received > MAX_REPLY_BYTES:
                raise ProtocolError(f"receiver sent more than {MAX_REPLY_BYTES} bytes without a "
                                    f"complete reply; not reading further")
            try:
                self.unpacker.feed(data)
            except msgpack.BufferFull:
                raise ProtocolError(f"receiver's reply exceeds {MAX_REPLY_BYTES} bytes") from None

    def send_chunk(self, payload: bytes, chunk_id: str | None) -> None:
        """Send one request; with a chunk id, return only on its ack."""
        self.sock.settimeout(self.timeout)
        self.sock.sendall(payload)
        if chunk_id is None:
            return
        want = chunk_id.encode()
        deadline = time.monotonic() + self.timeout
        received_before = 0
        while True:
            reply = self.read_message(deadline)
            if isinstance(reply, dict) and reply.get(b"ack") == want:
                return
            if isinstance(reply, list) and reply and reply[0] == b"HELO":
                raise ProtocolError("receiver expects the Forward handshake (it sent HELO): "
                                    "set shared_key (and username/password) as configured there")
            received_before += 1
            if received_before > 64:
                raise ProtocolError("receiver keeps answering without acking our chunk")

    def abort(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
