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
