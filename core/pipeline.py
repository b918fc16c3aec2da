"""The bus: source → filters/enrichers (config order) → every sink, in batches.

Stages are plain objects called once per batch. Failures are isolated per
stage with its `on_error` policy and counted for the exit summary:
filters/enrichers `skip` (let the event through untouched), `drop` (drop the
event) or `fail` (end the run); sinks `ignore` (count and carry on),
`disable` (stop using that sink) or `fail`. `--strict` turns every policy
into `fail`. A sink whose reader went away (EPIPE): a table for people
(text, csv: `tcpstates | head -3`) is closed quietly and the run ends when no
sink is left; a structured sink (jsonl into a shipper) ends the run at once
and the CLI reports it with a non-zero status (`broken_pipes`), because every
event from then on would be lost without a word.

A run whose every sink failed (`every_sink_failed`: disabled by an error, its
last attempt an error, or nothing of what it was given delivered) ends with
status 1: the summary's "not written" is then all there is to show for it. A
warning about a failing sink says "the other sinks continue" only when another
sink still works; otherwise it says that nothing is being written.

Back-pressure policy: sinks are called synchronously, one after another, but
no sink may hold the others up. A line-writing sink (text, csv, jsonl) whose
reader takes nothing for its `stall_timeout` (default 1 s; a stopped shipper,
a paused pager such as `tcpstates | less`), or the journal sink while a
stopped journald takes nothing, fails that write with
OutputStalled: the batch, or its unwritten part, is counted as not written
for that sink alone, warned about once per episode, and the next batch tries
it again — only briefly (10 ms) until the reader takes something, so a
reader that stays stopped costs one stall_timeout, not one per batch — while
the other sinks keep receiving. A person paging longer than
stall_timeout therefore loses (counted) events; `-o
sinks.text.stall_timeout=...` raises it. A sink slower than the event rate
(but not stalled) still slows the reader: the kernel buffer fills, and the
kernel stage counts every record it cannot hand over ("dropped") — reported
in-band and at exit. Nothing is lost without being counted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from tcpstates import interrupt
from tcpstates.api import ChainStage as ChainStageBase
from tcpstates.api import Enricher, Filter, KernelConstraints, RunContext, Sink, Source
from tcpstates.runconfig import StageSpec
from tcpstates.errors import EnvironmentProblem, SinkUnavailable, StageError, UsageError, written_before
from tcpstates.events import Event
from tcpstates.outputs import OutputStalled

LOSS_POLL_INTERVAL = 0.5
# what to do when no sink works (the end of a warning)
NEXT_STEP = ("fix the output (disk space, permissions, a reader for the pipe) or add a sink "
             "that works (--sink NAME); exit status 1 if every sink has failed at the end")
DRAIN_BUDGET_S = 1.5
# What a stage method may raise that is that stage's failure: a stage that calls
# sys.exit() (a plugin's CLI habit) fails like any other, under its on_error
# policy; it must not end the run silently for every other sink, without a
# summary and with an exit status of its choosing.
STAGE_FAILURES = (Exception, SystemExit)


@dataclasses.dataclass
class ChainLink:
    label: str
    stage: ChainStageBase
    on_error: str
    is_filter: bool
    errors: int = 0
    removed: int = 0


def _create(spec: StageSpec, context: RunContext) -> Any:
    """The stage object of `spec`. A constructor that raises (a plugin's bug, a
    file it cannot read) is one line naming the stage and where it comes from,
    never an "internal error" that leaves the reader guessing which plugin."""
    info = spec.info
    try:
        return info.cls(spec.options, context)
    except (UsageError, EnvironmentProblem, StageError):
        raise                  # already one clear line
    except STAGE_FAILURES as exc:
        what = f"{info.kind} {spec.label} ({info.name})"
        if info.distribution == "tcpstates":    # a built-in: the host, not a plugin, is at fault
            raise EnvironmentProblem(f"{what} could not start: {type(exc).__name__}: {exc}") from exc
        raise UsageError(f"plugin {info.plugin!r} ({info.distribution} {info.version}) failed to create "
                         f"{what}: {type(exc).__name__}: {exc}; fix or disable it in [plugins]") from exc


@dataclasses.dataclass
class SinkSlot:
    label: str
    name: str
    sink: Sink
    on_error: str
    written: int = 0
    errors: int = 0
    lost: int = 0          # events this sink failed to write
    failing: bool = False
    episodes: int = 0      # failure episodes: one warning each
    active: bool = True
    broken: bool = False   # its last attempt raised an error (a stall is not one)
    disabled: bool = False  # stopped after an error (on_error=disable)
    reader_gone: bool = False  # its reader closed the pipe (EPIPE)
    close_failed: bool = False  # its close raised (the summary's report not written)


class Pipeline:
    def __init__(self, source: StageSpec, chain: list[StageSpec], sinks: list[StageSpec],
                 context: RunContext) -> None:
        self.context = context
        self.source: Source = _create(source, context)
        self.chain = [ChainLink(s.label, _create(s, context),
                                 "fail" if context.strict else s.on_error,
                                 issubclass(s.info.cls, Filter)) for s in chain]
        # stages that must see every event the source delivers (e.g. owner
        # tracking), whatever filters come before them in the chain
        self.observers = [c for c in self.chain if type(c.stage).observes()]
        self.sinks = [SinkSlot(s.label, s.name, _create(s, context),
                               "fail" if context.strict else s.on_error) for s in sinks]
        self.seen = 0
        self.kept = 0
        self.loss: dict[str, int] = {"dropped": 0, "kernel_misses": 0}
        self.stopping = False
        self.reopen_requested = False
        self.report_requested = False
        self.readers_gone = False
        self.broken_pipes: list[str] = []   # structured sinks whose reader went away
        self._started = False

    # -- set-up ---------------------------------------------------------------
    def kernel_constraints(self) -> list[KernelConstraints]:
        out = []
        for c in self.chain:
            kc = c.stage.kernel_constraints()
            if kc is None:
                continue
            if not c.is_filter:
                # an enricher must not narrow what is traced: keep only its cflags
                kc = KernelConstraints(cflags=kc.cflags)
            out.append(kc)
        return out

    def aggregates_exact(self) -> bool:
        """Would a source's aggregates count exactly the events the chain keeps?
        Only when the kernel decides every filter fully (`KernelConstraints.complete`)
        and no enricher may drop events (on_error = "drop"); otherwise the
        sinks must count from the events themselves."""
        for c in self.chain:
            if c.is_filter:
                kc = c.stage.kernel_constraints()
                if kc is None or not kc.complete:
                    return False
            elif c.on_error == "drop":
                return False
        return True

    def events_needed(self) -> bool:
        """Does anything need the events themselves? Not when every sink takes
        aggregates and every chain stage is a filter the kernel fully decides;
        enrichers and observers always do."""
        if any(not type(s.sink).consumes_aggregates for s in self.sinks):
            return True
        return any(not c.is_filter or type(c.stage).observes() for c in self.chain) \
            or not self.aggregates_exact()

    def start(self, on_started: Callable[[], None] | None = None) -> None:
        """Attach the source, then open sinks: nothing is printed before we trace."""
        if any(type(s.sink).consumes_aggregates for s in self.sinks) and self.aggregates_exact():
            self.source.request_aggregates(events_needed=self.events_needed())
        self.source.start(self.kernel_constraints())
        for slot in self.sinks:
            # one sink that cannot start (/dev/full, stdout closed, a FIFO nobody
            # opens before a stop) is that sink's failure, never the others'
            try:
                slot.sink.open()
            except BrokenPipeError:
                # the reader left before the first line (its header): as later
                self._reader_gone(slot)
            except interrupt.StopRequested:
                self.stopping = True
                slot.active = False
            except StageError:
                raise
            except STAGE_FAILURES as exc:
                if isinstance(exc, UsageError) and not isinstance(exc, SinkUnavailable):
                    raise              # a configuration mistake: one line, exit 2
                self._sink_failed(slot, exc)
        self._started = True
        if on_started is not None:
            on_started()

    # -- per batch --------------------------------------------------------------
    def _run_chain(self, batch: list[Event]) -> list[Event]:
        for c in self.observers:
            try:
                c.stage.observe_batch(batch)
            except STAGE_FAILURES as exc:
                c.errors += 1
                if c.on_error == "fail":
                    raise StageError(f"{c.label} ({c.stage.name}) failed: {type(exc).__name__}: {exc}") from exc
                self.context.warn(f"{c.label} ({c.stage.name}) raised {type(exc).__name__}: {exc} while "
                                  f"observing; on_error={c.on_error}", once_key=f"observe:{c.label}")
        for c in self.chain:
            if not batch:
                break
            stage = c.stage
            try:
                if isinstance(stage, Filter):
                    before = len(batch)
                    batch = stage.filter_batch(batch)
                    c.removed += before - len(batch)
                elif isinstance(stage, Enricher):
                    stage.enrich_batch(batch)
            except STAGE_FAILURES as exc:
                batch = self._chain_per_event(c, batch, exc)
        return batch

    def _chain_per_event(self, c: ChainLink, batch: list[Event], first: BaseException) -> list[Event]:
        """A batch call failed: redo it event by event so only bad events suffer."""
        out = []
        stage = c.stage
        for e in batch:
            try:
                if isinstance(stage, Filter):
                    if stage.keep(e):
                        out.append(e)
                    else:
                        c.removed += 1
                    continue
                if isinstance(stage, Enricher):
                    stage.enrich(e)
                out.append(e)
            except STAGE_FAILURES as exc:
                c.errors += 1
                if c.on_error == "fail":
                    raise StageError(f"{c.label} ({c.stage.name}) failed: {type(exc).__name__}: {exc}") from exc
                self.context.warn(f"{c.label} ({c.stage.name}) raised {type(exc).__name__}: {exc}; "
                                  f"on_error={c.on_error}, counting further errors silently",
                                  once_key=f"chain:{c.label}")
                if c.on_error == "skip":
                    out.append(e)
                else:
                    c.removed += 1
        return out

    def _write(self, batch: list[Event]) -> None:
        for slot in self.sinks:
            if not slot.active:
                # closed (its reader left) or disabled: kept, never written there,
                # so written + not written = kept for every sink
                slot.lost += len(batch)
                continue
            try:
                # a sink returns how many events it handed over (None: all of them)
                accepted = slot.sink.write(batch)
                slot.sink.flush()
                accepted = len(batch) if accepted is None else accepted
                slot.written += accepted
                if accepted < len(batch):
                    slot.lost += len(batch) - accepted
                    continue
                slot.broken = False
                if slot.failing:
                    slot.failing = False
                    self.context.warn(f"sink {slot.name} ({slot.sink.name}) works again after losing "
                                      f"{slot.lost} events", once_key=f"recovered:{slot.name}:{slot.lost}")
            except BrokenPipeError as exc:
                self._count_partial(slot, batch, exc)
                self._reader_gone(slot)
            except interrupt.StopRequested as exc:
                # the consumer did not take it before the stop: counted, not an error
                self._count_partial(slot, batch, exc)
                self.context.warn(f"sink {slot.name} ({slot.sink.name}): its output accepted nothing "
                                  f"more before the stop; the rest is counted as not written",
                                  once_key=f"stopped:{slot.name}")
            except STAGE_FAILURES as exc:
                self._count_partial(slot, batch, exc)
                self._sink_failed(slot, exc)

    @staticmethod
    def _count_partial(slot: SinkSlot, batch: list[Event], exc: BaseException) -> None:
        """A write that failed part-way: the events `mark_written` said made it (default none)."""
        done = written_before(exc, len(batch))
        slot.written += done
        slot.lost += len(batch) - done

    @staticmethod
    def _close_sink(slot: SinkSlot) -> BaseException | None:
        """Close a sink; the error closing it, if any (its reader gone or a
        stop is not one). A sink whose close writes its output (the summary's
        report) failed when that write fails."""
        error: BaseException | None = None
        try:
            slot.sink.close()
        except (BrokenPipeError, interrupt.StopRequested):
            pass
        except STAGE_FAILURES as exc:
            error = exc
        # a line counted as written that the output closed torn: not written after all
        torn = slot.sink.unfinished()
        torn = torn if isinstance(torn, int) and 0 <= torn <= slot.written else 0
        slot.written -= torn
        slot.lost += torn
        return error

    def _reader_gone(self, slot: SinkSlot) -> None:
        slot.active = False
        slot.reader_gone = True
        self._close_sink(slot)
        if slot.sink.structured:
            self.broken_pipes.append(slot.name)
            self.stopping = True
            return
        if not any(s.active for s in self.sinks):
            self.stopping = True
            self.readers_gone = True

    def _sink_failed(self, slot: SinkSlot, exc: BaseException) -> None:
        slot.errors += 1
        if not slot.failing:
            slot.failing = True
            slot.episodes += 1
        # a stall is a slow reader (back-pressure), not a broken output
        slot.broken = not isinstance(exc, OutputStalled)
        what = f"sink {slot.name} ({slot.sink.name}) failed: {type(exc).__name__}: {exc}"
        if slot.on_error == "fail":
            raise StageError(what) from exc
        # "the other sinks continue" only when one of them still works
        others = any(s is not slot and s.active and not s.failing for s in self.sinks)
        if slot.on_error == "disable":
            slot.active = False
            slot.disabled = True
            left = any(s.active for s in self.sinks)
            if others:
                self.context.warn(f"{what}; disabled (on_error=disable); the other sinks continue")
            elif left:
                self.context.warn(f"{what}; disabled (on_error=disable); no other sink works, so "
                                  f"nothing is being written: {NEXT_STEP}")
            else:
                self.context.warn(f"{what}; disabled (on_error=disable); no sink is left, so nothing "
                                  f"is written and the run stops: {NEXT_STEP}")
            if not left:
                self.stopping = True
        elif others:
            self.context.warn(f"{what}; the other sinks continue, its lost events are counted and "
                              f"it is retried with every batch (on_error=ignore)",
                              once_key=f"sink:{slot.name}:{slot.episodes}")
        else:
            self.context.warn(f"{what}; no other sink works, so nothing is being written: its lost "
                              f"events are counted and it is retried with every batch (on_error=ignore); "
                              f"{NEXT_STEP}", once_key=f"sink:{slot.name}:{slot.episodes}")

    def process(self, batch: list[Event]) -> None:
        self.seen += len(batch)
        batch = self._run_chain(batch)
        if batch:
            self.kept += len(batch)
            self._write(batch)

    def check_loss(self) -> None:
        counters = self.source.loss_counters()
        for kind, total in counters.items():
            self.loss.setdefault(kind, 0)   # a kind reported as 0 is still shown
            new = total - self.loss[kind]
            if new > 0:
                self.loss[kind] = total
                for slot in self.sinks:
                    if slot.active:
                        try:
                            slot.sink.write_loss(kind, new, total)
                            slot.sink.flush()
                        except BrokenPipeError:
                            self._reader_gone(slot)
                        except interrupt.StopRequested:
                            pass   # the stop goes on; the summary reports the loss
                        except STAGE_FAILURES as exc:
                            self._sink_failed(slot, exc)

    def push_aggregates(self) -> None:
        """Hand the source's latest aggregates to the sinks that consume them."""
        if not self.context.aggregates:
            return
        snapshot = self.source.aggregates()
        if snapshot is None:
            return
        for slot in self.sinks:
            if slot.active and type(slot.sink).consumes_aggregates:
                try:
                    slot.sink.write_aggregates(snapshot)
                except STAGE_FAILURES as exc:
                    self._sink_failed(slot, exc)

    def reopen(self) -> None:
        for slot in self.sinks:
            if slot.active:
                try:
                    slot.sink.reopen()
                except interrupt.StopRequested:
                    # a stop came while the reopen waited (a FIFO's reader, the
                    # opener): the sink stays closed, the drain's events are counted
                    pass
                except STAGE_FAILURES as exc:
                    self._sink_failed(slot, exc)

    # -- the loop -------------------------------------------------------------------
    def run(self, poll_timeout: float = 0.25) -> None:
        next_loss = time.monotonic() + LOSS_POLL_INTERVAL
        while not self.stopping:
            batch = self.source.read(poll_timeout)
            if batch is None:
                break
            if batch:
                self.process(batch)
            if self.reopen_requested:
                self.reopen_requested = False
                self.reopen()
            if self.report_requested:
                self.report_requested = False
                self.push_aggregates()
                for slot in self.sinks:
                    if slot.active:
                        try:
                            slot.sink.report()
                        except STAGE_FAILURES as exc:
                            self._sink_failed(slot, exc)
            now = time.monotonic()
            if now >= next_loss:
                next_loss = now + LOSS_POLL_INTERVAL
                self.check_loss()
                self.push_aggregates()
        self.drain()

    def drain(self) -> None:
        """After a stop request: take what the kernel already buffered, bounded in time."""
        deadline = time.monotonic() + DRAIN_BUDGET_S
        while any(s.active for s in self.sinks) and time.monotonic() < deadline:
            batch = self.source.read(0)
            if not batch:
                break
            self.process(batch)
        self.check_loss()

    def close(self) -> None:
        if self._started:
            self.push_aggregates()     # the final totals, while the source is open
        for slot in self.sinks:
            if slot.active:
                try:
                    slot.sink.flush()
                except (BrokenPipeError, interrupt.StopRequested):
                    pass
                except STAGE_FAILURES as exc:
                    self._sink_failed(slot, exc)
                error = self._close_sink(slot)
                slot.active = False
                if error is not None:
                    # the last thing it did failed: never a success at exit
                    slot.errors += 1
                    slot.broken = True
                    slot.close_failed = True
                    self.context.warn(f"sink {slot.name} ({slot.sink.name}) failed when closed: "
                                      f"{type(error).__name__}: {error}")
        self.source.close()

    def summary(self) -> dict[str, Any]:
        written = {s.name: s.written for s in self.sinks}
        lost = {s.name: s.lost for s in self.sinks if s.lost}
        delivery = {}
        for s in self.sinks:
            report = s.sink.delivery_report()
            if report is not None:
                # a receiver that acks: written = acknowledged, not merely queued
                delivery[s.name] = report
                written[s.name] = report["acknowledged"]
                if report["lost"] or s.lost:
                    lost[s.name] = s.lost + report["lost"]
        return {
            "events": self.seen,
            "kept": self.kept,
            "written": written,
            "delivery": delivery,
            "dropped": self.loss.get("dropped", 0),
            "kernel_misses": self.loss.get("kernel_misses", 0),
            **({"unaccounted": self.loss.get("unaccounted", 0)} if "unaccounted" in self.loss else {}),
            **({"unread_at_exit": self.loss["unread_at_exit"]} if self.loss.get("unread_at_exit") else {}),
            "filtered": sum(c.removed for c in self.chain if c.is_filter),
            "skipped": self.loss.get("replay_skipped", 0),
            "errors": {**{c.label: c.errors for c in self.chain if c.errors},
                       **{f"sinks.{s.name}": s.errors for s in self.sinks if s.errors}},
            "lost_by_sink": lost,
            "source_notes": {k: v for k, v in self.source.notes().items() if v},
        }

    def failed_sinks(self, summary: dict[str, Any]) -> dict[str, str]:
        """The sinks that failed at the end of the run, each with how: disabled
        by an error, its last attempt an error, or nothing delivered of what
        it was given (written per `summary`: acknowledged for a sink that
        reports delivery). A sink whose reader left (`| head`) did not fail."""
        out = {}
        for s in self.sinks:
            if s.reader_gone:
                continue
            written = summary["written"].get(s.name, 0)
            lost = summary["lost_by_sink"].get(s.name, 0)
            how = ("disabled after an error" if s.disabled else
                   "closing it failed" if s.close_failed else
                   "its last write failed" if s.broken else
                   "delivered nothing" if lost and not written else None)
            if how is not None:
                out[s.name] = f"{s.name}: {how}, {written} of {written + lost} events written"
        return out

    def every_sink_failed(self, summary: dict[str, Any]) -> bool:
        """Did every sink of the run fail (so it exits with status 1)? A table
        whose reader left on purpose (`| head`) is set aside, neither a success
        nor a failure: a jsonl sink beside it that delivered nothing still
        makes the run a failure."""
        stayed = [s for s in self.sinks if not s.reader_gone]
        return bool(stayed) and len(self.failed_sinks(summary)) == len(stayed)


def summary_line(summary: dict[str, Any]) -> str:
    written = ", ".join(f"{k} {v}" for k, v in summary["written"].items()) or "none"
    line = (f"tcpstates: {summary['events']} events seen, {summary['kept']} kept, "
            f"written: {written}; {summary['dropped']} dropped, "
            f"{summary['kernel_misses']} kernel misses")
    if summary.get("unread_at_exit"):
        line += f", {summary['unread_at_exit']} unread at exit"
    if "unaccounted" in summary:
        # the in-kernel cross-check ran: every silent loss shows here
        line += f", {summary['unaccounted']} unaccounted"
    for key, value in summary.get("source_notes", {}).items():
        line += f"; {value} {key.replace('_', ' ')}"
    if summary.get("skipped"):
        line += f"; {summary['skipped']} unreadable records skipped"
    if summary["errors"]:
        line += "; errors: " + ", ".join(f"{k} {v}" for k, v in summary["errors"].items())
    for name, report in summary.get("delivery", {}).items():
        # a receiver asked for no acks (forward ack = false) confirms nothing:
        # say "sent", never "acknowledged"
        done = "acknowledged" if report.get("confirmed", 1) else "sent (no acks asked)"
        line += f"; {name}: {report['queued']} queued, {report['acknowledged']} {done}, {report['lost']} lost"
    if summary.get("lost_by_sink"):
        line += "; not written: " + ", ".join(f"{k} {v}" for k, v in summary["lost_by_sink"].items())
    return line
