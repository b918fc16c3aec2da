"""Stop requests that interrupt every blocking call of the tracer.

SIGINT/SIGTERM call `request()`, which makes a private pipe readable for good.
Every call that may block on something outside our control — writing to a
full pipe, opening a FIFO without a reader, reading replay input — waits
through `wait()` on its descriptor *and* that pipe, so a stop request ends the
wait at once (`StopRequested`) instead of when the consumer decides. Without
`install()` (library use, tests of single stages) waits are plain polls.
"""

from __future__ import annotations

import os
import select

__all__ = ["ForcedStop", "StopRequested", "install", "forget", "request", "requested", "wait", "sleep"]

_pipe: tuple[int, int] | None = None


class ForcedStop(BaseException):
    """A second SIGINT/SIGTERM while the first one could not take effect: some
    call (a third-party stage blocked without a timeout) never returned to let
    the run stop. Raised from the signal handler, so it ends that call."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopRequested(Exception):
    """A stop was requested while waiting; the caller gives up what it was doing."""

    def __init__(self) -> None:
        super().__init__("interrupted by a stop request")


def install() -> None:
    global _pipe
    if _pipe is None:
        _pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


def forget() -> None:
    """A forked helper that closed the pipe's descriptors: plain waits from now on."""
    global _pipe
    _pipe = None


def request() -> None:
    """Async-signal-safe enough: one write to a non-blocking pipe."""
    if _pipe is not None:
        try:
            os.write(_pipe[1], b"x")
        except OSError:
            pass   # already full: already requested


def requested() -> bool:
    if _pipe is None:
        return False
    r, _, _ = select.select([_pipe[0]], [], [], 0)
    return bool(r)


def wait(fd: int, events: int, timeout: float | None = None) -> bool:
    """Wait until `fd` is ready for `events` (select.POLLIN/POLLOUT) or errors.

    True when ready, False on timeout; StopRequested when a stop came first
    (or had already come)."""
    poller = select.poll()
    if fd >= 0:
        poller.register(fd, events)
    if _pipe is not None:
        poller.register(_pipe[0], select.POLLIN)
    ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
    if _pipe is not None and any(f == _pipe[0] for f, _ in ready):
        raise StopRequested()
    return bool(ready)


def sleep(seconds: float) -> None:
    """Sleep, unless a stop is requested (then StopRequested)."""
    wait(-1, 0, seconds)
