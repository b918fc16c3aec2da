"""Issue 12: what the owner's send/recv probes add to every send/recv on the host.

The owner enricher hooks sock:sock_send_length and sock:sock_recv_length, which
fire for every send and receive of every process, on TCP and on every other
socket (unix, UDP). bpf_stats gives only the program's own run time; this
measures the whole path the sending process pays (tracepoint dispatch included)
as the difference in its CPU time per call, measured by bench/iocost.c (built
here with cc):

    one thread, a connected pair of sockets, N times: send 64 bytes, receive them
    (tcp, unix, udp), or N receives on an empty socket that end in EAGAIN
    (*-eagain: little kernel work per call, so what a probe adds stands out), or
    N times dup() and close() a descriptor (*-close: a TCP socket's, or /dev/null's
    for file-close: what a probe on close() adds to every close on the host), or
    N getppid() calls (syscall: nothing of ours traces it, so what it pays is
    what attaching any syscall tracepoint, the owner's accept and close probes,
    adds to every system call on the host: the kernel's syscall-tracing path),
    or N / 10 loopback connections made, accepted and closed one at a time
    (connect: wall ns per connection, 8 state changes each; what the
    state-change program and the owner's probes add to a connection)

with no tracer, with the tracer and the owner off (no send/recv probes), and with
the owner's probes attached as raw tracepoints (the default where BTF allows) or
as perf-event tracepoints (kernel_io_probe = "tracepoint"). The variants take
turns within each round, so that a slower moment of this shared VM hits them
alike; figures are medians over the rounds and differences against "no tracer"
from the same run.

    sudo .venv/bin/python bench/iocost.py --rounds 7 --calls 200000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import OURS, TracerRun, tracer_argv  # noqa: E402

OWNER_TP = 'chain=[{use="owner", kernel_io_probe="tracepoint"}]'
VARIANTS: dict[str, list[str] | None] = {
    "no tracer": None,
    "owner off": OURS + ["--sink", "jsonl", "-o", "tcpstates.owner=off"],
    "owner, raw tracepoints": OURS + ["--sink", "jsonl"],
    "owner, perf-event tracepoints": OURS + ["--sink", "jsonl", "-o", OWNER_TP],
}
KINDS = ("tcp", "unix", "udp", "tcp-eagain", "unix-eagain", "udp-eagain", "tcp-close", "file-close", "syscall",
         "connect")
# a connection is ~30 µs of kernel work, a call ~0.1-5 µs: fewer of them
CALLS_DIVISOR = {"connect": 10}


def ns_per_call(binary: Path, kind: str, calls: int) -> float:
    """The loop's CPU ns per call (a send or a receive; a dup and close), or
    wall ns per connection (connect)."""
    calls = max(1, calls // CALLS_DIVISOR.get(kind, 1))
    out = subprocess.run([str(binary), kind, str(calls)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"iocost {kind}: {out.stderr.strip() or out.returncode}")
    return float(out.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds (1..50)")
    p.add_argument("--calls", type=int, default=200000, help="round trips per socket kind (1000..5000000)")
    p.add_argument("--baseline", metavar="PYTHON",
                   help="also the owner variant of another checkout, run by that checkout's "
                   "venv Python (e.g. ../old/.venv/bin/python): before/after in one run")
    a = p.parse_args()
    if os.geteuid() != 0:
        p.error("needs root (tracing)")
    if not 1 <= a.rounds <= 50 or not 1000 <= a.calls <= 5_000_000:
        p.error("bounds: --rounds 1..50, --calls 1000..5000000")
    if a.baseline and not os.access(a.baseline, os.X_OK):
        p.error(f"--baseline {a.baseline}: not an executable Python")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        p.error("needs a C compiler (cc) for bench/iocost.c")
    env = {**os.environ}
    runs: dict[tuple[str, str], list[float]] = {}
    variants = dict(VARIANTS)
    if a.baseline:
        variants["owner, baseline checkout"] = tracer_argv(a.baseline) + ["--sink", "jsonl"]
    names = list(variants)
    with tempfile.TemporaryDirectory(prefix="tcpstates-iocost-") as tmp:
        binary = Path(tmp, "iocost")
        subprocess.run([cc, "-O2", "-o", str(binary), str(Path(__file__).with_suffix(".c"))], check=True)
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                argv = variants[name]
                tracer = TracerRun(f"iocost{r}-{names.index(name)}", argv, Path(tmp), env) if argv else None
                try:
                    for kind in KINDS:
                        runs.setdefault((name, kind), []).append(ns_per_call(binary, kind, a.calls))
                finally:
                    if tracer:
                        tracer.stop()
                print(f"iocost: round {r + 1} {name}: " + ", ".join(
                    f"{k} {runs[(name, k)][-1]:.0f} ns" for k in KINDS), file=sys.stderr, flush=True)
    base = {k: statistics.median(runs[("no tracer", k)]) for k in KINDS}
    print(f"CPU ns per send or receive (medians of {a.rounds} rounds, {a.calls} round trips per kind; "
          f"connect: wall ns per connection, {max(1, a.calls // CALLS_DIVISOR['connect'])} connections); "
          "in brackets: added to each call against no tracer")
    print(f"{'variant':30}" + "".join(f"{k:>15}" for k in KINDS))
    for name in names:
        cells = []
        for k in KINDS:
            med = statistics.median(runs[(name, k)])
            cells.append(f"{med:.0f}" + ("" if name == "no tracer" else f" ({med - base[k]:+.0f})"))
        print(f"{name:30}" + "".join(f"{c:>15}" for c in cells))
    print("spread per variant and kind (min..max ns): " + "; ".join(
        f"{n} {k} {min(v):.0f}..{max(v):.0f}" for (n, k), v in runs.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
