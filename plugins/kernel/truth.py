"""An independent in-kernel count of tracepoint hits: the exactness cross-check.

A private ftrace instance (instances/tcpstates-<pid>: its own buffer, it
neither sees nor disturbs anyone else's tracing; 64 KiB per CPU) has sock:inet_sock_set_state
enabled with the filter `protocol == 6` — the same test the BPF program makes
before it counts a hit. Its buffer is in overwrite mode: nobody reads
the records, only the per-CPU `stats` counters, where entries + overrun + read
is the number of events the kernel recorded. Compared with the BPF program's
own hits and the kernel's recursion misses, the difference is every event the
tracepoint fired for that our program never saw and nobody counted: reported
as "unaccounted" instead of vanishing.

Limits: ftrace has its own silent failure modes (its ring buffer's
per-CPU recursion guard, ring_buffer_write() of a filtered event failing),
so an exact cut that finds it short of ours is reported as "unknown", never
a number. None was ever seen, though: the "N short" figures once observed
under load (30-564 per check, 1- and 2-thread loopback load, with and
without `perf record -g` on the tracer, 2026-12-02) were all the pairing
slack of non-exact cuts described below, not ftrace losses. Logged per
cut, ftrace's count was never below ours when read after ours (+5..+16
events), and every shortfall equalled the events that arrived during the
cut's own 2 ms pause (e.g. -564 with 580 arriving); every exact cut, final
included, matched to the event (807,074 = 807,074 over 12 s, 2 threads,
64 KiB/CPU overwrite). So the buffer size, overwrite mode and the filter
are not the cause, and stay as they are.

Cuts: the two counts are read at different instants, so a comparison is only
exact when no event happened between the reads. The kernel stage brackets
the ftrace read with two reads of the BPF counters (and a second ftrace read
after a short pause, so an event whose probes straddle the reads shows up);
when nothing moved the cut is exact, otherwise `unaccounted()` pairs the
counts so the result is a proven lower bound. That pairing takes ours from
after the pause and ftrace's from before it, so under load it comes out
negative by the events of the pause: a bound below zero says nothing (it is
reported as 0, still a lower bound), and only exact cuts can show ftrace
short.
Instances left by a crashed run (their pid is gone) are removed at start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

PREFIX = "tcpstates-"
BUFFER_KB = 64     # per CPU
SETTLE_S = 0.002   # longer than any tracepoint call takes to run all its probes


@dataclasses.dataclass
class Cut:
    """Counts read around one instant: ftrace's before/after a pause, and
    ours (BPF hits + kernel misses) before/after. Equal pairs: exact."""

    truth_lo: int
    truth_hi: int
    seen_lo: int
    seen_hi: int
    ftrace_lost: int  # events ftrace itself could not record (its count short)
    quiet: bool = True  # no program run was in flight

    @property
    def exact(self) -> bool:
        return self.quiet and self.truth_lo == self.truth_hi and self.seen_lo == self.seen_hi


def unaccounted(start: Cut, end: Cut) -> tuple[int, bool]:
    """Events the tracepoint fired for between the cuts that we neither saw
    nor counted: (count, exact). When a cut is not exact the pairing that
    can only underestimate is used, so the count is a proven minimum."""
    truth = end.truth_lo - start.truth_hi
    seen = end.seen_hi - start.seen_lo
    exact = start.exact and end.exact
    if not exact and truth < seen:
        # the slack of the pairing (our count read later), not ftrace short
        return 0, False
    return truth - seen, exact


def remove_stale(tracefs: Path) -> list[str]:
    """Remove instances of tcpstates runs whose process is gone."""
    removed: list[str] = []
    inst = tracefs / "instances"
    try:
        names = os.listdir(inst)
    except OSError:
        return removed
    for name in names:
        rest = name[len(PREFIX):]
        if not name.startswith(PREFIX) or not (rest.isascii() and rest.isdigit()):
            continue
        if Path(f"/proc/{rest}").exists():
            continue
        with contextlib.suppress(OSError):
            (inst / name).rmdir()
            removed.append(name)
    return removed


class TruthCounter:
    """The ftrace instance; `read()` is its hit count (per-CPU sum)."""

    def __init__(self, tracefs: Path, family: int | None = None) -> None:
        remove_stale(tracefs)
        self.dir = tracefs / "instances" / f"{PREFIX}{os.getpid()}"
        self.dir.mkdir()
        try:
            # overwritten, never read: only the counters matter. Not the
            # smallest size, though: a writer interrupted mid-record by a
            # softirq burst that wraps the whole buffer loses records as
            # "commit overrun" (1 KiB lost 151 in 1 of 12 storms, leaving
            # the cross-check unable to conclude; 64 KiB: none in 15)
            (self.dir / "buffer_size_kb").write_text(str(BUFFER_KB))
            (self.dir / "options" / "overwrite").write_text("1")
            event = self.dir / "events" / "sock" / "inet_sock_set_state"
            (event / "filter").write_text("protocol == 6")
            (event / "enable").write_text("1")
            (self.dir / "tracing_on").write_text("1")
            # opened now, read with pread later: still readable after the
            # tracer drops root (--user), and no path is looked up again
            self._stats = [os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                           for path in sorted((self.dir / "per_cpu").glob("cpu*/stats"))]
            self._event = event
        except BaseException:
            self.close()
            raise

    def read(self) -> tuple[int, int]:
        """(events recorded, events ftrace itself lost)."""
        total = lost = 0
        for fd in self._stats:
            for line in os.pread(fd, 4096, 0).decode().splitlines():
                key, _, value = line.partition(":")
                value = value.strip()
                if not value.isdigit():
                    continue
                if key in ("entries", "overrun", "read events"):
                    total += int(value)
                elif key in ("commit overrun", "dropped events"):
                    lost += int(value)
        return total, lost

    def close(self) -> None:
        """Stop recording at once; remove the instance in a detached child.

        Disabling the event and removing the instance wait for RCU grace
        periods (the tracepoint's probe list changes), which can take seconds
        on a busy host; the tracer's exit must not wait for that."""
        for fd in getattr(self, "_stats", []):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stats = []
        with contextlib.suppress(OSError):
            (self.dir / "tracing_on").write_text("0")
        try:
            pid = os.fork()
        except OSError:
            pid = 0
            self._remove()
            return
        if pid == 0:
            try:
                os.setsid()
                if os.fork() == 0:   # the grandchild, re-parented: nobody waits for it
                    self._remove()
            finally:
                os._exit(0)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)      # the first child exits at once

    def _remove(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            (self._event / "enable").write_text("0")
        with contextlib.suppress(OSError):
            self.dir.rmdir()
