"""Sends to journald that a stopped or swamped journald cannot hold forever.

libsystemd's `sd_journal_sendv` blocks in sendmsg() while journald's socket
queue is full (journald stopped, or slower than the event rate), and
systemd-python holds the GIL meanwhile, so neither a thread nor a poll can
help: the whole tracer, with every other sink, would wait. An interval
timer does: while a batch is being sent, SIGALRM (a no-op Python handler,
installed without SA_RESTART as Python does) arrives every TICK_S, the
blocked sendmsg returns EINTR and libsystemd passes it up as
InterruptedError. A datagram is all or nothing, so the entry was not sent
and is sent again, until `stall_timeout` passes without one entry accepted
(OutputStalled: the rest of the batch is counted as not written for this
sink alone, as for a stalled pipe) or a stop is requested (StopRequested).

Python runs signal handlers only in the main thread; elsewhere (library use
from a worker thread) the timer is not used and sends block as libsystemd
does. The timer and SIGALRM are the process's: they are taken only while a
batch is being sent and given back as they were (a pending interval timer
re-armed with what was left of it); a SIGALRM handler installed outside
Python cannot be given back, so then no timer is used.
"""

from __future__ import annotations

import errno
import signal
import threading
import time
from typing import Any, Callable, Sequence

from tcpstates import interrupt
from tcpstates.outputs import OutputStalled

TICK_S = 0.05    # how often a blocked send wakes up to look at the clock and for a stop
PROBE_S = 0.01   # while journald stays stalled: how long a batch tries before it gives up


def _tick(signum: int, frame: Any) -> None:
    """Only here to interrupt a blocked sendmsg."""


class BoundedSends:
    """`with sends: sends.send(fields)` — every send bounded by stall_timeout.

    Once a batch has given up, the next ones try only for PROBE_S until an
    entry is accepted again: a journald that stays stopped must not cost the
    other sinks stall_timeout per batch (at a busy host's rate that would
    fill the kernel buffer and drop events for every sink)."""

    def __init__(self, sendv: Callable[..., None], stall_timeout: float) -> None:
        self._sendv = sendv
        self.stall_timeout = stall_timeout
        self.stalled = False
        self._limit = stall_timeout
        self._progress = 0.0
        self._previous: Any = None
        self._timer: tuple[float, float] = (0.0, 0.0)
        self._entered = 0.0
        self._armed = False

    def __enter__(self) -> "BoundedSends":
        self._progress = self._entered = time.monotonic()
        self._limit = PROBE_S if self.stalled else self.stall_timeout
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGALRM)
            # None: a handler set outside Python, which could not be put back:
            # then no timer (sends block as libsystemd does)
            if previous is not None:
                self._previous = signal.signal(signal.SIGALRM, _tick)
                self._timer = signal.setitimer(signal.ITIMER_REAL, min(TICK_S, self._limit), TICK_S)
                self._armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._armed:
            return
        self._armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)
        remaining, interval = self._timer
        if remaining > 0:
            # the process's own timer goes on where it was (less the time spent
            # here; due already: it fires at once)
            left = max(remaining - (time.monotonic() - self._entered), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, interval)

    def send(self, fields: Sequence[str]) -> None:
        while True:
            try:
                self._sendv(*fields)
            except InterruptedError:
                if interrupt.requested():
                    raise interrupt.StopRequested() from None
                if time.monotonic() - self._progress >= self._limit:
                    self.stalled = True
                    raise OutputStalled(errno.ETIMEDOUT, f"journald took nothing for "
                                        f"{self.stall_timeout:g} s (stall_timeout); is "
                                        f"systemd-journald stopped or overloaded?") from None
                continue
            self._progress = time.monotonic()
            self.stalled = False
            return
