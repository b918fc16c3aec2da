"""A private, real systemd-journald for tests (no systemd as PID 1 needed).

journald and libsystemd use fixed paths under /run, so journald runs in its
own mount namespace with a private directory bind-mounted over /run. Clients
using systemd-python must run inside that namespace (`argv()` wraps a command
in nsenter); readers use the journal files directly from the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

JOURNALD = os.environ.get("JOURNALD_BIN", "/lib/systemd/systemd-journald")
CONF = """[Journal]
Storage=volatile
RuntimeMaxUse=64M
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitBurst=0
"""


class PrivateJournald:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.run_dir = base / "run"
        self.journal_dir = self.run_dir / "log" / "journal"
        self.socket = self.run_dir / "systemd" / "journal" / "socket"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> "PrivateJournald":
        if not os.path.exists(JOURNALD):
            raise RuntimeError(f"{JOURNALD} missing: apt-get install systemd (./test.sh does)")
        if not Path("/etc/machine-id").is_file() or not Path("/etc/machine-id").read_text().strip():
            raise RuntimeError("/etc/machine-id missing or empty: run systemd-machine-id-setup")
        (self.run_dir / "systemd" / "journal").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "systemd" / "journald.conf.d").mkdir(parents=True, exist_ok=True)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "systemd" / "journald.conf.d" / "zz-test.conf").write_text(CONF)
        log = open(self.base / "journald.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             'mount --bind "$1/run" /run && exec "$2"', "sh", str(self.base), JOURNALD],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        # journald has no readiness signal of its own outside systemd: its
        # socket and its journal file appearing is the signal.
        while time.monotonic() < deadline:
            if self.socket.exists() and list(self.journal_dir.glob("*/system.journal")):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"journald did not start: {(self.base / 'journald.log').read_text()}")

    def argv(self, argv: list[str]) -> list[str]:
        assert self.proc is not None
        # --root/--wd: keep the target's root (entering a mount namespace resets it
        # to the namespace's, which differs from ours inside a chroot)
        return ["nsenter", "--target", str(self.proc.pid), "--mount", "--root", "--wd", "--", *argv]

    def sync(self) -> None:
        subprocess.run(self.argv(["journalctl", "--sync"]), check=True, timeout=30)

    def read(self, *matches: str) -> list[dict]:
        out = subprocess.run(["journalctl", "-D", str(self.journal_dir), "--no-pager", "-o", "json",
                              *matches], capture_output=True, text=True, timeout=30)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def resume(self) -> None:
        """SIGCONT after a SIGSTOP (nothing if it has exited)."""
        if self.proc is not None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def stopped_journald(base: Path) -> Iterator[PrivateJournald]:
    """A private journald that is started, then stopped (SIGSTOP): its socket
    queue fills and senders block. Resumed and stopped at the end, whatever
    the test did."""
    j = PrivateJournald(base).start()
    try:
        os.kill(j.proc.pid, signal.SIGSTOP)
        yield j
    finally:
        j.resume()
        j.stop()
