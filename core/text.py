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


# the escapes escape_text writes: marker -> hex width (lowercase hex)
_ESCAPES = {"x": 2, "u": 4, "U": 8}


def _written(mark: str, value: int) -> bool:
    """Does escape_text ever write the escape `\\<mark><value>`? Asked of
    _escape_char itself, so this stays what it writes: a byte that was not
    UTF-8 (0x80-0xff) as \\xNN, a non-printable character as its own escape."""
    if mark == "x" and 0x80 <= value <= 0xFF:
        return True
    try:
        ch = chr(value)
    except (ValueError, OverflowError):
        return False
    return not ch.isprintable() and _escape_char(ch) == f"\\{mark}{value:0{_ESCAPES[mark]}x}"


_HEX = frozenset("0123456789abcdef")


def _glob_tokens(pattern: str) -> list[str | None]:
    """The glob as fnmatch reads it: a literal character, or None for `?`, `*`
    and a bracket expression (each of which can stand for part of an escape)."""
    out: list[str | None] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch in "*?":
            out.append(None)
        elif ch == "[":
            j = i + (i < n and pattern[i] == "!")
            j += j < n and pattern[j] == "]"
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("[")          # no closing bracket: a literal, as fnmatch takes it
            else:
                out.append(None)
                i = j + 1
        else:
            out.append(ch)
    return out


def _literal_run_fits(run: str, start: int, open_end: bool) -> bool:
    """Can the literal run, from index start, be part of an escaped name? Every
    backslash must be doubled or begin an escape escape_text writes; open_end:
    a wildcard follows, which may complete what the run leaves open."""
    i = start
    while i < len(run):
        if run[i] != "\\":
            i += 1
            continue
        if i + 1 == len(run):
            return open_end
        mark = run[i + 1]
        if mark == "\\":
            i += 2
            continue
        if mark not in _ESCAPES:
            return False
        width = _ESCAPES[mark]
        digits = run[i + 2:i + 2 + width]
        if not set(digits) <= _HEX:
            return False
        if len(digits) < width:
            return open_end and i + 2 + len(digits) == len(run)
        if not _written(mark, int(digits, 16)):
            return False
        i += 2 + width
    return True


def lone_backslash(pattern: str) -> bool:
    """Can the glob `pattern` match no name as escape_name shows it, because of
    a backslash (`a\\b`, `a\\`, `\\x2d`: a printable character is never
    escaped)? Names hold a backslash only doubled or as the start of an escape
    escape_text writes; a wildcard next to a backslash may stand for the rest
    of either (`*\\b` matches the name `a\\b` shown as `a\\\\b`)."""
    if "\\" not in pattern:
        return False
    tokens = _glob_tokens(pattern)
    i = 0
    while i < len(tokens):
        if tokens[i] is None:
            i += 1
            continue
        j = i
        while j < len(tokens) and tokens[j] is not None:
            j += 1
        run = "".join(t for t in tokens[i:j] if t is not None)
        open_end, after_wild = j < len(tokens), i > 0
        # after a wildcard the run may begin with the second half of a doubled backslash
        if not (_literal_run_fits(run, 0, open_end)
                or (after_wild and run.startswith("\\") and _literal_run_fits(run, 1, open_end))):
            return True
        i = j
    return False


def refuse_lone_backslash(option: str, patterns: list[str]) -> None:
    """Refuse a name pattern that lone_backslash says no escaped name can
    match: names are matched as they are shown (a backslash doubled, a control
    byte as \\xNN), and a filter that silently keeps or drops nothing is a
    wrong answer, not a result."""
    for pattern in patterns:
        if lone_backslash(pattern):
            doubled = pattern.replace("\\", "\\\\")
            raise ValueError(f"{option}: the pattern {escape_text(pattern)} can never match: names are "
                             f"matched as shown, with a backslash doubled and a control byte as "
                             f"\\xNN; write {escape_text(doubled)} for a backslash")
