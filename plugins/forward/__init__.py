"""The `forward` stage: the Fluent Forward sink (Fluent Bit, Fluentd)."""

from __future__ import annotations

from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.forward.sink import ForwardSink


@hookimpl
def tcpstates_register_sinks(register: Any) -> None:
    register(ForwardSink)
