#!/usr/bin/env python3
"""Cost of the `container` enricher per event with churning containers.

Real cgroups (root): N docker-style scopes are created under the cgroup v2
mount; events carry their kernel ids as the owner's cgroup id. Cases:

  live      every event's cgroup exists (after the first lookup: cache hits)
  gone      every event's cgroup was removed (the exited-process case of issue 12)
  churn     a thread creates and removes cgroups during the load; events refer
            to cgroups just created and just removed, most of them new to the cache
  old-walk  what the previous resolver did for a gone cgroup: walk the whole tree
            (measured on a few events only; it is the 14.9 s / 500 events case)

Run: `sudo flock /tmp/tcpstates-kernel.lock .venv/bin/python bench/containers.py [--cgroups 1000]`.
Every cgroup created is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from tcpstates.api import RunContext
from tcpstates.plugins.container.cgroups import cgroup2_root
from tcpstates.plugins.container.enricher import ContainerEnricher, ContainerOptions
from tcpstates.testing import make_event


def enricher() -> ContainerEnricher:
    # hybrid="no": measure the id path (a v1 host adds one /proc read per new process)
    return ContainerEnricher(ContainerOptions(hybrid="no", docker_socket=""), RunContext())


def per_event_us(e: ContainerEnricher, ids: list[int], repeat: int = 1) -> float:
    batch = [make_event(pid=0, extra={"owner_pid": None, "owner_cgroup_id": i}) for i in ids] * repeat
    t0 = time.process_time()
    e.enrich_batch(batch)
    return (time.process_time() - t0) / len(batch) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cgroups", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20000)
    args = ap.parse_args()
    root = cgroup2_root()
    if root is None:
        raise SystemExit("no cgroup v2 mount")
    base = root / f"tcps-bench-{os.getpid()}.slice"
    base.mkdir()
    made: list[Path] = []
    try:
        for _ in range(args.cgroups):
            p = base / f"docker-{os.urandom(32).hex()}.scope"
            p.mkdir()
            made.append(p)
        ids = [p.stat().st_ino for p in made]
        e = enricher()
        first = per_event_us(e, ids)
        live = per_event_us(e, ids, repeat=max(1, args.events // len(ids)))
        half = made[: len(made) // 2]
        gone_ids = [p.stat().st_ino for p in half]
        for p in half:
            p.rmdir()
        made = made[len(half):]
        e = enricher()
        gone_first = per_event_us(e, gone_ids)
        gone = per_event_us(e, gone_ids, repeat=max(1, args.events // len(gone_ids)))

        # churn: a thread keeps creating and removing scopes; events name new and removed ones
        stop = threading.Event()
        fresh: list[int] = []
        removed: list[int] = []

        def churner() -> None:
            while not stop.is_set():
                p = base / f"docker-{os.urandom(32).hex()}.scope"
                p.mkdir()
                fresh.append(p.stat().st_ino)
                if len(fresh) % 2 == 0:
                    p.rmdir()
                    removed.append(fresh[-1])
                else:
                    made.append(p)

        t = threading.Thread(target=churner)
        t.start()
        e = enricher()
        n = done = 0
        cpu = 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            window = fresh[-200:]
            batch = [make_event(pid=0, extra={"owner_pid": None, "owner_cgroup_id": i}) for i in window] * 5
            t0 = time.process_time()
            e.enrich_batch(batch)
            cpu += time.process_time() - t0
            n += len(batch)
            done += sum(1 for ev in batch if "container_id" in ev.extra)
        stop.set()
        t.join()
        churn = cpu / max(n, 1) * 1e6

        t0 = time.process_time()
        walks = 5
        for _ in range(walks):
            for dirpath, _d, _f in os.walk(root):
                os.stat(dirpath)
        old = (time.process_time() - t0) / walks * 1e6
        print(f"cgroups in tree: {sum(1 for _ in os.walk(root))}")
        print(f"live      first lookup {first:8.2f} µs/event; cached {live:6.2f} µs/event")
        print(f"gone      first lookup {gone_first:8.2f} µs/event; cached {gone:6.2f} µs/event (negative cache)")
        print(f"churn     {churn:8.2f} µs/event over {n} events, {len(fresh)} cgroups created, "
              f"{len(removed)} removed during the load; {done} events attributed")
        print(f"old-walk  {old:8.2f} µs/event (a whole-tree walk, as before, per unresolvable event)")
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:
                pass
        for p in base.iterdir():
            if p.is_dir():
                try:
                    p.rmdir()
                except OSError:
                    pass
        base.rmdir()


if __name__ == "__main__":
    main()
