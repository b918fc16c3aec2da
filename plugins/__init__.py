"""Built-in stages, registered through the same hooks third-party plugins use."""

DEFAULT_PLUGINS: tuple[str, ...] = (
    "tcpstates.plugins.kernel_source",
    "tcpstates.plugins.replay_source",
    "tcpstates.plugins.bcc_sinks",
    "tcpstates.plugins.jsonl_sink",
    "tcpstates.plugins.journal_sink",
    "tcpstates.plugins.forward_sink",
    "tcpstates.plugins.summary_sink",
    "tcpstates.plugins.metrics_sink",
    "tcpstates.plugins.basic_filters",
    "tcpstates.plugins.owner_enricher",
    "tcpstates.plugins.container_enricher",
)
