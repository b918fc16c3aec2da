"""Helpers for plugin authors' tests (opt-in: `from tcpstates.testing import ...`).

    make_event(**fields)           an Event with sensible defaults
    MemorySink                     a sink keeping what it receives (registered as "memory")
    run_pipeline(config_text, events, plugins=())
                                   runs `events` through the chain that `config_text`
                                   (tcpstates.toml syntax) describes, exactly as the
                                   command line would, and returns what reached the sink

No root and no bcc needed: the events come from an in-memory source.
"""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any, Iterable

from tcpstates.api import KernelConstraints, RunContext, Sink, Source, Warner
from tcpstates.events import STATE_NUMBERS, Event
from tcpstates.hookspecs import hookimpl
from tcpstates.options import NoOptions

__all__ = ["make_event", "MemorySink", "RunResult", "run_pipeline"]


def make_event(**fields: Any) -> Event:
    """An Event; states may be given by name (oldstate="SYN_SENT")."""
    base: dict[str, Any] = dict(ts_ns=1_000_000_000, skaddr=0xffff888100000000, span_ns=None,
                                pid=1000, tid=1000, comm="client", family=2, saddr="127.0.0.1",
                                sport=40000, daddr="127.0.0.1", dport=80, oldstate="CLOSE",
                                newstate="SYN_SENT", cgroup_id=0)
    base.update(fields)
    for key in ("oldstate", "newstate"):
        if isinstance(base[key], str):
            base[key] = STATE_NUMBERS[base[key]]
    if "extra" not in base:
        base["extra"] = {}
    return Event(**base)


class MemorySink(Sink):
    """Keeps every event and loss notice it receives, in order."""

    name = "memory"
    description = "keeps events in memory (tcpstates.testing)"
    Options = NoOptions

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.events: list[Event] = []
        self.losses: list[tuple[str, int, int]] = []
        self.calls: list[str] = []

    def open(self) -> None:
        self.calls.append("open")

    def write(self, batch: list[Event]) -> None:
        self.calls.append("write")
        self.events.extend(batch)

    def write_loss(self, kind: str, count: int, total: int) -> None:
        self.losses.append((kind, count, total))

    def flush(self) -> None:
        self.calls.append("flush")

    def close(self) -> None:
        self.calls.append("close")


class ListSource(Source):
    """Yields preset events in batches (given by run_pipeline)."""

    name = "events"
    description = "preset events (tcpstates.testing)"
    Options = NoOptions
    batches: list[list[Event]]   # set on the per-run subclass by run_pipeline

    def start(self, constraints: list[KernelConstraints]) -> None:
        self.constraints = constraints
        self.pending = list(self.batches)

    def read(self, timeout: float) -> list[Event] | None:
        return self.pending.pop(0) if self.pending else None


class _TestingPlugin:
    """Registers one run's own source and sink classes (no state shared between runs)."""

    def __init__(self, batches: list[list[Event]]) -> None:
        self.sinks: list[MemorySink] = []
        made = self.sinks

        class RunSink(MemorySink):
            def __init__(self, options: Any, context: RunContext) -> None:
                super().__init__(options, context)
                made.append(self)

        class RunSource(ListSource):
            pass

        RunSource.batches = batches
        RunSink.__name__ = RunSink.__qualname__ = "MemorySink"
        RunSource.__name__ = RunSource.__qualname__ = "ListSource"
        self.sink_cls, self.source_cls = RunSink, RunSource

    @hookimpl
    def tcpstates_register_sinks(self, register: Any) -> None:
        register(self.sink_cls)

    @hookimpl
    def tcpstates_register_sources(self, register: Any) -> None:
        register(self.source_cls)


@dataclasses.dataclass
class RunResult:
    events: list[Event]
    losses: list[tuple[str, int, int]]
    summary: dict[str, Any]
    sinks: list[MemorySink]


def run_pipeline(config_text: str, events: Iterable[Event], *, plugins: Iterable[Any] = (),
                 entry_points: bool = True, batch_size: int = 1000,
                 strict: bool = False, argv: Iterable[str] = ()) -> RunResult:
    """Run `events` through the pipeline `config_text` configures.

    The source is always the in-memory one; the sinks are those the config
    activates (default: one "memory" sink). Installed plugin packages are
    loaded (entry_points=True) as the command line would load them, and
    `argv` holds command-line flags (e.g. a plugin's own) folded in as the
    command line folds them. Nothing process-wide is changed (no GC tuning,
    no signal handlers).
    """
    from tcpstates.cli import build_parser, configure
    from tcpstates.registry import make_plugin_manager
    from tcpstates.runconfig import plugins_section
    from tcpstates.session import build_pipeline, execute

    config = tomllib.loads(config_text)
    general = config.setdefault("tcpstates", {})
    general["source"] = "events"
    general.setdefault("sinks", ["memory"])
    warner = Warner()
    items = list(events)
    plugin = _TestingPlugin([items[i:i + batch_size] for i in range(0, len(items), batch_size)])
    registry = make_plugin_manager(entry_points=entry_points, blocked=plugins_section(config).disable,
                                   extra_plugins=[plugin, *plugins], warner=warner, strict=strict)
    args = build_parser(registry).parse_args([*argv, *(["--strict"] if strict else [])])
    plan = configure(args, config, registry)
    context = RunContext(strict=plan.strict, warner=warner)
    summary = execute(build_pipeline(plan, context), registry, context)
    sinks = list(plugin.sinks)
    first = sinks[0] if sinks else None
    return RunResult(first.events if first else [], first.losses if first else [], summary, sinks)
