"""pluggy hook specifications: how plugins add stages, flags, rules and checks.

Hooks are called at start-up and shutdown only. Per-event work happens in
the registered stage classes (see `tcpstates.api`), never through a hook.
Every hook here is documented with its signature in docs/plugins.md (a test
checks this). The built-in stages use exactly these hooks.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from tcpstates.runconfig import RunConfig
    from tcpstates.doctor import Check

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
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    """Add command-line flags with `parser.add_argument(...)`.

    Called once while the parser is built, before the command line is read.
    A flag that another plugin already defines is an error naming this plugin.
    """


@hookspec
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    """Fold this plugin's flags and rules into the run configuration.

    Called after the config file and `-o` overrides are validated, before the
    pipeline is built. Change the run only through `config`'s methods
    (`add_sink`, `set_sink_options`, `prepend_chain`, `use_source`, ...),
    which validate each change. Order: `tryfirst` for flags that others build
    on, `trylast` for rules that look at the finished set of sinks.
    """


@hookspec
def tcpstates_doctor_checks(register: Callable[[Check], None]) -> None:
    """Contribute `tcpstates doctor` checks: call `register(Check(...))` for each."""


@hookspec
def tcpstates_pipeline_started(pipeline: Any) -> None:
    """The source is attached and all sinks are open; events are about to flow."""


@hookspec
def tcpstates_pipeline_stopped(pipeline: Any, summary: dict[str, Any]) -> None:
    """Everything is flushed and closed; `summary` holds the run's counters."""
