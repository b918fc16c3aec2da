"""The journal sink's `tcpstates doctor` checks: the journald socket and systemd-python."""

from __future__ import annotations

from pathlib import Path

from tcpstates.doctor import Check


def _journal() -> tuple[str, bool, bool, str]:
    ok = Path("/run/systemd/journal/socket").exists()
    return ("journal socket", False, ok, "/run/systemd/journal/socket present" if ok else
            "journald not running: the journal sink (-Y) would have nowhere to write")


def _systemd_python() -> tuple[str, bool, bool, str]:
    try:
        from systemd import journal  # noqa: F401
        return ("systemd-python", False, True, "importable")
    except ImportError:
        return ("systemd-python", False, False, "missing: apt-get install python3-systemd (for -Y)")


def checks() -> list[Check]:
    return [Check("journal socket", False, lambda: _journal()[2:4]),   # type: ignore[misc]
            Check("systemd-python", False, lambda: _systemd_python()[2:4])]   # type: ignore[misc]
