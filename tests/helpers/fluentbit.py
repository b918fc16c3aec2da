"""The real Fluent Bit as a test peer: start it with a config, wait until it
is ready, stop it (SIGTERM) or crash it (SIGKILL); never left running.

Found via env FLUENT_BIT, defaulting to ../shared/tools/fluent-bit/fluent-bit
relative to the project root (where CI has it). Records leave Fluent Bit
through its `forward` output into our Python `ForwardReceiver`, which keeps
the EventTime to the nanosecond and counts every entry.

Readiness: Fluent Bit's own HTTP server (`/api/v1/health`) answering, then
(for network inputs) the listening socket accepting — no fixed sleeps.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
# ../shared relative to the project root; one level more for a git worktree
# under <project>/../wt/<name>
CANDIDATES = [base / "shared" / "tools" / "fluent-bit" / "fluent-bit" for base in (ROOT.parent, ROOT.parents[1])]


def binary() -> str | None:
    """$FLUENT_BIT if set (whether or not it can run: `unusable()` says), else the
    first default that exists, else None."""
    if os.environ.get("FLUENT_BIT"):
        return os.environ["FLUENT_BIT"]
    return next((str(p) for p in CANDIDATES if os.access(p, os.X_OK)), None)


def unusable() -> str | None:
    """Why $FLUENT_BIT, when set, names no runnable binary; None if it does (or is
    not set). A binary named explicitly that cannot run is a broken set-up, to
    be reported as an error, never a reason to skip the tests."""
    path = os.environ.get("FLUENT_BIT")
    if path and not (os.path.isfile(path) and os.access(path, os.X_OK)):
        why = "does not exist" if not os.path.lexists(path) else "is not an executable file"
        return f"FLUENT_BIT={path} {why}: point it at a Fluent Bit binary or unset it"
    return None


@functools.cache
def cannot_run() -> str | None:
    """Why the found binary can never run on this OS, else None. Only a C library
    older than the one it was built against counts (the shared build is Debian 12's,
    glibc 2.36; Ubuntu 22.04 has 2.35): nothing can be installed to fix that. Any
    other failure (a missing library: set-up's job) is left to fail the tests."""
    path = binary()
    if path is None or unusable() is not None:
        return None
    try:
        r = subprocess.run([path, "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    err = r.stderr.decode(errors="replace")
    m = re.search(r"version `(GLIBC_[0-9.]+)' not found", err)
    if r.returncode != 0 and m:
        have = os.confstr("CS_GNU_LIBC_VERSION") or "an older glibc"
        return f"Fluent Bit at {path} needs {m.group(1)}, this OS has {have}: build it for this OS or set FLUENT_BIT"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.05,
               fail: bool = True) -> bool:
    """Poll `cond` (a state we cannot be told about) until true, bounded.
    With fail=False, return False on timeout (the caller reports what is missing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    if fail:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    return False


def forward_output(address: str, match: str = "*") -> str:
    """An [OUTPUT] section shipping to our receiver (host:port or unix path)."""
    if address.startswith("unix://"):
        dest = f"    Unix_Path {address[len('unix://'):]}\n"
    else:
        host, port = address.rsplit(":", 1)
        dest = f"    Host {host}\n    Port {port}\n"
    return (f"[OUTPUT]\n    Name forward\n    Match {match}\n{dest}"
            f"    Retry_Limit False\n    Require_ack_response On\n")


class FluentBit:
    """One Fluent Bit process running `config` (classic format) from `workdir`."""

    def __init__(self, config: str, workdir: Path, *, wait_for: tuple[str, int] | str | None = None,
                 stdin: int | None = subprocess.DEVNULL, extra_args: tuple[str, ...] = (),
                 ready: bool = True) -> None:
        exe = binary()
        if exe is None:
            raise RuntimeError("no Fluent Bit binary (set FLUENT_BIT)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.http_port = free_port()
        service = (f"[SERVICE]\n    Flush 0.2\n    Grace 5\n    Log_Level info\n"
                   f"    HTTP_Server On\n    HTTP_Listen 127.0.0.1\n    HTTP_Port {self.http_port}\n"
                   f"    Health_Check On\n")
        self.config_path = workdir / "fluent-bit.conf"
        # the caller's [SERVICE] keys (parsers, storage) are merged into ours
        m = re.search(r"^\[SERVICE\]\n((?:[^\[\n].*\n|\n)*)", config, flags=re.M)
        if m:
            service += "\n".join(line for line in m.group(1).splitlines()
                                 if line.strip() and not line.lstrip().startswith(("#", "Flush"))) + "\n"
            config = config[:m.start()] + config[m.end():]
        self.config_path.write_text(service + "\n" + config)
        self.log_path = workdir / f"fluent-bit.{int(time.monotonic() * 1000)}.log"
        self.argv = [exe, "-c", str(self.config_path), *extra_args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=workdir)
        if ready:
            self.wait_ready(wait_for)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _health(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"fluent-bit exited {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/v1/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, wait_for: tuple[str, int] | str | None = None, timeout: float = 15) -> None:
        try:
            wait_until(self._health, timeout, "Fluent Bit's HTTP health endpoint")
            if wait_for is not None:
                wait_until(lambda: _accepts(wait_for), timeout, f"Fluent Bit listening on {wait_for}")
        except BaseException:
            self.kill()
            raise

    def metrics(self) -> dict:
        import json
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/v1/metrics", timeout=2) as r:
            return json.loads(r.read())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"fluent-bit did not stop on signal {sig} within {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _accepts(target: tuple[str, int] | str) -> bool:
    family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(target)
            return True
        except OSError:
            return False
