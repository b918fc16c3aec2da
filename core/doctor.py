"""`tcpstates doctor`: can this machine trace? Each check says pass/fail and what to do.

Exit status 0 when tracing can work (every required check passes), 1 when not.
Optional checks (journal, systemd-python, BTF) only warn.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Callable, Sequence

from tcpstates.headers import choose_header_tree
from tcpstates.kernel_probe import find_tracefs, kernel_version, tracepoint_exists

Check = tuple[str, bool, bool, str]   # name, required, ok, detail / what to do


def _kernel() -> Check:
    v = kernel_version()
    ok = v >= (4, 16)
    return ("kernel", True, ok, f"Linux {platform.release()}" + ("" if ok else
            " — the sock:inet_sock_set_state tracepoint needs Linux 4.16 or newer"))


def _root() -> Check:
    ok = os.geteuid() == 0
    return ("root", True, ok, "running as root" if ok else "run as root (sudo): BPF needs CAP_BPF/CAP_PERFMON")


def _tracefs() -> Check:
    tf = find_tracefs(mount=os.geteuid() == 0)
    return ("tracefs", True, tf is not None, str(tf) if tf else
            "not mounted: mount -t tracefs tracefs /sys/kernel/tracing")


def _tracepoint() -> Check:
    tf = find_tracefs(mount=False)
    ok = tf is not None and tracepoint_exists(tf)
    return ("tracepoint", True, ok, "sock:inet_sock_set_state present" if ok else
            "sock:inet_sock_set_state missing (Linux < 4.16, or tracefs not mounted)")


def _bpf() -> Check:
    ok = Path("/sys/fs/bpf").exists() or Path("/proc/sys/kernel/unprivileged_bpf_disabled").exists()
    return ("bpf", True, ok, "BPF syscall available" if ok else "kernel without CONFIG_BPF_SYSCALL")


def _ringbuf() -> Check:
    ok = kernel_version() >= (5, 8)
    return ("ring buffer", False, ok, "BPF ring buffer (Linux >= 5.8)" if ok else
            "no BPF ring buffer before Linux 5.8: the slower perf buffer is used")


def _btf() -> Check:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return ("btf", False, ok, "/sys/kernel/btf/vmlinux present" if ok else
            "no BTF: not needed by tcpstates (bcc compiles against headers)")


def _bcc() -> Check:
    try:
        import bcc
        ok = hasattr(bcc, "BPF")
        detail = f"bcc {getattr(bcc, '__version__', '?')} at {Path(bcc.__file__).parent}" if ok else \
            "the 'bcc' module is the unrelated PyPI package: pip uninstall bcc; apt-get install python3-bpfcc"
    except ImportError:
        ok, detail = False, (f"not importable from {sys.executable}: apt-get install python3-bpfcc "
                             f"(Fedora python3-bcc, Arch python-bcc); venvs need --system-site-packages")
    return ("bcc", True, ok, detail)


def _headers() -> Check:
    try:
        tree, how = choose_header_tree()
    except OSError as exc:
        return ("kernel headers", True, False, f"cannot prepare generic headers: {exc}")
    ok = how != "none found"
    return ("kernel headers", True, ok, how + (f" → {tree}" if tree else "") if ok else
            "none: apt-get install linux-headers-$(uname -r) (or the generic linux-headers-<arch>)")


def _journal() -> Check:
    ok = Path("/run/systemd/journal/socket").exists()
    return ("journal socket", False, ok, "/run/systemd/journal/socket present" if ok else
            "journald not running: the journal sink (-Y) would have nowhere to write")


def _systemd_python() -> Check:
    try:
        from systemd import journal  # noqa: F401
        return ("systemd-python", False, True, "importable")
    except ImportError:
        return ("systemd-python", False, False, "missing: apt-get install python3-systemd (for -Y)")


CHECKS: list[Callable[[], Check]] = [_kernel, _root, _tracefs, _tracepoint, _bpf, _ringbuf, _btf,
                                     _bcc, _headers, _journal, _systemd_python]


def doctor_command(argv: Sequence[str]) -> int:
    from tcpstates.cli import OneLineParser
    p = OneLineParser(prog="tcpstates doctor", description="check whether this machine can trace")
    p.parse_args(argv)
    failed = False
    for check in CHECKS:
        name, required, ok, detail = check()
        mark = "ok  " if ok else ("FAIL" if required else "warn")
        print(f"{mark} {name:15s} {detail}")
        failed |= required and not ok
    print("tracing can work" if not failed else "tracing cannot work: fix the FAIL lines above")
    return 1 if failed else 0
