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
batch is being sent and given back as they were.
"""

from __future__ import annotations

import errno
import signal
import threading
import time
from typing import Any, Callable, Sequence

from tcpstates import interrupt
from tcpstates.outputs import OutputStalled

TICK_S = 0.05   # how often a blocked send wakes up to look at the clock and for a stop


def _tick(signum: int, frame: Any) -> None:
    """Only here to interrupt a blocked sendmsg."""


class BoundedSends:
    """`with sends.batch(): sends.send(fields)` — every send bounded by stall_timeout."""

    def __init__(self, sendv: Callable[..., None], stall_timeout: float) -> None:
        self._sendv = sendv
        self.stall_timeout = stall_timeout
        self._progress = 0.0
        self._previous: Any = None
        self._armed = False

    def __enter__(self) -> "BoundedSends":
        self._progress = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGALRM, _tick)
            signal.setitimer(signal.ITIMER_REAL, TICK_S, TICK_S)
            self._armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            # None: a handler not set from Python; the default is the safe choice
            signal.signal(signal.SIGALRM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._armed = False

    def send(self, fields: Sequence[str]) -> None:
        while True:
            try:
                self._sendv(*fields)
            except InterruptedError:
                if interrupt.requested():
                    raise interrupt.StopRequested() from None
                if time.monotonic() - self._progress >= self.stall_timeout:
                    raise OutputStalled(errno.ETIMEDOUT, f"journald took nothing for "
                                        f"{self.stall_timeout:g} s (stall_timeout); is "
                                        f"systemd-journald stopped or overloaded?") from None
                continue
            self._progress = time.monotonic()
            return
