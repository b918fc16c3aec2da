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



def test_loader_ended_by_llvm_says_how_and_what_the_compiler_printed(tmp_path):
    # LLVM's BPF back end ends the process on some code it cannot compile (a
    # fatal error: exit(1) from inside bcc.BPF(), no exception to report). The
    # loader's child then dies without answering; the error must say how it
    # ended and what the compiler printed, not "killed?". The compile is real.
    from tcpstates.errors import EnvironmentProblem
    from tcpstates.plugins.kernel.headers import choose_header_tree
    from tcpstates.plugins.kernel.loader import LoadRequest, load

    src = tmp_path / "prog.bpf.c"
    src.write_text("int f(void *ctx) { volatile __int128 x = (long)ctx; return (int)(x / (x + 3)); }\n")
    tree, _how = choose_header_tree()
    with pytest.raises(EnvironmentProblem) as err:
        load(LoadRequest(cflags=[], src_file=str(src), header_tree=str(tree) if tree else None,
                         perf_mode=False, buffer_pages=8, local_ports=None, remote_ports=None))
    text = str(err.value)
    assert "exited with status 1" in text and "__divti3" in text and "is not supported" in text, text
    assert "killed?" not in text and "\n" not in text
