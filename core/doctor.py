"""`tcpstates doctor`: can this machine trace? Each check says pass/fail and what to do.

The checks come from the plugins (`tcpstates_doctor_checks`): the kernel stage
checks the kernel, BPF, bcc and headers; the journal sink its socket. Exit
status 0 when every required check passes, 1 when not. Optional checks warn.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from tcpstates.api import Warner
from tcpstates.parsing import OneLineParser
from tcpstates.text import escape_text


@dataclasses.dataclass(frozen=True)
class Check:
    """One doctor check: `run()` returns (ok, detail or what to do)."""

    name: str
    required: bool
    run: Callable[[], tuple[bool, str]]


def doctor_command(argv: Sequence[str]) -> int:
    from tcpstates.registry import make_plugin_manager

    p = OneLineParser(prog="tcpstates doctor", description="check whether this machine can trace")
    p.parse_args(argv)
    checks: list[Check] = []
    registry = make_plugin_manager(warner=Warner())
    registry.call("tcpstates_doctor_checks", register=checks.append)
    checks.sort(key=lambda c: not c.required)   # what tracing needs first, in plugin order
    failed = False
    for check in checks:
        try:
            ok, detail = check.run()
        except Exception as exc:   # a check must report, never crash the doctor
            ok, detail = False, f"the check itself failed: {type(exc).__name__}: {exc}"
        mark = "ok  " if ok else ("FAIL" if check.required else "warn")
        # details carry exception texts, paths and plugins' words: escaped
        print(f"{mark} {escape_text(check.name):15s} {escape_text(detail)}", flush=True)
        failed |= check.required and not ok
    print("tracing can work" if not failed else "tracing cannot work: fix the FAIL lines above")
    return 1 if failed else 0
