"""The `metrics` stage: the Prometheus metrics sink."""

from __future__ import annotations

from typing import Any

from tcpstates import hookimpl
from tcpstates.plugins.metrics.sink import MetricsSink


@hookimpl
def tcpstates_register_sinks(register: Any) -> None:
    register(MetricsSink)
