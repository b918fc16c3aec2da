"""Parsing port lists and ranges: "80", "80,443", "8000-8100"."""

from __future__ import annotations

from typing import Iterable


def parse_port_list(text: str, what: str) -> frozenset[int]:
    """A comma-separated list as bcc's -L/-D take it, checked (bcc is not)."""
    if not text.strip():
        raise ValueError(f"{what}: empty port list; give ports like 80 or 80,443")
    return parse_ports(text.split(","), what)


def parse_ports(items: Iterable[int | str], what: str) -> frozenset[int]:
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{what}: {item!r} is not a port")
        if isinstance(item, int):
            lo = hi = item
        else:
            text = item.strip()
            if not text:
                raise ValueError(f"{what}: empty entry in port list; remove the extra comma")
            lo_s, sep, hi_s = text.partition("-")
            try:
                # ASCII digits only: int() would also take "٨٠" (Arabic-Indic 80)
                if not all(p.isascii() and p.strip().isdigit() for p in ((lo_s, hi_s) if sep else (lo_s,))):
                    raise ValueError
                lo = int(lo_s, 10)
                hi = int(hi_s, 10) if sep else lo
            except ValueError:
                raise ValueError(f"{what}: {text!r} is not a port number or range "
                                 f"(use 80 or 8000-8100)") from None
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            raise ValueError(f"{what}: port {lo if not 1 <= lo <= 65535 else hi} out of range 1-65535")
        if hi < lo:
            raise ValueError(f"{what}: range {lo}-{hi} is backwards")
        out.update(range(lo, hi + 1))
    return frozenset(out)
