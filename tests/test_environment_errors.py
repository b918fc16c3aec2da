"""Clear, actionable errors when the machine cannot trace: one line, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tracer import run_cli

pytestmark = pytest.mark.root


def _one_line(r: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    err = r.stderr.decode()
    assert r.returncode == status, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert r.stdout == b""


def test_bcc_missing():
    code = ("import sys; sys.modules['bcc'] = None\n"     # as on a machine without python3-bpfcc
            "from tcpstates.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    _one_line(r, 1, "bcc", "apt-get install python3-bpfcc", "--system-site-packages")


def test_tracepoint_missing(tmp_path):
    # a tracefs without sock:inet_sock_set_state, as on Linux < 4.16
    (tmp_path / "events" / "sched").mkdir(parents=True)
    r = run_cli(env={"TCPSTATES_TRACEFS": str(tmp_path)})
    _one_line(r, 1, "no sock:inet_sock_set_state tracepoint", "Linux 4.16")


def test_bpf_compile_failure_shows_the_compiler(tmp_path):
    # a header tree without headers: clang's own error must reach the user
    r = run_cli(env={"BCC_KERNEL_SOURCE": str(tmp_path)})
    _one_line(r, 1, "BPF compile/load failed", "kconfig.h", "install kernel headers")


def test_ebpf_prints_the_program():
    r = run_cli("--ebpf")
    assert r.returncode == 0
    assert b"TRACEPOINT_PROBE(sock, inet_sock_set_state)" in r.stdout
    assert b"struct tcpstates_event" in r.stdout
