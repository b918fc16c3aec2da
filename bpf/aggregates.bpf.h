/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/* aggregates.bpf.h - in-kernel histograms and counters (-DTCPSTATES_AGGREGATES).
 *
 * Included by tcpstates.bpf.c. Without TCPSTATES_AGGREGATES it defines
 * nothing but an empty TCPSTATES_AGGREGATE(). With it, every state change
 * that passed every in-kernel filter is folded in here, so that sinks such
 * as --summary and the metrics endpoint are computed without one record
 * reaching user space (with TCPSTATES_NO_EVENTS no record is even reserved):
 *   agg        one struct tcpstates_agg per CPU (bpf/tcpstates.h), in a
 *              memory-mappable array like cpu_state: each CPU writes only
 *              its own row (the program never runs nested on one CPU), user
 *              space sums the rows from its mapping, no bpf() syscall;
 *   agg_ports  2 x 65536 u64: events by local port, then by remote port.
 *              Shared by all CPUs (a per-CPU copy would be 1 MB per CPU), so
 *              added to atomically;
 *   est_start  per-socket LRU of the time it entered ESTABLISHED, for the
 *              connection lifetime (ESTABLISHED entered -> CLOSE).
 * Histograms are log2 of the span in microseconds: bucket i holds spans
 * whose microsecond count has bit length i (bucket 0: under 1 us), as
 * bcc's print_log2_hist; TCPSTATES_AGG_BUCKETS covers every u64 of ns.
 */
#ifndef TCPSTATES_AGGREGATES_BPF_H
#define TCPSTATES_AGGREGATES_BPF_H

#ifndef TCPSTATES_AGGREGATES

#define TCPSTATES_AGGREGATE(args, ts, sk, span, known, slot) do { } while (0)

#else /* TCPSTATES_AGGREGATES */

#define TCPSTATES_TCP_ESTABLISHED 1
#define TCPSTATES_AGG_MAX_PORTS 65536

BPF_F_TABLE("array", u32, struct tcpstates_agg, agg, TCPSTATES_NCPUS * TCPSTATES_SLOTS, (1U << 10));
BPF_F_TABLE("array", u32, u64, agg_ports, 2 * TCPSTATES_AGG_MAX_PORTS, (1U << 10));
BPF_TABLE("lru_hash", u64, struct tcpstates_sk_ts, est_start, TCPSTATES_MAX_SOCKETS);

/* bit length of v (0 for 0): the log2 bucket of a microsecond count */
static __always_inline u32 agg_bucket(u64 ns)
{
    u64 v = ns / 1000;
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8)  { v >>= 8;  r += 8; }
    if (v >> 4)  { v >>= 4;  r += 4; }
    if (v >> 2)  { v >>= 2;  r += 2; }
    if (v >> 1)  { v >>= 1;  r += 1; }
    return r + (u32)v;
}

static __always_inline void agg_port(u32 index)
{
    u64 *n = agg_ports.lookup(&index);
    if (n)
        __sync_fetch_and_add(n, 1);
}

/* Fold one kept state change in. `known`: the span (time in the old state)
 * was measured. A function, not a macro: bcc rewrites map calls only in
 * code it sees as written. */
static __always_inline void aggregate(u32 old, u32 new, u32 sport, u32 dport, u64 ts, u64 sk,
                                      u64 span, int known, u32 cpu_slot)
{
    /* per CPU and program slot: the counters below are plain increments */
    struct tcpstates_agg *a = agg.lookup(&cpu_slot);
    old &= TCPSTATES_NSTATES - 1;
    new &= TCPSTATES_NSTATES - 1;
    if (a) {
        a->events++;
        a->transitions[old][new]++;
        if (known) {
            u32 b = agg_bucket(span);
            if (b < TCPSTATES_AGG_BUCKETS) {
                a->state_hist[old][b]++;
                a->state_sum_ns[old] += span;
                if (old == TCPSTATES_TCP_SYN_SENT && new == TCPSTATES_TCP_ESTABLISHED) {
                    a->extra_hist[TCPSTATES_AGG_HANDSHAKE][b]++;
                    a->extra_sum_ns[TCPSTATES_AGG_HANDSHAKE] += span;
                }
            }
        }
        if (new == TCPSTATES_TCP_ESTABLISHED) {
            struct tcpstates_sk_ts start = {.sk = sk, .ts = ts};
            est_start.update(&sk, &start);
        } else if (new == TCPSTATES_TCP_CLOSE) {
            struct tcpstates_sk_ts *start = est_start.lookup(&sk);
            u64 life = start ? ts - start->ts : 0;
            if (start && TCPSTATES_SAME_SK(start, sk)) {
                u32 lb = agg_bucket(life);
                if (lb < TCPSTATES_AGG_BUCKETS) {
                    a->extra_hist[TCPSTATES_AGG_LIFETIME][lb]++;
                    a->extra_sum_ns[TCPSTATES_AGG_LIFETIME] += life;
                }
                est_start.delete(&sk);
            }
        }
    }
    if (sport)
        agg_port(sport);
    if (dport)
        agg_port(TCPSTATES_AGG_MAX_PORTS + dport);
}

#define TCPSTATES_AGGREGATE(args, ts, sk, span, known, slot) \
    aggregate((args)->oldstate, (args)->newstate, (args)->sport, (args)->dport, ts, sk, span, known, slot)

#endif /* TCPSTATES_AGGREGATES */
#endif
