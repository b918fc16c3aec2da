"""The journal sink's `tcpstates doctor` checks: the journald socket and systemd-python."""

from __future__ import annotations

from tcpstates.doctor import Check
from tcpstates.plugins.journal.sink import JOURNAL_SOCKET, journald_absent


def _journal() -> tuple[str, bool, bool, str]:
    absent = journald_absent()
    return ("journal socket", False, absent is None, f"journald listens on {JOURNAL_SOCKET}" if absent is None
            else f"{absent}: the journal sink (-Y) would have nowhere to write")


def _systemd_python() -> tuple[str, bool, bool, str]:
    try:
        from systemd import journal  # noqa: F401
        return ("systemd-python", False, True, "importable")
    except ImportError:
        return ("systemd-python", False, False, "missing: apt-get install python3-systemd (for -Y)")


def checks() -> list[Check]:
    return [Check("journal socket", False, lambda: _journal()[2:4]),   # type: ignore[misc]
            Check("systemd-python", False, lambda: _systemd_python()[2:4])]   # type: ignore[misc]
