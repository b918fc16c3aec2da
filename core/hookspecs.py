"""pluggy hook specifications: how plugins add stages and follow a run's lifecycle.

Hooks are called at start-up and shutdown only. Per-event work happens in
the registered stage classes (see `tcpstates.api`), never through a hook.
Every hook here is documented with its signature in docs/plugins.md (a test
checks this).
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("tcpstates")
hookimpl = pluggy.HookimplMarker("tcpstates")


@hookspec
def tcpstates_register_sources(register: Callable[[type], None]) -> None:
    """Register Source classes: call `register(cls)` for each."""


@hookspec
def tcpstates_register_filters(register: Callable[[type], None]) -> None:
    """Register Filter classes: call `register(cls)` for each."""


@hookspec
def tcpstates_register_enrichers(register: Callable[[type], None]) -> None:
    """Register Enricher classes: call `register(cls)` for each."""


@hookspec
def tcpstates_register_sinks(register: Callable[[type], None]) -> None:
    """Register Sink classes: call `register(cls)` for each."""


@hookspec
def tcpstates_pipeline_started(pipeline: Any) -> None:
    """The source is attached and all sinks are open; events are about to flow."""


@hookspec
def tcpstates_pipeline_stopped(pipeline: Any, summary: dict[str, Any]) -> None:
    """Everything is flushed and closed; `summary` holds the run's counters."""
