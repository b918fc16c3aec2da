"""Escaping every string from outside before it reaches a line-oriented output.

Process names come from unprivileged users (prctl(PR_SET_NAME)), addresses and
names from replayed files, paths from the command line: any of them may carry
newlines (forged lines), terminal escape sequences, or undecodable bytes. Every
text/CSV column, warning and error message goes through `escape_text`, the one
place that decides how such characters look; names that become event fields
(command names, owner and container names) are escaped once where they enter,
by `escape_name`, which also doubles a backslash so that two different names
never look the same.
"""

from __future__ import annotations

__all__ = ["escape_name", "escape_text"]


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:      # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:                   # C0, DEL; C1 below is \u0080-\u009f: never one of those bytes
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_text(raw: object) -> str:
    """`raw` as one printable line: control, format and non-printable characters
    (C0, DEL, C1, bidi overrides, line/paragraph separators, lone surrogates)
    become `\\xNN`/`\\uNNNN`; a backslash stays itself. Printable text, the
    usual case, is returned unchanged and fast."""
    text = raw if isinstance(raw, str) else str(raw)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def escape_name(raw: object) -> str:
    """A name from outside as an event's field holds it (C-COMM, owner_comm,
    container and Kubernetes names): `escape_text`'s escapes with every
    backslash doubled first, so the escaping is one-to-one — a process that
    names itself with the eight printable characters `a\\x0aFAKE` is shown
    as `a\\\\x0aFAKE`, never as the name holding a newline. Its result is
    printable, so `escape_text` at a text boundary leaves it as it is."""
    text = raw if isinstance(raw, str) else str(raw)
    return escape_text(text.replace("\\", "\\\\"))
