"""The Prometheus page the real metrics sink serves after writing one batch."""

from __future__ import annotations

import urllib.request
from typing import Any

from traffic import free_port

from tcpstates.api import RunContext


def metrics_page(batch: list[Any], context: RunContext) -> str:
    """Open a metrics sink on a free loopback port, write `batch`, scrape it over
    HTTP and close it: the text a Prometheus server would read."""
    from tcpstates.plugins.metrics.sink import MetricsOptions, MetricsSink
    port = free_port()
    metrics = MetricsSink(MetricsOptions(listen=f"127.0.0.1:{port}"), context)
    metrics.open()
    try:
        metrics.write(batch)
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
