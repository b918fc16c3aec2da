"""Importing bcc and silencing what its compiler prints: used only by the loader's
helper process (the tracer itself never imports bcc)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Any, Iterator

from tcpstates.errors import EnvironmentProblem

BCC_PACKAGES = ("Debian/Ubuntu: apt-get install python3-bpfcc; Fedora: dnf install python3-bcc; "
                "Arch: pacman -S python-bcc")


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise EnvironmentProblem(
            f"bcc's Python module cannot be imported ({exc}); install it from your OS "
            f"({BCC_PACKAGES}) and use a Python that sees it (a venv needs "
            f"--system-site-packages). The PyPI package named 'bcc' is unrelated.") from None
    if not hasattr(bcc, "BPF"):
        raise EnvironmentProblem(
            f"the 'bcc' module at {getattr(bcc, '__file__', '?')} is not BPF Compiler "
            f"Collection (the unrelated PyPI package 'bcc'?); pip uninstall bcc and install "
            f"the OS package ({BCC_PACKAGES})")
    return bcc


@contextlib.contextmanager
def captured_output(into: IO[bytes] | None = None) -> Iterator[list[str]]:
    """Capture fds 1 and 2 while bcc compiles: clang and libbcc print there
    directly (libbcc's header warnings even go to stdout), and nothing may
    reach stdout before the header.

    `into` is a file the caller owns (the loader's parent process): if LLVM
    ends the process with a fatal error, what it printed is still there."""
    out: list[str] = []
    with (contextlib.nullcontext(into) if into is not None else tempfile.TemporaryFile()) as tmp:
        start = tmp.seek(0, os.SEEK_END)
        saved = [os.dup(1), os.dup(2)]
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(start)
            out.append(tmp.read().decode("utf-8", "replace"))
