"""Built-in stages: each package is an ordinary plugin, registered through the
same hooks a third-party package uses (its flags and rules included).

The order is the order in which their flags appear in `tcpstates -h`.
"""

DEFAULT_PLUGINS: tuple[str, ...] = (
    "tcpstates.plugins.bcc_table",
    "tcpstates.plugins.filters",
    "tcpstates.plugins.journal",
    "tcpstates.plugins.filters.family_flags",
    "tcpstates.plugins.owner",
    "tcpstates.plugins.summary",
    "tcpstates.plugins.replay",
    "tcpstates.plugins.kernel",
    "tcpstates.plugins.jsonl",
    "tcpstates.plugins.forward",
    "tcpstates.plugins.metrics",
    "tcpstates.plugins.container",
)
