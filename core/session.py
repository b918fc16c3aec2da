"""One run: a RunPlan → pipeline started, run, closed, summarised.

Shared by the command line and `tcpstates.testing.run_pipeline`, so plugin
authors' tests go through exactly what `tcpstates` does.
"""

from __future__ import annotations

from typing import Any, Callable

from tcpstates.api import RunContext
from tcpstates.pipeline import Pipeline
from tcpstates.registry import Registry, call_lifecycle
from tcpstates.runconfig import RunPlan


def build_pipeline(plan: RunPlan, context: RunContext) -> Pipeline:
    return Pipeline(plan.source, plan.chain, plan.sinks, context)


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
