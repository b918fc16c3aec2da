"""The kernel stage: bpf/tcpstates.bpf.c on sock:inet_sock_set_state, compiled by bcc
in a helper process, read from a BPF ring (or perf) buffer in whole batches.

    source.py    the `kernel` Source: options, kernel constraints merged from filters
    probe.py     compile/attach through the loader, read and decode batches
    loader.py    the short-lived helper that runs bcc and hands the fds over
    ringbuf.py   the ring buffer reader (mmap walk);  perfbuf.py  the perf buffer reader
    decoder.py   raw records → Events;  bpfsys.py  the possible-CPU count maps are sized by
    headers.py   a header tree for bcc when none matches the running kernel
    doctor.py    this stage's `tcpstates doctor` checks
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tcpstates import hookimpl
from tcpstates.errors import UsageError
from tcpstates.plugins.kernel import doctor
from tcpstates.plugins.kernel.source import KernelSource
from tcpstates.runconfig import RunConfig


@hookimpl
def tcpstates_register_sources(register: Any) -> None:
    register(KernelSource)


@hookimpl
def tcpstates_add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connections", action="store_true",
                        help="one record per connection when it closes (endpoints, owner, time in "
                        "every state, how it ended), accumulated in the kernel; no per-state-change "
                        "records ([sources.kernel] mode = \"connections\")")


@hookimpl(tryfirst=True)
def tcpstates_configure(config: RunConfig, args: argparse.Namespace) -> None:
    if args.ebpf:   # bcc's hidden flag: print the BPF program and exit
        from tcpstates.plugins.kernel.probe import bpf_source_dir
        d = bpf_source_dir()
        sys.stdout.write((d / "tcpstates.h").read_text() + (d / "tcpstates.bpf.c").read_text())
        sys.stdout.flush()
        raise SystemExit(0)
    if args.connections:
        if config.source.name != "kernel":
            raise UsageError(f"--connections is a mode of the kernel source; the source here is "
                             f"{config.source.name!r}")
        config.use_source("kernel", "--connections", mode="connections")


@hookimpl
def tcpstates_doctor_checks(register: Any) -> None:
    for check in doctor.checks():
        register(check)
