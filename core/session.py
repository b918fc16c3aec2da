"""One run: validated config + registry → pipeline started, run, closed, summarised.

Shared by the command line and `tcpstates.testing.run_pipeline`, so plugin
authors' tests go through exactly what `tcpstates` does.
"""

from __future__ import annotations

from typing import Any, Callable

from tcpstates import config as cfg
from tcpstates.api import RunContext
from tcpstates.pipeline import Pipeline
from tcpstates.registry import Registry, call_lifecycle


def build_pipeline(config: dict[str, Any], registry: Registry, context: RunContext,
                   sink_names: list[str]) -> Pipeline:
    general = cfg.general_section(config)
    source = cfg.source_spec(config, registry, general.source)
    chain = cfg.chain_specs(config, registry)
    sinks = [cfg.sink_spec(config, registry, name) for name in sink_names]
    cfg.validate_all_sinks(config, registry)
    return Pipeline(source, chain, sinks, context)


def execute(pipeline: Pipeline, registry: Registry, context: RunContext,
            on_started: Callable[[], None] | None = None) -> dict[str, Any]:
    """Start, run until the source ends or a stop is requested, close; the summary."""
    try:
        pipeline.start(on_started=on_started)
        call_lifecycle(registry, "tcpstates_pipeline_started", context.warner, context.strict,
                       pipeline=pipeline)
        pipeline.run()
    finally:
        pipeline.close()
    summary = pipeline.summary()
    call_lifecycle(registry, "tcpstates_pipeline_stopped", context.warner, context.strict,
                   pipeline=pipeline, summary=summary)
    return summary
