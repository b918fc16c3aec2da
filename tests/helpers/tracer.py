"""Runs `python -m tcpstates` in a subprocess and waits for it to be tracing.

Readiness is the tool's own sd_notify("READY=1"), sent after the probe is
attached and the buffer is being read — no sleeps.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def tcpstates_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcpstates", *args]


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(tcpstates_argv(*args), input=input, capture_output=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_cli_reader_gone(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI with a stdout whose reader is gone before the first write
    (what `| head -1` does, made certain)."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        return subprocess.run(tcpstates_argv(*args), stdout=w_fd, stderr=subprocess.PIPE,
                              timeout=timeout)
    finally:
        os.close(w_fd)


def one_line_error(r: subprocess.CompletedProcess, needle: str, status: int = 2) -> str:
    """Bad input's contract: exit `status`, one line on stderr naming `needle`,
    no traceback, no internal error. Returns that line."""
    err = r.stderr.decode()
    assert r.returncode == status, (r.returncode, err)
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    assert needle in err, err
    return err


class Tracer:
    def __init__(self, args: list[str], workdir: Path, env: dict | None = None,
                 ready_timeout: float = 60, stdin: int | None = subprocess.DEVNULL,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.stdout_path = workdir / "stdout"
        self.stderr_path = workdir / "stderr"
        self.notify_path = str(workdir / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        full_env = {**os.environ, "NOTIFY_SOCKET": self.notify_path, **(env or {})}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            argv = tcpstates_argv(*args)
            self.proc = subprocess.Popen(wrap(argv) if wrap else argv, stdout=out, stderr=err,
                                         stdin=stdin, env=full_env)
        self.started_at = time.monotonic()
        self.ready_after = self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.notify], [], [], 0.1)
            if r and b"READY=1" in self.notify.recv(4096):
                return time.monotonic() - self.started_at
            if self.proc.poll() is not None:
                raise AssertionError(f"tcpstates exited {self.proc.returncode} before ready: "
                                     f"{self.stderr_path.read_text()}")
        self.kill()
        raise AssertionError(f"tcpstates not ready within {timeout}s: {self.stderr_path.read_text()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.notify.close()
        return rc, self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
