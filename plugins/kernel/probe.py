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
from typing import Any, Callable

from tcpstates.api import AddressRule, ProcessRule
from tcpstates.btf import VMLINUX
from tcpstates.errors import EnvironmentProblem
from tcpstates.events import Event
from tcpstates.plugins.kernel import pushdown
from tcpstates.plugins.kernel.aggregates import AggregateReader
from tcpstates.plugins.kernel.cpustate import NESTED_OTHER as NESTED_OTHER_FIELD
from tcpstates.plugins.kernel.conndecoder import CONN_RING_RECORD_SIZE, CONN_SIZE, decode_conn, decode_conn_block
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


def connection_error_cflags(btf_path: str = VMLINUX) -> tuple[list[str], str | None]:
    """The -D flag that lets a connection record carry its socket's error
    (sock.sk_err at the running kernel's offset), or why it cannot: then a
    connect that did not complete is `failed`, why not unknown."""
    from tcpstates.btf import BTF, BTFError, offset_cflags
    try:
        btf = BTF.from_file(btf_path)
        # segs_out: whether a connect's SYN ever left (events.connection_ending)
        cflags = offset_cflags(btf, {"SOCK_SK_ERR": ("sock", "sk_err"),
                                     "TCP_SOCK_SEGS_OUT": ("tcp_sock", "segs_out")},
                               {"SOCK_SK_ERR": 4, "TCP_SOCK_SEGS_OUT": 4})
    except (OSError, BTFError) as exc:
        return [], (f"no sock.sk_err offset from the kernel's BTF ({btf_path}: {exc}): connection "
                    f"records cannot tell refused, timed-out, unreachable and abandoned connects "
                    f"apart (`failed`) nor a timeout from a reset")
    # sk_flags: whether a FIN_WAIT2->CLOSE was orderly (bpf/tcpstates.bpf.c).
    # Newer kernels keep it in sock_common (skc_flags, sk_flags a macro);
    # without it an abort in FIN_WAIT2 stays `normal`, as before it was read
    for path in ("__sk_common.skc_flags", "sk_flags"):
        try:
            cflags = cflags + offset_cflags(btf, {"SOCK_SK_FLAGS": ("sock", path)}, {"SOCK_SK_FLAGS": 8})
            break
        except BTFError:
            continue
    else:
        return cflags, None
    # linger2 (TCP_LINGER2, -1: no FIN_WAIT2 timewait): whether an orphan's
    # FIN_WAIT2->CLOSE was the kernel's abort; without it that stays `normal`
    try:
        return cflags + offset_cflags(btf, {"TCP_SOCK_LINGER2": ("tcp_sock", "linger2")},
                                      {"TCP_SOCK_LINGER2": 4}), None
    except BTFError:
        return cflags, None


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


class RecursionMisses:
    """The kernel's count of times it skipped our program because another BPF
    program was already running on that CPU (Linux >= 5.12 reports it in the
    program's fdinfo).

    The fdinfo file is opened once, at load (as root), and re-read from offset
    0 each time: after --user the process is not "dumpable" (so no process of
    that user can ptrace it or take its descriptors), and on older kernels a
    non-dumpable process cannot open its own /proc/self/fdinfo entries."""

    def __init__(self, prog_fd: int) -> None:
        try:
            self.fd = os.open(f"/proc/self/fdinfo/{prog_fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1

    def read(self) -> int:
        if self.fd < 0:
            return 0
        try:
            text = os.pread(self.fd, 1 << 16, 0).decode("ascii", "replace")
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith("recursion_misses:"):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def build_cflags(src_dir: Path, *, max_sockets: int, ring_pages: int, buffer: str,
                 filter_lport: bool, filter_dport: bool, family: int | None,
                 no_wakeup: bool, ncpus: int | None = None, filter_transition: bool = False,
                 min_span_ns: int | None = None, connections: bool = False,
                 aggregates: bool = False, no_events: bool = False) -> list[str]:
    """The -D switches of bpf/tcpstates.bpf.c for one run (its header lists them)."""
    cflags = [f"-I{src_dir}", f"-DTCPSTATES_MAX_SOCKETS={int(max_sockets)}",
              f"-DTCPSTATES_RINGBUF_PAGES={int(ring_pages)}", "-Wno-macro-redefined"]
    if connections:
        # per-connection accumulation: transitions and spans are not records
        # there, so their filters stay in user space (on the closing record)
        cflags.append("-DTCPSTATES_CONNECTIONS=1")
        filter_transition, min_span_ns = False, None
    elif aggregates:
        # in-kernel histograms (bpf/aggregates.bpf.h); no records when nobody reads them
        cflags.append("-DTCPSTATES_AGGREGATES=1")
        if no_events:
            cflags.append("-DTCPSTATES_NO_EVENTS=1")
    if ncpus is not None:
        cflags.append(f"-DTCPSTATES_NCPUS={int(ncpus)}")
    if filter_transition:
        cflags.append("-DTCPSTATES_FILTER_TRANSITION=1")
    if min_span_ns:
        cflags.append(f"-DTCPSTATES_MIN_SPAN_NS={int(min_span_ns)}ULL")
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


CROSSCHECK_INTERVAL_S = 5.0
DRAIN_RETRIES = 1000       # bounds the final drain's re-reads (each one is cheap)


class KernelProbe:
    """The attached program (loaded by a helper process, see loader.py)
    and the readers of its buffers. No bcc in this process.

    Order: records reach us through the ring and, when the ring refuses one,
    through the per-CPU spill buffers, so a socket's records can arrive in
    two streams. Whenever spill records are in play the batch is merged by
    kernel timestamp and only records older than a watermark are released:
    the watermark is the read's start time, lowered to the start time of any
    program run still in flight (cpustate.py). A record with a timestamp below
    it cannot still be on its way, so nothing released can later be overtaken
    by an earlier record of the same socket.
    """

    def _fault_injection_cflags(self) -> list[str]:
        """The test suite's fault injection (lost, reused, nested and skipped
        hits that cannot be had on demand): compile switches named by
        TCPSTATES_TEST_* environment variables; and TCPSTATES_TRACEFS, another
        tracefs tree whose format files the probes' offsets come from. A run
        with any of them set may lose or alter events on purpose, so it says
        so: never silently."""
        out, named = [], []
        lose = os.environ.get("TCPSTATES_TEST_LOSE_EVERY", "")
        if lose.isascii() and lose.isdigit() and int(lose) > 0:
            out.append(f"-DTCPSTATES_TEST_LOSE_EVERY={int(lose)}")
            named.append("TCPSTATES_TEST_LOSE_EVERY")
        if os.environ.get("TCPSTATES_TEST_SEPARATE_READS") == "1":
            # every kernel member read on its own, as on a kernel whose layout
            # parts the neighbours read together here (same events, more cost)
            out.append("-DTCPSTATES_SEPARATE_READS")
            named.append("TCPSTATES_TEST_SEPARATE_READS")
        if os.environ.get("TCPSTATES_TEST_REUSE") == "1":
            out.append("-DTCPSTATES_TEST_REUSE")
            named.append("TCPSTATES_TEST_REUSE")
        nest = os.environ.get("TCPSTATES_TEST_NEST_PORT", "")
        if nest.isascii() and nest.isdigit() and 0 < int(nest) < 65536 and self.attachment.raw:
            out.append(f"-DTCPSTATES_TEST_NEST_PORT={int(nest)}")
            named.append("TCPSTATES_TEST_NEST_PORT")
        skip = os.environ.get("TCPSTATES_TEST_SKIP_CLOSE_PORT", "")
        if skip.isascii() and skip.isdigit() and 0 < int(skip) < 65536:
            out.append(f"-DTCPSTATES_TEST_SKIP_CLOSE_PORT={int(skip)}")
            named.append("TCPSTATES_TEST_SKIP_CLOSE_PORT")
        if os.environ.get("TCPSTATES_TRACEFS"):
            named.append("TCPSTATES_TRACEFS")
        if named:
            self._warn(f"test switches are set ({', '.join(named)}): this run may lose or alter "
                       f"events on purpose; unset {'these variables' if len(named) > 1 else 'it'} "
                       f"for a real trace")
        return out

    def __init__(self, *, ring_pages: int, max_sockets: int, buffer: str,
                 local_ports: frozenset[int] | None, remote_ports: frozenset[int] | None,
                 family: int | None, batch_size: int = 512, timer_wakeup: bool = True,
                 poll_s: float = 0.05, transitions: frozenset[tuple[int, int]] | None = None,
                 min_span_ns: int | None = None, span_ranges: dict[int, tuple[int, int]] | None = None,
                 crosscheck: bool = False,
                 warn: Callable[[str], None] | None = None,
                 extra_cflags: list[str] | None = None, connections: bool = False,
                 address_rules: tuple[AddressRule, ...] = (),
                 process_rules: tuple[ProcessRule, ...] = (),
                 aggregates: bool = False, no_events: bool = False, attach: str = "auto") -> None:
        from tcpstates.btf import BTFError
        from tcpstates.plugins.kernel import attach as attachment
        from tcpstates.plugins.kernel.bpfsys import possible_cpus
        from tcpstates.plugins.kernel.cpustate import CpuState
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
        try:
            self.attachment = attachment.choose(attach)
        except BTFError as exc:
            raise EnvironmentProblem(f"attach = \"raw\" needs the kernel's BTF: {exc}; use "
                                     f"attach = \"auto\" (the perf-event tracepoint where it is missing)") from None
        self.buffer = buffer
        self.batch_size = batch_size
        # connection records (conndecoder.py) or one record per state change
        self.connections = connections
        if connections:
            self._record_size, self._ring_record_size = CONN_SIZE, CONN_RING_RECORD_SIZE
            dec = Decoder()
            self._decode_block: Callable[[bytes], tuple[list[Event], int]] = \
                lambda data: decode_conn_block(dec, data)
            self._decode: Callable[[Any, Any], list[Event]] = lambda buf, offs: decode_conn(dec, buf, offs)
        else:
            self._record_size, self._ring_record_size = EVENT_SIZE, RING_RECORD_SIZE
            dec = Decoder()
            self._decode_block, self._decode = dec.decode_block, dec.decode
        self.max_block = batch_size * self._ring_record_size
        self._warn = warn or (lambda m: sys.stderr.write(f"tcpstates: {m}\n"))
        if self.attachment.why_not:     # auto fell back: say what that costs
            self._warn(f"attaching as a perf-event tracepoint ({self.attachment.why_not}): a state change "
                       f"that interrupts another tracing program on its CPU is skipped (counted as a "
                       f"kernel miss)")
        tree, _ = choose_header_tree()   # how it was found: `tcpstates doctor` says
        src_dir = bpf_source_dir()
        ncpus = possible_cpus()
        self.poll_s = poll_s if timer_wakeup else None
        # duration bounds per old state: a map, with any lower bound folded in
        spans = pushdown.span_plan(min_span_ns, span_ranges) if not connections else pushdown.MapPlan()
        if spans.cflags:
            min_span_ns = None
        cflags = build_cflags(src_dir, max_sockets=max_sockets, ring_pages=ring_pages, buffer=buffer,
                              filter_lport=local_ports is not None,
                              filter_dport=remote_ports is not None, family=family,
                              no_wakeup=self.poll_s is not None and buffer == "ring", ncpus=ncpus,
                              filter_transition=transitions is not None, min_span_ns=min_span_ns,
                              connections=connections, aggregates=aggregates, no_events=no_events)
        # address and process filters: rule masks and map contents (pushdown.py)
        rules = pushdown.plan(address_rules, process_rules, connections=connections)
        cflags += rules.cflags + spans.cflags + self.attachment.cflags
        cflags += extra_cflags or []     # asked for by chain stages (KernelConstraints.cflags)
        if connections:
            error_cflags, why_not = connection_error_cflags()
            cflags += error_cflags
            if why_not:
                self._warn(why_not)
        cflags += self._fault_injection_cflags()
        # A perf buffer wake-up is an irq_work: a self-interrupt raised inside
        # the program, on whose exit pending softirqs (the loopback's packets)
        # run — and their tracepoint hits find the program busy (counted
        # kernel misses). The spill is read at every batch anyway, so it never
        # wakes the reader; a perf event stream (old kernels) wakes it only in
        # adaptive mode.
        wakeup_events = 1 if buffer == "perf" and self.poll_s is None else 1 << 20
        self.cflags = cflags
        self.loaded = load(LoadRequest(
            cflags=cflags, src_file=str(src_dir / "tcpstates.bpf.c"),
            header_tree=str(tree) if tree is not None else None, perf_mode=buffer == "perf",
            buffer_pages=ring_pages, local_ports=sorted(local_ports) if local_ports is not None else None,
            remote_ports=sorted(remote_ports) if remote_ports is not None else None, ncpus=ncpus,
            wakeup_events=wakeup_events, prog_name=self.attachment.prog_name,
            rescue_prog=self.attachment.rescue,
            transitions=sorted((o << 4) | n for o, n in transitions)
            if transitions is not None and not connections else None,
            map_entries={**rules.entries, **spans.entries}))
        self.prog_fd = self.loaded.prog_fd
        self.misses = RecursionMisses(self.prog_fd)
        self.decoder = dec
        # one row per CPU and program (the raw form's rescue has its own: attach.py)
        self.ncpus = ncpus
        self.cpu = CpuState(self.loaded.state_fd, ncpus * self.attachment.slots)
        self.aggregates: AggregateReader | None = None
        if self.loaded.agg_fd >= 0:
            self.aggregates = AggregateReader(self.loaded.agg_fd, self.loaded.agg_ports_fd,
                                              ncpus * self.attachment.slots)
        self.spilled = 0
        self.received = 0          # records taken from the kernel buffers
        self._held: list[Event] = []
        self._last_read = 0.0
        # ring mode: the perf buffers are the spill; perf mode: the event stream
        self.perf = self.loaded.perf
        self._perf_fds = set(self.loaded.perf_fds.values())
        if buffer == "ring":
            self.reader: RingBufferReader | None = RingBufferReader(
                self.loaded.events_fd, ring_pages * os.sysconf("SC_PAGE_SIZE"))
            # its per-CPU fds join our epoll, so a spill also ends a sleep
            for fd in self._perf_fds:
                self.reader.register_wakeup_fd(fd, drain=False)
        else:
            self.reader = None
            import select
            self._epoll = select.epoll()
            for fd in self._perf_fds:
                self._epoll.register(fd, select.EPOLLIN)
        # the exactness cross-check (truth.py)
        self.truth = None
        self._warned: set[str] = set()
        self.unaccounted = 0
        self.accounting = "off"
        self._final = False
        self._draining = False
        self.unread_at_exit = 0
        if crosscheck:
            self._start_crosscheck(tracefs)

    # -- exactness cross-check ------------------------------------------------------
    def _seen(self) -> tuple[int, int, int, int]:
        """(hits, done, kernel misses, records handed over) right now. The
        misses are the main program's, read after the rows, minus the rescued
        runs in those rows: each rescue follows its counted miss, so that is
        never below zero, and hits + misses is the main program's hits and
        misses whatever the rescue did between the two reads (the clamp is for
        the tests' fake skip, which no miss counts)."""
        t = self.cpu.rows()
        return (sum(r[0] for r in t), sum(r[1] for r in t), max(0, self.misses.read() - self._not_lost(t)),
                sum(r[4] + r[5] for r in t))

    def _rescued(self, rows: list[tuple[int, ...]]) -> int:
        """State changes the rescue program ran for (its rows' hits)."""
        return sum(r[0] for r in rows[self.ncpus:])

    def _not_tcp(self, rows: list[tuple[int, ...]]) -> int:
        """Skipped changes of sockets other than TCP (the rescue's rows' nested_other)."""
        return sum(r[NESTED_OTHER_FIELD] for r in rows[self.ncpus:])

    def _not_lost(self, rows: list[tuple[int, ...]]) -> int:
        """The main program's counted skips that lost nothing: the rescued
        ones and those of sockets other than TCP."""
        return self._rescued(rows) + self._not_tcp(rows)

    def _misses_and_rows(self) -> tuple[int, list[tuple[int, ...]]]:
        """Skipped runs of the main program that the rescue did not take, and
        the rows read for it. The misses are read first: a rescue follows its
        counted miss, so a rescue still under way can only make the figure
        low for a moment, never report a loss that is not one (the summary's
        and the in-band notices' counts only ever go up)."""
        misses = self.misses.read()
        rows = self.cpu.rows()
        return max(0, misses - self._not_lost(rows)), rows

    def _start_crosscheck(self, tracefs: Path) -> None:
        from tcpstates.plugins.kernel.truth import TruthCounter
        try:
            self.truth = TruthCounter(tracefs)
        except OSError as exc:
            self._warn(f"in-kernel cross-check unavailable ({exc}); silent losses cannot be detected")
            return
        self._cut0 = self._cut()
        self.accounting = "exact" if self._cut0.exact else "lower bound"
        self._next_check = time.monotonic() + CROSSCHECK_INTERVAL_S

    def _cut(self, tries: int = 5) -> Any:
        from tcpstates.plugins.kernel.truth import SETTLE_S, Cut
        assert self.truth is not None
        cut = None
        for _ in range(tries):
            s1 = self._seen()
            f1, _ = self.truth.read()
            time.sleep(SETTLE_S)   # an event whose probes straddle the reads completes meanwhile
            self._cut_clock = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            s2 = self._seen()
            f2, lost = self.truth.read()
            self._cut_handed = s2[3]
            # quiet: nothing moved and no run in flight
            cut = Cut(f1, f2, s1[0] + s1[2], s2[0] + s2[2], lost, quiet=s1 == s2 and s1[0] == s1[1])
            if cut.exact:
                break
        assert cut is not None
        return cut

    def _crosscheck(self, final: bool, delivered_late: int = 0) -> None:
        """Update `unaccounted` from a fresh cut. `final`: after the drain;
        `delivered_late`: records of the window read after the cut."""
        from tcpstates.plugins.kernel.truth import unaccounted
        if self.truth is None:
            return
        end = self._final_cut if final else self._cut(1)
        count, exact = unaccounted(self._cut0, end)
        if end.ftrace_lost:
            self.context_warn_once(f"in-kernel cross-check: ftrace itself lost {end.ftrace_lost} "
                                   f"events; the unaccounted count may be short")
        if final and exact:
            # the user-space half: every record the kernel handed over was read
            count += max(0, self._cut_handed - self._received_at_cut - delivered_late)
            self.accounting = "exact"
        elif final:
            self.accounting = "lower bound"
            self.context_warn_once("the final in-kernel count was taken while events kept arriving: "
                                   "the unaccounted figure is a proven minimum, not exact")
        if count < 0:
            self.context_warn_once(f"in-kernel cross-check: the ftrace count is {-count} short of ours "
                                   f"(ftrace lost events?); unaccounted events cannot be excluded")
            self.accounting = "unknown"
            count = 0
        self.unaccounted = max(self.unaccounted, count)

    def context_warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._warn(message)

    # -- reading -----------------------------------------------------------------
    def add_wakeup_fd(self, fd: int) -> None:
        if self.reader is not None:
            self.reader.register_wakeup_fd(fd)
        else:
            import select
            self._epoll.register(fd, select.EPOLLIN)

    def _perf_events(self) -> list[Event]:
        size = self._record_size
        raw = self.perf.read(size)
        if not raw:
            return []
        return self._decode(b"".join(raw), range(0, len(raw) * size, size))

    def _wait(self, timeout: float) -> None:
        reader = self.reader
        if reader is None:
            if timeout and not self.perf.pending():
                if self.poll_s is not None:
                    timeout = min(timeout, self.poll_s)
                for fd, _ in self._epoll.poll(timeout):
                    if fd not in self._perf_fds:
                        try:
                            while os.read(fd, 4096):
                                pass
                        except BlockingIOError:
                            pass
            return
        if self.poll_s is not None and timeout:
            # Timer mode: the kernel never signals. Read at most once per poll
            # interval unless the ring is filling up: big batches amortise the
            # per-batch costs. A signal's wake-up fd still ends the sleep at once.
            now = time.monotonic()
            rest = self._last_read + self.poll_s - now
            if rest > 0 and reader.pending() < self.max_block // 2:
                reader.wait(min(timeout, rest))
            self._last_read = time.monotonic()
        elif timeout and reader.pending() == 0 and not self.perf.pending():
            reader.wait(timeout)

    def read(self, timeout: float) -> list[Event]:
        """The next batch; `timeout` 0 is the final drain (see _finish)."""
        if self._final:
            return []
        self._wait(timeout)
        if timeout != 0:
            return self._read(False)
        self._draining = True
        # An empty batch ends the pipeline's drain, so hand one over only when
        # nothing is left: a read whose new records all lie past the
        # watermark (a run in flight elsewhere) is repeated; the next one
        # either releases them or finds nothing new and releases everything.
        for _ in range(DRAIN_RETRIES):
            batch = self._read(True)
            if batch or self._final:
                return batch
        return []

    def _read(self, draining: bool) -> list[Event]:
        # a loop, not a recursion: records a kernel filter discarded are
        # skipped run by run and the read starts again, however many there are
        while True:
            events = self._read_once(draining)
            if events is not None:
                return events

    def _read_once(self, draining: bool) -> list[Event] | None:
        """One read; None when it only skipped records that are not ours
        (then read again)."""
        # the watermark: taken before anything is read (see the class docstring)
        mark = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        bound = self.cpu.in_flight_bound()
        if bound is not None and bound < mark:
            mark = bound
        reader = self.reader
        if reader is not None:
            events, used = self._decode_block(reader.read_block(self.max_block, self._record_size))
            reader.consume(used)
            late = self._perf_events()      # after the ring, always (the merge relies on it)
            if late:
                self.spilled += len(late)
        else:
            events, late = [], self._perf_events()
        self.received += len(events) + len(late)
        if late or self._held:
            # Two streams (or leftovers): merge by time, release up to the mark.
            # Ring records alone are already in per-socket order: no sort then.
            merged = sorted(self._held + events + late, key=_by_time)
            if draining and not events and not late:
                mark = 1 << 64          # the final drain: nothing older can come
            cut = len(merged)
            while cut and merged[cut - 1].ts_ns >= mark:
                cut -= 1
            events, self._held = merged[:cut], merged[cut:]
        if events:
            return events
        if reader is not None and reader.skip_foreign(self._record_size):
            return None
        if draining and not self._held:
            self._finish()
            return self._after_final
        return events

    def _finish(self) -> None:
        """The drain found nothing more: take the final cross-check cut, then
        read what was committed meanwhile (delivered after the drain; the part
        older than the cut belongs to the counted window)."""
        self._final = True
        self._after_final: list[Event] = []
        if self.truth is None:
            return
        self._received_at_cut = self.received
        self._final_cut = self._cut()
        late: list[Event] = []
        if self.reader is not None:
            late, used = self._decode_block(self.reader.read_block(self.max_block, self._record_size))
            self.reader.consume(used)
        late = sorted(late + self._perf_events(), key=_by_time)
        self.received += len(late)
        self._crosscheck(final=True, delivered_late=sum(1 for e in late if e.ts_ns < self._cut_clock))
        self._after_final = late

    def _abandon(self) -> None:
        """The drain ran out of time with records still buffered: count them
        (they are lost, and must not vanish silently), then take the final cut."""
        pending = self.perf.pending_samples() + len(self._held)
        if self.reader is not None:
            pending += self.reader.pending() // self._ring_record_size
        self.unread_at_exit = pending
        self._held = []
        self._final = True
        self._after_final = []
        if self.truth is not None:
            self._received_at_cut = self.received + pending
            self._final_cut = self._cut()
            self._crosscheck(final=True)

    def loss_counters(self) -> dict[str, int]:
        if self._draining and not self._final:
            self._abandon()
        misses, rows = self._misses_and_rows()
        # a record the perf buffer had no room for failed its submit and is in
        # `drops`; the buffer's own lost count is the same records again
        out = {"dropped": sum(r[6] for r in rows), "kernel_misses": misses}
        if self.unread_at_exit:
            out["unread_at_exit"] = self.unread_at_exit
        if self.truth is not None:
            if not self._final and time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + CROSSCHECK_INTERVAL_S
                self._crosscheck(final=False)
            out["unaccounted"] = self.unaccounted
        return out

    def kernel_counts(self) -> dict[str, int]:
        """The program's own per-CPU counters, summed (for the exit summary and tests)."""
        rows = self.cpu.rows()
        return {**self.cpu.totals(), "rescued": self._rescued(rows),
                "not_tcp_when_nested": self._not_tcp(rows)}

    def close(self) -> None:
        if self.truth is not None:
            self.truth.close()
            self.truth = None
        if self.reader is not None:
            self.reader.close()
        self.perf.close()
        self.cpu.close()
        self.misses.close()
        if self.aggregates is not None:
            self.aggregates.close()
        self.loaded.close()      # closing the attachment's fd detaches the program
