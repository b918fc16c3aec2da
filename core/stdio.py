"""Standard descriptors that were closed when we started (`>&-`, `2>&-`).

A closed fd 0/1/2 is taken by the next file we open — a BPF map, the journal
socket, an output file — and a later write to "stdout" would land there.
`guard()` puts /dev/null on each closed one first and remembers which were
closed, so a sink writing to stdout fails cleanly ("standard output is
closed") instead of writing into something else.
"""

from __future__ import annotations

import fcntl
import os

_closed: set[int] = set()


def guard() -> None:
    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            _closed.add(fd)
    for fd in sorted(_closed):
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)


def was_closed(fd: int) -> bool:
    return fd in _closed


def settle() -> None:
    """At exit: flush sys.stdout and sys.stderr now, and where that fails (a
    full disk, a closed pipe) put /dev/null under the stream. Python flushes
    them once more at shutdown, and a failure there replaces the exit status
    with 120 (the status that says how the run went would be lost); what
    could not be written was already counted or said."""
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
                os.close(null)
            except (OSError, ValueError, AttributeError):
                pass
