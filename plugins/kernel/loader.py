"""Compiling and attaching the BPF program in a short-lived child process.

bcc compiles C with an embedded clang/LLVM: importing and running it costs
the process ~130 MB that it never gives back. The tracer only needs the
result — the program, its maps, the tracepoint attachment and the perf
buffers, all of which are file descriptors. So a forked child does the
compile, attach and buffer set-up, hands the descriptors to the tracer over
a unix socket (SCM_RIGHTS) and leaves with os._exit: skipping bcc's atexit
clean-up, which would disable the perf events it shares with the tracer.
The tracer itself never imports bcc.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import signal
import socket
import tempfile
from typing import IO, Any

from tcpstates import interrupt
from tcpstates.errors import EnvironmentProblem, UsageError
from tcpstates.plugins.kernel.attach import PROG_TRACEPOINT, RAW_TRACEPOINT
from tcpstates.plugins.kernel.perfbuf import PerfBufferReader
from tcpstates.plugins.kernel.bcccompat import DEBUGFS_TRACING, bcc_needs_debugfs

SPILL_PAGES = 64


@dataclasses.dataclass
class LoadRequest:
    cflags: list[str]
    src_file: str
    header_tree: str | None
    perf_mode: bool
    buffer_pages: int
    local_ports: list[int] | None
    remote_ports: list[int] | None
    ncpus: int = 128
    wakeup_events: int = 1                 # perf buffer: samples per reader wake-up
    transitions: list[int] | None = None   # (old << 4) | new keys to keep
    prog_name: bytes = PROG_TRACEPOINT     # the state-change program (attach.py)
    rescue_prog: bytes | None = None       # attached after it to the same tracepoint
    #: map name -> [(raw key, u8 value or raw value)] (address/process rules, span ranges: pushdown.py)
    map_entries: dict[str, list[tuple[bytes, int | bytes]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Loaded:
    prog_fd: int
    events_fd: int                   # ring buffer map (ring mode), -1 in perf mode
    state_fd: int                    # cpu_state map (struct tcpstates_cpu per CPU)
    ncpus: int                       # its entries
    perf_fds: dict[int, int]         # cpu → perf event fd: spill (ring mode) or events (perf mode)
    perf: PerfBufferReader           # mapped before the helper left
    helper_peak_rss_kb: int
    all_fds: list[int]
    attach_fds: list[int] = dataclasses.field(default_factory=list)   # every attachment bcc made
    agg_fd: int = -1                 # agg map (-DTCPSTATES_AGGREGATES), else -1
    agg_ports_fd: int = -1           # agg_ports map
    prog_fds: dict[str, int] = dataclasses.field(default_factory=dict)

    def close(self) -> None:
        for fd in self.all_fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


LOCAL_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.-]+)"[ \t]*$', re.M)


def inline_local_includes(src_file: str) -> str:
    """The source with each `#include "x.h"` of a file beside it pasted in.

    bcc rewrites map calls (`table.lookup()`) and generates tracepoint
    argument structs only in the main file; a part kept in its own header
    (bpf/owner.bpf.h) must therefore be compiled as part of the main text.
    Header guards keep a second inclusion empty.
    """
    base = os.path.dirname(src_file)

    def paste(m: re.Match) -> str:
        path = os.path.join(base, m.group(1))
        if not os.path.isfile(path):
            return m.group(0)
        with open(path) as f:
            return f"#line 1 \"{path}\"\n{f.read()}\n#line {m.string.count(chr(10), 0, m.start()) + 2} \"{src_file}\""

    with open(src_file) as f:
        return LOCAL_INCLUDE.sub(paste, f.read())


def _last_lines(text: str, n: int = 6) -> str:
    """The last n non-blank lines of what the compiler or verifier printed, on one line."""
    return " | ".join([line.strip() for line in text.strip().splitlines() if line.strip()][-n:])


def _child(req: LoadRequest, capture: IO[bytes]) -> tuple[dict[str, Any], list[int], Any]:
    from tcpstates.plugins.kernel.bccimport import captured_output, import_bcc

    bcc = import_bcc()
    if req.header_tree:
        os.environ["BCC_KERNEL_SOURCE"] = req.header_tree
    compile_error: Exception | None = None
    with captured_output(capture) as err:
        try:
            bpf = bcc.BPF(text=inline_local_includes(req.src_file).encode(), cflags=req.cflags)
        except Exception as exc:
            compile_error = exc
    if compile_error is not None:
        message = _last_lines(err[0])
        hint = ("install kernel headers (linux-headers-$(uname -r), or the generic "
                "linux-headers package) and retry" if "kconfig.h" in message or
                "kernel headers" in message.lower() else "run 'tcpstates doctor' for details")
        if "struct tracepoint__" in err[0] and bcc_needs_debugfs(str(getattr(bcc, "__version__", ""))):
            # old bcc found no tracepoint format: it looks only under debugfs
            hint = (f"bcc {bcc.__version__} reads tracepoints only under {DEBUGFS_TRACING}: "
                    "mount -t debugfs debugfs /sys/kernel/debug and retry")
        raise EnvironmentProblem(f"BPF compile/load failed ({compile_error}): "
                                 f"{message or 'no compiler output'}; {hint}")
    rescue_attach: list[int] = []
    if req.rescue_prog:
        # After the main program (bcc attached it while loading; the
        # tracepoint calls its programs in the order they were attached).
        # bcc's attach_raw_tracepoint takes one program per tracepoint: the
        # attachment is made here, as it does it.
        from bcc.libbcc import lib as libbcc_lib
        rescue_error: Exception | None = None
        with captured_output(capture) as err:   # a verifier log goes here, not to our stderr
            try:
                fn = bpf.load_func(req.rescue_prog, bcc.BPF.RAW_TRACEPOINT)
            except Exception as exc:
                rescue_error = exc
        if rescue_error is not None:
            log = _last_lines(err[0], 4)
            raise EnvironmentProblem(f"the rescue program did not load ({rescue_error}): "
                                     f"{log or 'no verifier output'}; use attach = \"tracepoint\"")
        fd = libbcc_lib.bpf_attach_raw_tracepoint(fn.fd, RAW_TRACEPOINT)
        if fd < 0:
            raise EnvironmentProblem("could not attach the rescue program to the raw tracepoint "
                                     "inet_sock_set_state: use attach = \"tracepoint\"")
        rescue_attach.append(fd)
    import ctypes
    for name, keys in (("lport_allowed", req.local_ports), ("dport_allowed", req.remote_ports),
                       ("transition_allowed", req.transitions)):
        if keys is not None:
            table = bpf[name]
            for key in keys:
                table[ctypes.c_int(key)] = ctypes.c_uint8(1)
    for name, entries in req.map_entries.items():
        table = bpf[name]
        for raw, value in entries:
            leaf = table.Leaf.from_buffer_copy(value) if isinstance(value, bytes) else table.Leaf(value)
            table[table.Key.from_buffer_copy(raw)] = leaf
    perf_table = bpf["events"] if req.perf_mode else bpf["spill"]
    pages = req.buffer_pages if req.perf_mode else SPILL_PAGES
    wakeup: dict[str, int] = {"wakeup_events": req.wakeup_events}
    if "wakeup_events" not in inspect.signature(perf_table.open_perf_buffer).parameters:
        # older bcc (Ubuntu 22.04's 0.18) wakes the reader at every sample: more
        # wake-ups, so possibly more kernel misses under load (still counted),
        # only when samples go through perf (the spill, or kernels before 5.8)
        wakeup = {}
    perf_table.open_perf_buffer(lambda *a: None, page_cnt=pages, lost_cb=lambda *a: None, **wakeup)
    from bcc.libbcc import lib as libbcc
    perf_fds = {cpu: libbcc.perf_reader_fd(reader)               # cpu → perf event fd
                for (table_id, cpu), reader in bpf.perf_buffers.items() if table_id == id(perf_table)}
    # Every attachment bcc made goes over, not a fixed list: programs other
    # parts add to the object (e.g. owner tracking) keep running once the
    # helper has exited. bcc keeps them in several dicts depending on kind.
    attach: list[int] = []
    for attr in ("tracepoint_fds", "raw_tracepoint_fds"):
        for value in getattr(bpf, attr, {}).values():
            attach.extend(value.values() if isinstance(value, dict) else [value])
    for attr in ("kprobe_fds", "uprobe_fds"):   # {name: {fn: fd}} or {name: fd}
        for value in getattr(bpf, attr, {}).values():
            attach.extend(value.values() if isinstance(value, dict) else [value])
    attach = [fd for fd in attach if isinstance(fd, int) and fd >= 0] + rescue_attach
    progs = {(k.decode() if isinstance(k, bytes) else str(k)): f.fd for k, f in bpf.funcs.items()}
    named = {"prog": bpf.funcs[req.prog_name].fd,
             "events": -1 if req.perf_mode else bpf["events"].map_fd,
             "state": bpf["cpu_state"].map_fd,
             # the perf-event array's own fd goes too: the kernel empties such a
             # map when the last user-space reference to it closes
             "perf_map": perf_table.map_fd}
    if any(f.startswith("-DTCPSTATES_AGGREGATES") for f in req.cflags):
        named["agg"] = bpf["agg"].map_fd           # bpf/aggregates.bpf.h
        named["agg_ports"] = bpf["agg_ports"].map_fd
    named = {k: fd for k, fd in named.items() if fd >= 0}
    fds = list(named.values()) + attach + list(progs.values()) + list(perf_fds.values())
    msg = {"named": list(named), "n_attach": len(attach), "progs": list(progs),
           "perf_cpus": list(perf_fds), "perf_pages": pages, "peak_rss_kb": _peak_rss_kb()}
    # the BPF object is kept alive until the tracer has everything: bcc's
    # table objects empty the perf-event map when they are garbage-collected
    return msg, fds, bpf


def _silent_exit_message(status: int, capture: IO[bytes]) -> str:
    """Why the loader's child ended without an answer: its exit or signal and
    the last lines the compiler printed (an LLVM fatal error exits at once)."""
    if os.WIFSIGNALED(status):
        try:
            how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        except ValueError:
            how = f"was killed by signal {os.WTERMSIG(status)}"
    else:
        how = f"exited with status {os.waitstatus_to_exitcode(status)}"
    capture.seek(0)
    printed = _last_lines(capture.read().decode("utf-8", "replace"))
    return (f"the BPF loader {how} without an answer"
            + (f"; the compiler printed: {printed}" if printed else " and printed nothing")
            + "; run 'tcpstates doctor' for details")


def load(req: LoadRequest) -> Loaded:
    """Fork, load in the child, receive the descriptors; raise its errors here."""
    # The compiler's output goes to a file this process holds: when LLVM
    # ends the child with a fatal error, its message is still readable here.
    try:
        capture = tempfile.TemporaryFile()
    except OSError as exc:
        raise EnvironmentProblem(f"cannot create a temporary file for the BPF compiler's output "
                                 f"({exc}): set TMPDIR to a writable directory") from None
    with capture:
        return _load_with(req, capture)


def _load_with(req: LoadRequest, capture: IO[bytes]) -> Loaded:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        raise
    if pid == 0:   # ---- child ----
        try:
            ours.close()
            signal.signal(signal.SIGINT, signal.SIG_DFL)     # Ctrl-C during compile ends it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            try:
                msg, fds, _keepalive = _child(req, capture)
                socket.send_fds(theirs, [json.dumps(msg).encode()], fds)
                # Stay until the tracer has mapped the perf buffers: if our
                # mappings went first, the kernel would tear the buffers down.
                theirs.recv(1)
            except BaseException as exc:
                kind = "usage" if isinstance(exc, UsageError) else "environment"
                text = str(exc) if isinstance(exc, (EnvironmentProblem, UsageError)) else \
                    f"BPF loader failed: {type(exc).__name__}: {exc}"
                theirs.send(json.dumps({"error": text, "kind": kind}).encode())
        finally:
            os._exit(0)   # no atexit: bcc's clean-up would disable the shared perf events
    theirs.close()
    perf: PerfBufferReader | None = None
    try:
        data, fds, _flags, _addr = socket.recv_fds(ours, 1 << 16, 1024)
        if data:
            msg = json.loads(data)
            if "error" not in msg:
                perf_fds = dict(zip(msg["perf_cpus"], fds[len(fds) - len(msg["perf_cpus"]):]))
                perf = PerfBufferReader(perf_fds, msg["perf_pages"])
                ours.send(b"k")
    finally:
        ours.close()
        _, status, usage = os.wait4(pid, 0)
    helper_peak_kb = usage.ru_maxrss
    if not data:
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGINT, signal.SIGTERM) \
                and interrupt.requested():
            # Ctrl-C (the whole process group) or a stop of the service while
            # the program compiled: a stop before tracing began, not a fault
            raise interrupt.StopRequested()
        raise EnvironmentProblem(_silent_exit_message(status, capture))
    if "error" in msg:
        for fd in fds:
            os.close(fd)
        raise (UsageError if msg["kind"] == "usage" else EnvironmentProblem)(msg["error"])
    rest = list(fds)
    named = {name: rest.pop(0) for name in msg["named"]}
    attach = [rest.pop(0) for _ in range(msg["n_attach"])]
    progs = {name: rest.pop(0) for name in msg["progs"]}
    assert perf is not None and len(rest) == len(msg["perf_cpus"])
    return Loaded(prog_fd=named["prog"], events_fd=named.get("events", -1), state_fd=named["state"],
                  ncpus=req.ncpus, perf_fds=dict(zip(msg["perf_cpus"], rest)), perf=perf,
                  helper_peak_rss_kb=max(msg["peak_rss_kb"], helper_peak_kb), all_fds=list(fds),
                  attach_fds=attach, prog_fds=progs, agg_fd=named.get("agg", -1),
                  agg_ports_fd=named.get("agg_ports", -1))
