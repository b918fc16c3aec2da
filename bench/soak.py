#!/usr/bin/env python3
"""Soak: millions of events through tcpstates; RSS and open fds must stay flat,
and every event must be accounted for against the kernel's own count.

    sudo .venv/bin/python bench/soak.py --connections 1000000     # 10 M events
    sudo .venv/bin/python bench/soak.py --connections 20000 --sink jsonl  # quick

Prints one line per load round (RSS, fds, events so far) and a verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import TracerRun, count_port_lines, free_port, run_load  # noqa: E402
from truth import TracepointCounter  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=10, help="load rounds (RSS sampled after each)")
    p.add_argument("--sink", default="text", choices=["text", "jsonl"])
    a = p.parse_args()
    if os.geteuid() != 0 or not 1000 <= a.connections <= 5_000_000 or not 1 <= a.rounds <= 100:
        p.error("root, 1000 <= --connections <= 5000000, 1 <= --rounds <= 100")
    port = free_port()
    per_round = a.connections // a.rounds
    argv = [sys.executable, "-P", "-m", "tcpstates"] + (["--sink", "jsonl"] if a.sink == "jsonl" else [])
    with tempfile.TemporaryDirectory(prefix="tcpstates-soak-", dir="/var/tmp") as tmp:
        t = TracerRun("soak", argv, Path(tmp), dict(os.environ))
        samples = []
        recorded = overrun = 0
        for r in range(a.rounds):
            truth = TracepointCounter(port, per_round * 10 + 10)   # per round: bounded buffer
            load = run_load(port, per_round, 0, 3600)
            n, o = truth.stop()
            truth.close()
            recorded += n
            overrun += o
            samples.append((r, rss_mb(t.proc.pid), len(os.listdir(f"/proc/{t.proc.pid}/fd"))))
            print(f"round {r + 1}/{a.rounds}: {load['connections']} connections at {load['rate']}/s; "
                  f"tracer RSS {samples[-1][1]:.1f} MB, open fds {samples[-1][2]}", flush=True)
        t.settle(60)
        t.stop()
        err = t.err_path.read_text()
        printed = count_port_lines(t.out_path, port)
    m = re.search(r"(\d+) dropped, (\d+) kernel misses", err)
    dropped, misses = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    first, last = samples[0], samples[-1]
    verdict = ("OK" if printed + dropped + misses >= recorded and overrun == 0 and
               last[1] - first[1] < 10 and last[2] == first[2] else "CHECK")
    print(json.dumps({"verdict": verdict, "events_truth": recorded, "truth_overrun": overrun, "printed": printed,
                      "dropped": dropped, "kernel_misses": misses,
                      "rss_first_mb": round(first[1], 1), "rss_last_mb": round(last[1], 1),
                      "fds_first": first[2], "fds_last": last[2]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
