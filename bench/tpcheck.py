#!/usr/bin/python3
"""tpcheck: which sock:inet_sock_set_state events does ftrace record that the
BPF programs never run for — and in what context?

One bounded loopback storm (NPROC processes, each at most COUNT connections
and SECS seconds; the accepted socket closes first, so it makes
FIN_WAIT1 -> FIN_WAIT2 -> CLOSE) while, on the same tracepoint:
  * a perf-tracepoint BPF program and a raw-tracepoint BPF program
    (bench/tpcheck.bpf.c) count every transition per CPU and log every
    FIN_WAIT1/2 transition with bpf_ktime_get_ns() and the CPU;
  * a private ftrace instance (trace_clock=mono, the same clock) records the
    event plus irq:softirq_entry/exit, irq:irq_handler_entry and
    sched:sched_switch, so every record that neither program saw can be shown
    in its context (what ran on that CPU around it);
  * kprobes on tracepoint_probe_register_prio_may_exist / _unregister log any
    change of a tracepoint's probe list during the run (who, when);
  * optionally (HAMMER=1) a thread does BPF_MAP_LOOKUP_ELEM syscalls.
Then: per-transition totals (ftrace / tp / raw_tp), run_cnt and
recursion_misses from fdinfo (bpf_stats_enabled), and every FIN_WAIT* record
of ftrace without a matching program log entry (same ports+states for tp,
same CPU+states within 200 us for raw_tp), with the trace around it.

usage: flock /tmp/tcpstates-kernel.lock /usr/bin/python3 bench/tpcheck.py NPROC COUNT SECS
       (root; about SECS + 15 s; the instance uses 2 x BUF_MB MiB per CPU while it runs)
"""
import collections
import os
import re
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
T = "/sys/kernel/tracing"
INST = T + "/instances/tpcheck"
BUF_MB = int(os.environ.get("BUF_MB", "96"))
STATE = {"TCP_ESTABLISHED": 1, "TCP_SYN_SENT": 2, "TCP_SYN_RECV": 3, "TCP_FIN_WAIT1": 4,
         "TCP_FIN_WAIT2": 5, "TCP_TIME_WAIT": 6, "TCP_CLOSE": 7, "TCP_CLOSE_WAIT": 8,
         "TCP_LAST_ACK": 9, "TCP_LISTEN": 10, "TCP_CLOSING": 11, "TCP_NEW_SYN_RECV": 12}
NAME = {v: k[4:] for k, v in STATE.items()}


def load(nproc: int, count: int, secs: float) -> int:
    import socket

    def worker() -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(128)
        end, n = time.monotonic() + secs, 0
        while n < count and time.monotonic() < end:
            c = socket.socket()
            c.connect(srv.getsockname())
            s, _ = srv.accept()
            s.close()          # server closes first: FIN_WAIT1 -> FIN_WAIT2 -> CLOSE
            c.recv(1)
            c.close()
            n += 1
        srv.close()
        return n
    r, w = os.pipe()
    pids = []
    for _ in range(nproc):
        pid = os.fork()
        if pid == 0:
            os.write(w, f"{worker()}\n".encode())
            os._exit(0)
        pids.append(pid)
    os.close(w)
    for p in pids:
        os.waitpid(p, 0)
    return sum(int(x) for x in os.read(r, 1 << 16).split())


def w(path: str, val: str) -> None:
    with open(path, "w") as f:
        f.write(val)


def fdinfo(fd: int) -> dict:
    d = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            d[k.strip()] = v.strip()
    return {k: int(d.get(k, 0)) for k in ("run_cnt", "recursion_misses", "run_time_ns")}


LINE = re.compile(r"^\s*(.*?)-(\d+)\s+\[(\d+)\]\s+(\S+)\s+(\d+)\.(\d+): (\w+): (.*)$")
SOCK = re.compile(r"sport=(\d+) dport=(\d+).*oldstate=(\S+) newstate=(\S+)")


def main() -> None:
    nproc, count, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    if os.path.isdir("/tmp/kx/hdr"):
        os.environ.setdefault("BCC_KERNEL_SOURCE", "/tmp/kx/hdr")
    from bcc import BPF
    old_stats = open("/proc/sys/kernel/bpf_stats_enabled").read().strip()
    os.makedirs(INST, exist_ok=True)
    try:
        b = BPF(src_file=os.path.join(HERE, "tpcheck.bpf.c").encode(), cflags=["-Wno-macro-redefined"])
        kp = []
        for fn, ev in (("kp_reg", "tracepoint_probe_register_prio_may_exist"),
                       ("kp_reg", "tracepoint_probe_register_prio"),
                       ("kp_unreg", "tracepoint_probe_unregister")):
            try:
                b.attach_kprobe(event=ev, fn_name=fn)
                kp.append(ev)
            except Exception as exc:   # noqa: BLE001 - report and go on without it
                print(f"kprobe {ev}: {exc}")
        tpfd = b.funcs[b"tracepoint__sock__inet_sock_set_state"].fd
        rawfd = b.funcs[b"raw_tracepoint__inet_sock_set_state"].fd
        w(INST + "/buffer_size_kb", str(BUF_MB * 1024))
        w(INST + "/trace_clock", "mono")
        w(INST + "/events/sock/inet_sock_set_state/filter", "protocol == 6")
        for ev in ("sock/inet_sock_set_state", "irq/softirq_entry", "irq/softirq_exit",
                   "irq/irq_handler_entry", "sched/sched_switch"):
            w(f"{INST}/events/{ev}/enable", "1")
        w(INST + "/trace", "")
        w("/proc/sys/kernel/bpf_stats_enabled", "1")
        s0 = {"tp": fdinfo(tpfd), "raw": fdinfo(rawfd)}
        w(INST + "/tracing_on", "1")
        hammer_n = [0]
        stop = threading.Event()
        if os.environ.get("HAMMER"):
            def hammer() -> None:
                t, k = b["tp_cnt"], b["tp_cnt"].Key(0)
                while not stop.is_set() and hammer_n[0] < 3000000:
                    t[k]
                    hammer_n[0] += 1
            threading.Thread(target=hammer, daemon=True).start()
        t0 = time.time()
        conns = load(nproc, count, secs)
        time.sleep(0.3)
        stop.set()
        w(INST + "/tracing_on", "0")
        s1 = {"tp": fdinfo(tpfd), "raw": fdinfo(rawfd)}
        w("/proc/sys/kernel/bpf_stats_enabled", old_stats)
        el = time.time() - t0

        def totals(name: str) -> collections.Counter:
            c = collections.Counter()
            for i, v in b[name].items():
                if sum(v):
                    c[(i.value >> 4, i.value & 15)] = sum(v)
            return c
        tp, raw = totals("tp_cnt"), totals("raw_cnt")
        ix = b["idx"]
        logs = {}
        for name, slot in (("tp_log", 0), ("raw_log", 1)):
            n = min(ix[ix.Key(slot)].value, 524288)
            tab = b[name]
            logs[name] = [tab[tab.Key(i)] for i in range(n)]
        regs = [b["reg_log"][b["reg_log"].Key(i)] for i in range(min(ix[ix.Key(2)].value, 4096))]
        stats = collections.Counter()
        for cpu in sorted(os.listdir(INST + "/per_cpu")):
            for line in open(f"{INST}/per_cpu/{cpu}/stats"):
                k, _, v = line.partition(":")
                if k.strip() in ("entries", "overrun", "commit overrun", "dropped events"):
                    stats[k.strip()] += int(float(v))
        recs = []   # (ts_ns, cpu, kind, comm, pid, flags, text)
        with open(INST + "/trace", errors="replace") as f:
            for line in f:
                m = LINE.match(line)
                if m:
                    recs.append((int(m.group(5)) * 10**9 + int(m.group(6)) * 1000, int(m.group(3)),
                                 m.group(7), m.group(1), int(m.group(2)), m.group(4), m.group(8)))
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(old_stats if "old_stats" in dir() else "0")
        try:
            for ev in ("sock/inet_sock_set_state", "irq/softirq_entry", "irq/softirq_exit",
                       "irq/irq_handler_entry", "sched/sched_switch"):
                w(f"{INST}/events/{ev}/enable", "0")
            os.rmdir(INST)
        except OSError as e:
            print("instance cleanup:", e)

    ft = collections.Counter()
    fin = []
    for i, r in enumerate(recs):
        if r[2] != "inet_sock_set_state":
            continue
        m = SOCK.search(r[6])
        o, n = STATE[m.group(3)], STATE[m.group(4)]
        ft[(o, n)] += 1
        if o in (4, 5):
            fin.append((i, r, int(m.group(1)), int(m.group(2)), o, n))
    print(f"nproc={nproc} hammer={hammer_n[0]} conns={conns} in {el:.1f}s; kprobes: {kp}")
    print(f"ftrace: {len(recs)} records; stats {dict(stats)}")
    print(f"{'transition':26s} {'ftrace':>8} {'tp':>8} {'raw_tp':>8}")
    for k in sorted(set(ft) | set(tp) | set(raw)):
        print(f"{NAME.get(k[0], k[0]):>11}->{NAME.get(k[1], k[1]):<13} {ft[k]:8d} {tp[k]:8d} {raw[k]:8d}")
    print(f"{'TOTAL':26s} {sum(ft.values()):8d} {sum(tp.values()):8d} {sum(raw.values()):8d}")
    for n in ("tp", "raw"):
        d = {k: s1[n][k] - s0[n][k] for k in s1[n]}
        print(f"{n:4s} run_cnt={d['run_cnt']} recursion_misses={d['recursion_misses']} "
              f"ns/run={d['run_time_ns'] / max(1, d['run_cnt']):.0f}")
    print(f"probe (un)registrations during the run: {len(regs)}")
    for g in regs:
        print(f"   ts={g.ts} kind={'reg' if g.kind == 1 else 'unreg'} tp={g.tp:#x} pid={g.pid} comm={g.comm.decode(errors='replace')}")

    # match every ftrace FIN_WAIT* record to the program logs
    by_tp = collections.defaultdict(list)
    for e in logs["tp_log"]:
        by_tp[(e.sport, e.dport, e.o, e.n)].append(e.ts)
    by_raw = collections.defaultdict(list)
    for e in logs["raw_log"]:
        by_raw[(e.cpu, e.o, e.n)].append(e.ts)
    for v in by_raw.values():
        v.sort()
    import bisect

    def near(lst: list, ts: int) -> int | None:
        # the programs run before ftrace's probe (registered first); ftrace prints microseconds
        j = bisect.bisect_left(lst, ts - 200_000)
        best = None
        while j < len(lst) and lst[j] <= ts + 1000:
            if best is None or abs(lst[j] - ts) < abs(best - ts):
                best = lst[j]
            j += 1
        return best
    for v in by_tp.values():
        v.sort()
    missing = []
    lag = []
    for i, r, sp, dp, o, n in fin:
        a = near(by_tp[(sp, dp, o, n)], r[0])
        c = near(by_raw[(r[1], o, n)], r[0])
        if a is not None:
            lag.append(r[0] - a)
        if a is None or c is None:
            missing.append((i, r, sp, dp, o, n, a, c))
    if lag:
        lag.sort()
        print(f"ftrace ts - tp ts (ns, ftrace truncated to us): min {lag[0]} median {lag[len(lag)//2]} max {lag[-1]}")
    # is the loss tied to the task the softirq ran on? FIN records per current task
    miss_ix = {m[0] for m in missing}
    per = collections.Counter((r[3] if r[3].startswith("python") else f"{r[3]}-{r[4]}",
                               i in miss_ix) for i, r, *_ in fin)
    others = sorted({k[0] for k in per if not k[0].startswith("python")})
    print("FIN records on other tasks (task: matched/unmatched):",
          {t: f"{per[(t, False)]}/{per[(t, True)]}" for t in others},
          f"python*: {per[('python3', False)]}/{per[('python3', True)]}")
    print(f"ftrace FIN_WAIT* records: {len(fin)}; tp log {len(logs['tp_log'])}, raw log {len(logs['raw_log'])};"
          f" unmatched: {len(missing)}")
    for i, r, sp, dp, o, n, a, c in missing[:8]:
        print(f"-- MISSING tp={'no' if a is None else 'yes'} raw={'no' if c is None else 'yes'}: cpu{r[1]} "
              f"{r[0]} {sp}->{dp} {NAME[o]}->{NAME[n]}")
        # the same ports anywhere in the run: ftrace records and the tp log
        for q in recs:
            if q[2] == "inet_sock_set_state" and f"sport={sp} dport={dp} " in q[6]:
                m = SOCK.search(q[6])
                print(f"     ftrace same ports: cpu{q[1]} {q[0]} {q[3]}-{q[4]} {q[5]} {m.group(3)}->{m.group(4)}")
        sks = set()
        for e in logs["tp_log"]:
            if (e.sport, e.dport) == (sp, dp):
                sks.add(e.sk)
                print(f"     tp log same ports: cpu{e.cpu} {e.ts} sk={e.sk:#x} {NAME[e.o]}->{NAME[e.n]}")
        for e in logs["raw_log"]:
            if e.sk in sks or (e.cpu == r[1] and abs(e.ts - r[0]) < 2_000_000 and (e.o, e.n) == (o, n)):
                print(f"     raw log same sk/near: cpu{e.cpu} {e.ts} sk={e.sk:#x} {NAME[e.o]}->{NAME[e.n]}")
        # context on that CPU: back to its last sched_switch (at most 20 ms), 100 us after
        lo = i
        while lo > 0 and r[0] - recs[lo - 1][0] < 20_000_000:
            lo -= 1
            if recs[lo][1] == r[1] and recs[lo][2] == "sched_switch":
                break
        hi = i
        while hi + 1 < len(recs) and recs[hi + 1][0] - r[0] < 100_000:
            hi += 1
        for q in recs[lo:hi + 1]:
            if q[1] == r[1]:
                mark = ">>" if q is r else "  "
                print(f"  {mark} cpu{q[1]} {q[0]} {q[3]}-{q[4]} {q[5]} {q[2]}: {q[6][:110]}")

if __name__ == "__main__":
    main()
