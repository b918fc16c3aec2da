"""The kernel stage: compile and attach bpf/tcpstates.bpf.c with bcc, read its records.

Everything that touches bcc lives here, so the rest of tcpstates (replay,
formatting, plugins) works without root or bcc. Failures become
EnvironmentProblem with the one thing to do next.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import socket
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from tcpstates.errors import EnvironmentProblem
from tcpstates.events import EVENT_SIZE, RING_RECORD_SIZE, Decoder, Event
from tcpstates.headers import choose_header_tree
from tcpstates.ringbuf import RingBufferReader

TRACEPOINT = ("sock", "inet_sock_set_state")
PROG_NAME = b"tracepoint__sock__inet_sock_set_state"
# TCPSTATES_TRACEFS names another tracefs root (for tests of a kernel without
# the tracepoint, which cannot be had otherwise on a modern machine).
TRACEFS_CANDIDATES = tuple(filter(None, (os.environ.get("TCPSTATES_TRACEFS"),))) or (
    "/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BCC_PACKAGES = ("Debian/Ubuntu: apt-get install python3-bpfcc; Fedora: dnf install python3-bcc; "
                "Arch: pacman -S python-bcc")


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def has_ring_buffer() -> bool:
    """BPF_MAP_TYPE_RINGBUF arrived in Linux 5.8."""
    return kernel_version() >= (5, 8)


def find_tracefs(mount: bool = True) -> Path | None:
    for root in TRACEFS_CANDIDATES:
        if Path(root, "events").is_dir():
            return Path(root)
    if mount and os.geteuid() == 0 and Path(TRACEFS_CANDIDATES[0]).is_dir():
        # A fresh boot without systemd may not have tracefs mounted yet.
        with contextlib.suppress(OSError):
            import subprocess
            subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS_CANDIDATES[0]],
                           check=True, capture_output=True)
            if Path(TRACEFS_CANDIDATES[0], "events").is_dir():
                return Path(TRACEFS_CANDIDATES[0])
    return None


def tracepoint_exists(tracefs: Path) -> bool:
    return (tracefs / "events" / TRACEPOINT[0] / TRACEPOINT[1] / "format").is_file()


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
def captured_output() -> Iterator[list[str]]:
    """Capture fds 1 and 2 while bcc compiles: clang and libbcc print there
    directly (libbcc's header warnings even go to stdout), and nothing may
    reach stdout before the header."""
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
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
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


def bpf_source_dir() -> Path:
    return Path(str(resources.files("tcpstates.bpf")))


def recursion_misses(prog_fd: int) -> int:
    """The kernel's count of times it skipped our program because another BPF
    program was already running on that CPU (Linux >= 5.12 reports it)."""
    try:
        with open(f"/proc/self/fdinfo/{prog_fd}") as f:
            for line in f:
                if line.startswith("recursion_misses:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _by_time(event: Event) -> int:
    return event.ts_ns


class KernelProbe:
    """Compiled, attached program plus its reader."""

    def __init__(self, *, ring_pages: int, max_sockets: int, buffer: str,
                 local_ports: frozenset[int] | None, remote_ports: frozenset[int] | None,
                 family: int | None, batch_size: int = 8192, timer_wakeup: bool = True,
                 poll_s: float = 0.05) -> None:
        if os.geteuid() != 0:
            raise EnvironmentProblem("tracing needs root (CAP_BPF, CAP_PERFMON): run it with sudo")
        self.bcc = import_bcc()
        tracefs = find_tracefs()
        if tracefs is None:
            raise EnvironmentProblem(
                "tracefs is not mounted and could not be mounted: run "
                "'mount -t tracefs tracefs /sys/kernel/tracing'")
        if not tracepoint_exists(tracefs):
            raise EnvironmentProblem(
                f"this kernel ({platform.release()}) has no sock:inet_sock_set_state tracepoint; "
                f"tcpstates needs Linux 4.16 or newer")
        if buffer == "auto":
            buffer = "ring" if has_ring_buffer() else "perf"
        if buffer == "ring" and not has_ring_buffer():
            raise EnvironmentProblem(f"BPF ring buffers need Linux 5.8 (this is {platform.release()}); "
                                     f"use buffer = \"perf\"")
        self.buffer = buffer
        self.batch_size = batch_size
        self.max_block = batch_size * RING_RECORD_SIZE
        tree, self.header_source = choose_header_tree()
        if tree is not None:
            os.environ["BCC_KERNEL_SOURCE"] = str(tree)
        src_dir = bpf_source_dir()
        cflags = [f"-I{src_dir}", f"-DTCPSTATES_MAX_SOCKETS={max_sockets}",
                  f"-DTCPSTATES_RINGBUF_PAGES={ring_pages}", "-Wno-macro-redefined"]
        if buffer == "perf":
            cflags.append("-DTCPSTATES_PERF_BUFFER=1")
        if local_ports is not None:
            cflags.append("-DTCPSTATES_FILTER_LPORT=1")
        if remote_ports is not None:
            cflags.append("-DTCPSTATES_FILTER_DPORT=1")
        if family is not None:
            cflags.append(f"-DTCPSTATES_FAMILY={int(family)}")
        self.poll_s = poll_s if timer_wakeup and buffer == "ring" else None
        if self.poll_s is not None:
            cflags.append("-DTCPSTATES_WAKEUP_FLAGS=1")   # BPF_RB_NO_WAKEUP
        compile_error: Exception | None = None
        with captured_output() as err:
            try:
                self.bpf = self.bcc.BPF(src_file=str(src_dir / "tcpstates.bpf.c").encode(),
                                        cflags=cflags)
            except Exception as exc:
                compile_error = exc
        if compile_error is not None:
            message = " | ".join(l for l in err[0].strip().splitlines()[-6:] if l.strip())
            hint = ("install kernel headers (linux-headers-$(uname -r), or the generic "
                    "linux-headers package) and retry" if "kconfig.h" in message or
                    "kernel headers" in message.lower() else "run 'tcpstates doctor' for details")
            raise EnvironmentProblem(f"BPF compile/load failed ({compile_error}): "
                                     f"{message or 'no compiler output'}; {hint}")
        self._fill_port_map("lport_allowed", local_ports)
        self._fill_port_map("dport_allowed", remote_ports)
        self.prog_fd = self.bpf.funcs[PROG_NAME].fd
        self.decoder = Decoder()
        self._drops = self.bpf["drops"]
        self._perf_lost = 0
        self._dropped = 0
        self._drops_unreadable = False
        self._pending: list[bytes] = []
        self.spilled = 0
        self._spill_fds: set[int] = set()
        self._next_spill_check = 0.0
        if buffer == "ring":
            self.reader: RingBufferReader | None = RingBufferReader(
                self.bpf["events"].map_fd, ring_pages * os.sysconf("SC_PAGE_SIZE"))
            # records the ring refused land here (see the BPF source); small.
            # Its per-CPU fds join our epoll, so it is only polled when it has data.
            self.bpf["spill"].open_perf_buffer(self._perf_event, page_cnt=64,
                                               lost_cb=self._perf_lost_cb)
            from bcc.libbcc import lib as libbcc
            self._spill_fds = {libbcc.perf_reader_fd(r) for r in self.bpf.perf_buffers.values()}
            for fd in self._spill_fds:
                self.reader.register_wakeup_fd(fd, drain=False)
        else:
            self.reader = None
            self.bpf["events"].open_perf_buffer(self._perf_event, page_cnt=ring_pages,
                                                lost_cb=self._perf_lost_cb)

    def _fill_port_map(self, name: str, ports: frozenset[int] | None) -> None:
        if ports is None:
            return
        table = self.bpf[name]
        one = ctypes.c_uint8(1)
        for port in ports:
            table[ctypes.c_int(port)] = one

    # perf-buffer fallback: libbcc calls back per record; we only copy bytes.
    def _perf_event(self, cpu: int, data: Any, size: int) -> None:
        if size >= EVENT_SIZE:
            self._pending.append(ctypes.string_at(data, EVENT_SIZE))

    def _perf_lost_cb(self, lost: int) -> None:
        self._perf_lost += lost

    def add_wakeup_fd(self, fd: int) -> None:
        if self.reader is not None:
            self.reader.register_wakeup_fd(fd)

    def read(self, timeout: float) -> list[Event]:
        reader = self.reader
        if reader is None:
            self.bpf.perf_buffer_poll(int(timeout * 1000))
            raw, self._pending = self._pending, []
            return self.decoder.decode(b"".join(raw), range(0, len(raw) * EVENT_SIZE, EVENT_SIZE))
        spill_ready = False
        if reader.pending() == 0:
            # timer mode: the kernel never signals; sleep one poll interval
            # (a signal's wake-up fd still ends the sleep at once)
            ready = reader.wait(timeout if self.poll_s is None else min(timeout, self.poll_s))
            spill_ready = not ready.isdisjoint(self._spill_fds)
        events, used = self.decoder.decode_block(reader.read_block(self.max_block, EVENT_SIZE))
        reader.consume(used)
        # timeout 0 is the final drain: never leave spilled records behind
        if spill_ready or timeout == 0 or self._spill_check_due():
            # consume, not poll: a perf fd's readiness is reset by whoever
            # polls it first (our epoll), so poll() here could miss records
            self.bpf.perf_buffer_consume()
        if self._pending:
            raw, self._pending = self._pending, []
            self.spilled += len(raw)
            late = self.decoder.decode(b"".join(raw), range(0, len(raw) * EVENT_SIZE, EVENT_SIZE))
            events = sorted(events + late, key=_by_time)   # back into time order
        if not events and reader.skip_foreign(EVENT_SIZE):
            return self.read(0)
        return events

    def _spill_check_due(self) -> bool:
        """While events flow the reader rarely sleeps in epoll; look at the
        spill buffer at least every 100 ms anyway."""
        now = time.monotonic()
        if now >= self._next_spill_check:
            self._next_spill_check = now + 0.1
            return True
        return False

    def loss_counters(self) -> dict[str, int]:
        try:
            self._dropped = sum(int(getattr(v, "value", v))
                                for v in self._drops.getvalue(self._drops.Key(0)))
        except Exception as exc:   # e.g. EPERM once root is dropped on a locked-down kernel
            if not self._drops_unreadable:
                self._drops_unreadable = True
                sys.stderr.write(f"tcpstates: warning: cannot read the kernel drop counter any more "
                                 f"({exc}); drops after this point are not reported\n")
        return {"dropped": self._dropped + self._perf_lost,
                "kernel_misses": recursion_misses(self.prog_fd)}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        with contextlib.suppress(Exception):
            self.bpf.cleanup()


AF_BY_NAME = {"all": None, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
