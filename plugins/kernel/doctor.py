"""The kernel stage's `tcpstates doctor` checks: kernel, root, tracefs, BPF, bcc, headers."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Callable

from tcpstates.doctor import Check
from tcpstates.speedups import doctor_check as speedup_check
from tcpstates.plugins.kernel.headers import choose_header_tree
from tcpstates.plugins.kernel.bcccompat import DEBUGFS_TRACING, bcc_needs_debugfs
from tcpstates.plugins.kernel.decoder import C_DECODER_AVAILABLE
from tcpstates.btf import VMLINUX
from tcpstates.plugins.kernel.attach import choose as choose_attachment
from tcpstates.plugins.kernel.probe import connection_error_cflags, find_tracefs, kernel_version, tracepoint_exists

Row = tuple[str, bool, bool, str]   # name, required, ok, detail / what to do


def _kernel() -> Row:
    v = kernel_version()
    ok = v >= (4, 16)
    return ("kernel", True, ok, f"Linux {platform.release()}" + ("" if ok else
            " — the sock:inet_sock_set_state tracepoint needs Linux 4.16 or newer"))


def _root() -> Row:
    ok = os.geteuid() == 0
    return ("root", True, ok, "running as root" if ok else "run as root (sudo): BPF needs CAP_BPF/CAP_PERFMON")


def _tracefs() -> Row:
    tf = find_tracefs(mount=os.geteuid() == 0)
    if tf is None:
        return ("tracefs", True, False, "not mounted: mount -t tracefs tracefs /sys/kernel/tracing")
    try:
        import bcc
        version = str(getattr(bcc, "__version__", ""))
    except ImportError:
        version = ""                     # the bcc row says what to do
    if bcc_needs_debugfs(version) and not (DEBUGFS_TRACING / "events").is_dir():
        return ("tracefs", True, False, f"{tf}, but bcc {version} reads tracepoints only under "
                f"{DEBUGFS_TRACING}: mount -t debugfs debugfs /sys/kernel/debug")
    return ("tracefs", True, True, str(tf))


def _tracepoint() -> Row:
    tf = find_tracefs(mount=False)
    ok = tf is not None and tracepoint_exists(tf)
    return ("tracepoint", True, ok, "sock:inet_sock_set_state present" if ok else
            "sock:inet_sock_set_state missing (Linux < 4.16, or tracefs not mounted)")


def _bpf() -> Row:
    ok = Path("/sys/fs/bpf").exists() or Path("/proc/sys/kernel/unprivileged_bpf_disabled").exists()
    return ("bpf", True, ok, "BPF syscall available" if ok else "kernel without CONFIG_BPF_SYSCALL")


def _ringbuf() -> Row:
    ok = kernel_version() >= (5, 8)
    return ("ring buffer", False, ok, "BPF ring buffer (Linux >= 5.8)" if ok else
            "no BPF ring buffer before Linux 5.8: the slower perf buffer is used")


def _btf() -> Row:
    cflags, why_not = connection_error_cflags()
    if why_not:
        return ("btf", False, False, why_not + "; the owner rows say what the owner loses")
    flags = "" if any("SK_FLAGS" in f for f in cflags) else (
        "; no sock.sk_flags: an abort after shutdown (FIN_WAIT2) reads as `normal`")
    return ("btf", False, True, f"{VMLINUX}: sock.sk_err at byte {cflags[0].rpartition('=')[2]} "
            f"(connection records name the error a connection ended with){flags}")


def _attach() -> Row:
    # What the default chooses: the doctor reads no configuration, so the row
    # says so rather than claim what a configured `attach` would do.
    a = choose_attachment("auto")
    if a.raw:
        return ("attach", False, True, "attach = \"auto\" (the default) uses the raw tracepoint (socket "
                "offsets from the kernel's BTF): only the program's own nesting on a CPU can make it "
                "skip a state change, and the rescue program runs it then")
    return ("attach", False, False, f"attach = \"auto\" (the default) uses the perf-event tracepoint: "
            f"{a.why_not}; a state change that interrupts another tracing program (kprobe, "
            f"perf-event tracepoint) is skipped (counted as a kernel miss)")


def _bcc() -> Row:
    try:
        import bcc
        ok = hasattr(bcc, "BPF")
        detail = f"bcc {getattr(bcc, '__version__', '?')} at {Path(bcc.__file__).parent}" if ok else \
            "the 'bcc' module is the unrelated PyPI package: pip uninstall bcc; apt-get install python3-bpfcc"
    except ImportError:
        ok, detail = False, (f"not importable from {sys.executable}: apt-get install python3-bpfcc "
                             f"(Fedora python3-bcc, Arch python-bcc); venvs need --system-site-packages")
    return ("bcc", True, ok, detail)


def _headers() -> Row:
    try:
        tree, how = choose_header_tree()
    except OSError as exc:
        return ("kernel headers", True, False, f"cannot prepare generic headers: {exc}")
    ok = how != "none found"
    return ("kernel headers", True, ok, how + (f" → {tree}" if tree else "") if ok else
            "none: apt-get install linux-headers-$(uname -r) (or the generic linux-headers-<arch>)")


ROWS: list[tuple[str, bool, Callable[[], Row]]] = [
    ("kernel", True, _kernel), ("root", True, _root), ("tracefs", True, _tracefs),
    ("tracepoint", True, _tracepoint), ("bpf", True, _bpf), ("ring buffer", False, _ringbuf),
    ("btf", False, _btf), ("attach", False, _attach), ("bcc", True, _bcc), ("kernel headers", True, _headers)]


def checks() -> list[Check]:
    return [Check(name, required, lambda fn=fn: fn()[2:4]) for name, required, fn in ROWS] + [   # type: ignore[misc]
        speedup_check("record decoder", C_DECODER_AVAILABLE, "C decoder of kernel records is in use", "same events")]
