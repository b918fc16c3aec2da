"""The kernel probe: attach bpf/tcpstates.bpf.c (through the loader's helper
process) and read its records in batches from the ring and spill buffers.

bcc itself runs only in the helper (loader.py); this module needs no bcc.
Failures become EnvironmentProblem with the one thing to do next.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
import time
from importlib import resources
from pathlib import Path

from tcpstates.errors import EnvironmentProblem
from tcpstates.events import Event
from tcpstates.plugins.kernel.decoder import EVENT_SIZE, RING_RECORD_SIZE, Decoder
from tcpstates.plugins.kernel.headers import choose_header_tree
from tcpstates.plugins.kernel.ringbuf import RingBufferReader

TRACEPOINT = ("sock", "inet_sock_set_state")
# TCPSTATES_TRACEFS names another tracefs root (for tests of a kernel without
# the tracepoint, which cannot be had otherwise on a modern machine).
TRACEFS_CANDIDATES = tuple(filter(None, (os.environ.get("TCPSTATES_TRACEFS"),))) or (
    "/sys/kernel/tracing", "/sys/kernel/debug/tracing")


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


def build_cflags(src_dir: Path, *, max_sockets: int, ring_pages: int, buffer: str,
                 filter_lport: bool, filter_dport: bool, family: int | None,
                 no_wakeup: bool) -> list[str]:
    """The -D switches of bpf/tcpstates.bpf.c for one run (its header lists them)."""
    cflags = [f"-I{src_dir}", f"-DTCPSTATES_MAX_SOCKETS={int(max_sockets)}",
              f"-DTCPSTATES_RINGBUF_PAGES={int(ring_pages)}", "-Wno-macro-redefined"]
    if buffer == "perf":
        cflags.append("-DTCPSTATES_PERF_BUFFER=1")
    if filter_lport:
        cflags.append("-DTCPSTATES_FILTER_LPORT=1")
    if filter_dport:
        cflags.append("-DTCPSTATES_FILTER_DPORT=1")
    if family is not None:
        cflags.append(f"-DTCPSTATES_FAMILY={int(family)}")
    if no_wakeup:
        cflags.append("-DTCPSTATES_WAKEUP_FLAGS=1")   # BPF_RB_NO_WAKEUP
    return cflags


def _by_time(event: Event) -> int:
    return event.ts_ns


class KernelProbe:
    """The attached program (loaded by a helper process, see loader.py)
    and the readers of its buffers. No bcc in this process."""

    def __init__(self, *, ring_pages: int, max_sockets: int, buffer: str,
                 local_ports: frozenset[int] | None, remote_ports: frozenset[int] | None,
                 family: int | None, batch_size: int = 8192, timer_wakeup: bool = True,
                 poll_s: float = 0.05, extra_cflags: list[str] | None = None) -> None:
        from tcpstates.plugins.kernel.bpfsys import PerCpuCounter
        from tcpstates.plugins.kernel.loader import LoadRequest, load

        if os.geteuid() != 0:
            raise EnvironmentProblem("tracing needs root (CAP_BPF, CAP_PERFMON): run it with sudo")
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
        src_dir = bpf_source_dir()
        self.poll_s = poll_s if timer_wakeup and buffer == "ring" else None
        cflags = build_cflags(src_dir, max_sockets=max_sockets, ring_pages=ring_pages, buffer=buffer,
                              filter_lport=local_ports is not None,
                              filter_dport=remote_ports is not None, family=family,
                              no_wakeup=self.poll_s is not None)
        cflags += extra_cflags or []     # asked for by chain stages (KernelConstraints.cflags)
        self.loaded = load(LoadRequest(
            cflags=cflags, src_file=str(src_dir / "tcpstates.bpf.c"),
            header_tree=str(tree) if tree is not None else None, perf_mode=buffer == "perf",
            buffer_pages=ring_pages, local_ports=sorted(local_ports) if local_ports is not None else None,
            remote_ports=sorted(remote_ports) if remote_ports is not None else None))
        self.prog_fd = self.loaded.prog_fd
        self.decoder = Decoder()
        self._drops = PerCpuCounter(self.loaded.drops_fd)
        self._dropped = 0
        self._drops_unreadable = False
        self.spilled = 0
        self._next_spill_check = 0.0
        self._last_read = 0.0
        # ring mode: the perf buffers are the spill; perf mode: the event stream
        self.perf = self.loaded.perf
        self._perf_fds = set(self.loaded.perf_fds.values())
        if buffer == "ring":
            self.reader: RingBufferReader | None = RingBufferReader(
                self.loaded.events_fd, ring_pages * os.sysconf("SC_PAGE_SIZE"))
            # its per-CPU fds join our epoll, so it is only read when it has data
            for fd in self._perf_fds:
                self.reader.register_wakeup_fd(fd, drain=False)
        else:
            self.reader = None
            import select
            self._epoll = select.epoll()
            for fd in self._perf_fds:
                self._epoll.register(fd, select.EPOLLIN)

    def add_wakeup_fd(self, fd: int) -> None:
        if self.reader is not None:
            self.reader.register_wakeup_fd(fd)
        else:
            import select
            self._epoll.register(fd, select.EPOLLIN)

    def _perf_events(self) -> list[Event]:
        raw = self.perf.read(EVENT_SIZE)
        if not raw:
            return []
        return self.decoder.decode(b"".join(raw), range(0, len(raw) * EVENT_SIZE, EVENT_SIZE))

    def read(self, timeout: float) -> list[Event]:
        reader = self.reader
        if reader is None:
            events = self._perf_events()
            if not events and timeout:
                for fd, _ in self._epoll.poll(timeout):
                    if fd not in self._perf_fds:
                        try:
                            while os.read(fd, 4096):
                                pass
                        except BlockingIOError:
                            pass
                events = self._perf_events()
            return sorted(events, key=_by_time)   # per-CPU buffers: merge by time
        spill_ready = False
        if self.poll_s is not None and timeout:
            # Timer mode: the kernel never signals. Read at most once per poll
            # interval unless the ring is filling up: big batches amortise the
            # per-batch costs (a busy reader would otherwise take ~100 events
            # at a time). A signal's wake-up fd still ends the sleep at once.
            now = time.monotonic()
            rest = self._last_read + self.poll_s - now
            if rest > 0 and reader.pending() < self.max_block // 2:
                ready = reader.wait(min(timeout, rest))
                spill_ready = not ready.isdisjoint(self._perf_fds)
            self._last_read = time.monotonic()
        elif reader.pending() == 0:
            ready = reader.wait(timeout)
            spill_ready = not ready.isdisjoint(self._perf_fds)
        events, used = self.decoder.decode_block(reader.read_block(self.max_block, EVENT_SIZE))
        reader.consume(used)
        # timeout 0 is the final drain: never leave spilled records behind
        if spill_ready or timeout == 0 or self._spill_check_due():
            late = self._perf_events()
            if late:
                self.spilled += len(late)
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
            self._dropped = self._drops.total()
        except OSError as exc:   # e.g. EPERM once root is dropped on a locked-down kernel
            if not self._drops_unreadable:
                self._drops_unreadable = True
                sys.stderr.write(f"tcpstates: warning: cannot read the kernel drop counter any more "
                                 f"({exc}); drops after this point are not reported\n")
        return {"dropped": self._dropped + self.perf.lost,
                "kernel_misses": recursion_misses(self.prog_fd)}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.perf.close()
        self.loaded.close()      # closing the attachment's fd detaches the program
