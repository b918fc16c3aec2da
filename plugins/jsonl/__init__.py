"""The `jsonl` stage: the JSON Lines sink (files with rotation, stdout)."""

from __future__ import annotations

from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.jsonl.sink import JsonlSink


@hookimpl
def tcpstates_register_sinks(register: Any) -> None:
    register(JsonlSink)


@hookimpl
def tcpstates_doctor_checks(register: Any) -> None:
    from tcpstates.plugins.jsonl import doctor
    for check in doctor.checks():
        register(check)
