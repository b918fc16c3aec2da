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

__all__ = ["escape_name", "escape_text", "lone_backslash", "refuse_lone_backslash"]


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


# what may follow a backslash in a name escape_name made (a doubled backslash,
# \xNN, \uNNNN, \UNNNNNNNN), or in a shell glob over such names (a glob
# character standing for what follows)
_AFTER_BACKSLASH = frozenset("\\xuU*?[")


def lone_backslash(pattern: str) -> bool:
    """Does the glob `pattern` hold a backslash that no escaped name can hold
    there (`a\\b`, a trailing one)? Names are matched as escape_name shows them,
    where a backslash is always doubled or starts an escape: such a pattern can
    never match (`a\\\\b` matches the name `a\\b`)."""
    at = pattern.find("\\")
    while at >= 0:
        if at + 1 >= len(pattern) or pattern[at + 1] not in _AFTER_BACKSLASH:
            return True
        at = pattern.find("\\", at + 2)
    return False


def refuse_lone_backslash(option: str, patterns: list[str]) -> None:
    """Refuse a name pattern with a lone backslash: names are matched as they
    are shown, escaped (a backslash doubled, a control byte as \\xNN), so it
    could never match, and a filter that silently keeps or drops nothing is a
    wrong answer, not a result."""
    for pattern in patterns:
        if lone_backslash(pattern):
            doubled = pattern.replace("\\", "\\\\")
            raise ValueError(f"{option}: the pattern {escape_text(pattern)} can never match: names are "
                             f"matched as shown, with a backslash doubled and a control byte as "
                             f"\\xNN; write {escape_text(doubled)} for a backslash")
