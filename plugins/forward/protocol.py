"""Fluent Forward v1 wire format: addresses, EventTime, requests, handshake.

Pure functions over bytes (no sockets), so each piece is testable alone.
Spec: fluentd wiki "Forward-Protocol-Specification-v1"; the handshake was
checked against the real Fluent Bit (its `forward` input with Shared_Key and
security.users): HELO `["HELO", {"nonce": bin, "auth": bin, ...}]`, our
PING, its PONG `["PONG", ok, reason, server_hostname, digest]`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import struct
from typing import Any

import msgpack

from tcpstates.text import escape_text

#: an ack is ~40 bytes and a HELO/PONG a few hundred: a receiver sending more
#: than this in one exchange is broken or hostile, never buffered further
MAX_REPLY_BYTES = 64 * 1024
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
#: sockaddr_un.sun_path is 108 bytes including the terminating NUL
_UNIX_PATH_MAX = 107


class ProtocolError(ValueError):
    """The receiver said something the protocol does not allow (text escaped)."""


def valid_host_name(name: str) -> bool:
    """An RFC 1123 host name (fullmatch: `$` would let a trailing newline in)."""
    return _HOSTNAME.fullmatch(name) is not None


def valid_tls_name(name: str) -> bool:
    """A name a certificate can be checked against: a host name or an IP address."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return valid_host_name(name)


def parse_address(text: str) -> tuple[int, Any]:
    """(family, sockaddr) for "host:port", "[v6]:port" or "unix:///path".

    Refuses anything else here, at config time: a host must be an IP literal
    or an RFC 1123 name, a port 1-65535, a unix path absolute and short
    enough for sun_path.
    """
    shown = escape_text(text)
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        path = path[2:] if path.startswith("//") else path
        if not path.startswith("/"):
            raise ValueError(f"address: unix socket path must be absolute, got {shown!r}")
        if "\0" in path or len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ValueError(f"address: unix socket path must be at most {_UNIX_PATH_MAX} bytes "
                             f"without NUL, got {shown!r}")
        return socket.AF_UNIX, path
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 1 <= int(port) <= 65535 or not host:
        raise ValueError(f"address: expected HOST:PORT, [IPv6]:PORT or unix:///PATH, got {shown!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"address: {shown!r}: not an IPv6 address in brackets") from None
        return socket.AF_INET6, (host[1:-1], int(port))
    if ":" in host:
        raise ValueError(f"address: {shown!r}: write an IPv6 address in brackets, e.g. [::1]:24224")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not valid_host_name(host):
            raise ValueError(f"address: {shown!r}: host is neither an IP address nor a valid "
                             f"host name") from None
    return socket.AF_INET, (host, int(port))


def event_time(ns: int) -> msgpack.ExtType:
    """EventTime: msgpack ext type 0, uint32 BE seconds + uint32 BE nanoseconds."""
    sec, nsec = divmod(ns, 1_000_000_000)
    return msgpack.ExtType(0, struct.pack(">II", sec & 0xFFFFFFFF, nsec))


def request(packer: msgpack.Packer, tag: str, entries: list[bytes], mode: str,
            chunk_id: str | None) -> bytes:
    """One Forward (`[tag, [entry...], opt]`) or PackedForward (`[tag, bin, opt]`)
    request from already packed `[time, record]` entries."""
    opt: dict[str, Any] = {"size": len(entries)}
    if chunk_id is not None:
        opt["chunk"] = chunk_id
    body = b"".join(entries)
    if mode == "packed":
        middle = packer.pack(body)                 # bin (use_bin_type), as the spec says
    else:
        middle = packer.pack_array_header(len(entries)) + body
    return packer.pack_array_header(3) + packer.pack(tag) + middle + packer.pack(opt)


def _hex(*parts: bytes) -> str:
    return hashlib.sha512(b"".join(parts)).hexdigest()


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise ProtocolError(f"expected bytes in the handshake, got {type(value).__name__}")


class Handshake:
    """Client side of HELO → PING → PONG with a shared key (and user auth)."""

    def __init__(self, shared_key: str, self_hostname: str, username: str = "",
                 password: str = "") -> None:
        self.key = shared_key.encode()
        self.hostname = self_hostname.encode()
        self.username = username.encode()
        self.password = password.encode()
        # Fluent Bit accepts only str elements in a PING: a hex salt
        self.salt = os.urandom(16).hex().encode()
        self.nonce = b""

    def ping(self, helo: Any) -> bytes:
        """Our PING for the server's HELO message."""
        if not (isinstance(helo, list) and len(helo) >= 2 and helo[0] in (b"HELO", "HELO")
                and isinstance(helo[1], dict)):
            raise ProtocolError(f"expected HELO from the receiver, got {describe(helo)}")
        opts = {_bytes(k).decode("ascii", "replace"): v for k, v in helo[1].items()}
        self.nonce = _bytes(opts.get("nonce", b""))
        auth = _bytes(opts.get("auth", b""))
        password_digest = _hex(auth, self.username, self.password) if auth else ""
        # exactly six str elements, in one write, nothing after it until the PONG
        return msgpack.packb(["PING", self.hostname.decode(), self.salt.decode(),
                              _hex(self.salt, self.hostname, self.nonce, self.key),
                              self.username.decode(), password_digest], use_bin_type=True)

    def check_pong(self, pong: Any) -> None:
        """Accept only a PONG that says yes and proves the server knows the key."""
        if not (isinstance(pong, list) and len(pong) >= 5 and pong[0] in (b"PONG", "PONG")):
            raise ProtocolError(f"expected PONG from the receiver, got {describe(pong)}")
        if pong[1] is not True:
            reason = escape_text(_bytes(pong[2]).decode("utf-8", "replace")) if pong[2] else "no reason"
            raise ProtocolError(f"receiver refused the handshake: {reason} "
                                f"(check shared_key, username, password)")
        expect = _hex(self.salt, _bytes(pong[3]), self.nonce, self.key)
        if _bytes(pong[4]).decode("ascii", "replace") != expect:
            raise ProtocolError("receiver's PONG digest is wrong: it does not know our shared_key")


def describe(value: Any) -> str:
    """A short, escaped rendering of a receiver's message for our warnings."""
    text = repr(value)
    return escape_text(text[:120] + ("..." if len(text) > 120 else ""))
