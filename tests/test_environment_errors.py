"""Clear, actionable errors when the machine cannot trace: one line, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from tracer import run_cli, tcpstates_argv

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


def _loader_child_ready(pid: int, deadline: float) -> int:
    """The loader's child of tracer `pid` once it takes SIGINT's default action
    (its first step: before that, a SIGINT would run the tracer's own handler
    in the child). Returns the child's PID."""
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    try:
                        with open(f"/proc/{child}/status") as st:
                            caught = next(int(l.split()[1], 16) for l in st if l.startswith("SigCgt:"))
                    except (OSError, StopIteration):
                        continue
                    if not caught & (1 << (signal.SIGINT - 1)):
                        return int(child)
        time.sleep(0.005)   # polling /proc: the child signals nothing of its own
    raise AssertionError("the BPF loader's child never appeared")


def test_ctrl_c_while_the_program_compiles_is_a_stop_not_an_error():
    # Ctrl-C reaches the whole process group: the tracer and its loader child,
    # which dies of it mid-compile. That is a stop before tracing began — exit 0,
    # one line, nothing on stdout — not "BPF loader killed by SIGINT", exit 1.
    proc = subprocess.Popen(tcpstates_argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _loader_child_ready(proc.pid, time.monotonic() + 30)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert err == b"tcpstates: stopped before tracing began; nothing was traced\n", err
    assert out == b""
