"""Pipes in the states the fault tests need: full, with a reader that takes nothing."""

from __future__ import annotations

import os


def fill(w: int) -> int:
    """Write whole 4 KiB buffers into non-blocking `w` until the pipe or FIFO
    is full; the bytes written."""
    filled = 0
    try:
        while True:
            filled += os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    return filled


def full_pipe(room: int = 0) -> tuple[int, int, int]:
    """(read end, blocking write end, bytes in it): a pipe holding all it can
    but `room` bytes (a reader that stopped reading)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = fill(w)
    os.set_blocking(w, True)
    if room:
        os.read(r, room)   # whole 4 KiB buffers were written: this frees exactly `room` bytes
        filled -= room
    return r, w, filled
