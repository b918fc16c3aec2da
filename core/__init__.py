"""tcpstates: trace TCP socket state changes with eBPF, through a plugin pipeline.

The public API for plugin authors lives in `tcpstates.api` (stage base
classes, the Event record, hook markers) and `tcpstates.testing`.
"""

__version__ = "0.1.0"
