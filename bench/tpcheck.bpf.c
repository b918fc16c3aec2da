/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/* tpcheck: two programs on sock:inet_sock_set_state (perf tracepoint and raw
 * tracepoint), each counting per transition and logging every FIN_WAIT1/2
 * transition (ktime, CPU, socket, ports) so each ftrace record can be matched
 * to the program runs of the same event. Work like tcpstates' (LRU hash
 * lookup/update/delete, ringbuf reserve/discard) makes a run long enough to be
 * interrupted. kprobes on the tracepoint (un)registration log who changes the
 * tracepoint's probe list, and when. */
#include <uapi/linux/ptrace.h>
BPF_PERCPU_ARRAY(tp_cnt, u64, 256);
BPF_PERCPU_ARRAY(raw_cnt, u64, 256);
struct rec { u64 ts; u64 sk; u32 cpu; u16 sport, dport; u8 o, n, src, pad[5]; };
#define LOGN 524288
BPF_ARRAY(tp_log, struct rec, LOGN);
BPF_ARRAY(raw_log, struct rec, LOGN);
BPF_ARRAY(idx, u64, 4);
BPF_TABLE("lru_hash", u64, u64, tp_last, 65536);
BPF_TABLE("lru_hash", u64, u64, raw_last, 65536);
BPF_RINGBUF_OUTPUT(rb, 256);
struct reg { u64 ts; u64 tp; u32 pid, kind; char comm[16]; };
BPF_ARRAY(reg_log, struct reg, 4096);

/* one copy per map: bcc rewrites map.method() only where the map is named */
static __always_inline void tp_work(u64 k, int ns) {
    u64 ts = bpf_ktime_get_ns();
    tp_last.lookup(&k);
    u64 *e = rb.ringbuf_reserve(96);
    if (e) { e[0] = ts; rb.ringbuf_discard(e, 1); }
    if (ns == 7) tp_last.delete(&k); else tp_last.update(&k, &ts);
}
static __always_inline void tp_logit(u64 sk, int o, int n, u16 sp, u16 dp) {
    u32 z = 0;
    u64 *ix = idx.lookup(&z);
    if (!ix) return;
    u32 i = __sync_fetch_and_add(ix, 1);
    struct rec *r = tp_log.lookup(&i);
    if (!r) return;
    r->ts = bpf_ktime_get_ns(); r->sk = sk; r->cpu = bpf_get_smp_processor_id();
    r->sport = sp; r->dport = dp; r->o = o; r->n = n; r->src = 2;
}
static __always_inline void raw_work(u64 k, int ns) {
    u64 ts = bpf_ktime_get_ns();
    raw_last.lookup(&k);
    u64 *e = rb.ringbuf_reserve(96);
    if (e) { e[0] = ts; rb.ringbuf_discard(e, 1); }
    if (ns == 7) raw_last.delete(&k); else raw_last.update(&k, &ts);
}
static __always_inline void raw_logit(u64 sk, int o, int n, u16 sp, u16 dp) {
    u32 z = 1;
    u64 *ix = idx.lookup(&z);
    if (!ix) return;
    u32 i = __sync_fetch_and_add(ix, 1);
    struct rec *r = raw_log.lookup(&i);
    if (!r) return;
    r->ts = bpf_ktime_get_ns(); r->sk = sk; r->cpu = bpf_get_smp_processor_id();
    r->sport = sp; r->dport = dp; r->o = o; r->n = n; r->src = 1;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != 6)
        return 0;
    u32 i = ((args->oldstate & 15) << 4) | (args->newstate & 15);
    u64 *c = tp_cnt.lookup(&i);
    if (c) (*c)++;
    if (args->oldstate == 4 || args->oldstate == 5)
        tp_logit((u64)args->skaddr, args->oldstate, args->newstate, args->sport, args->dport);
    tp_work((u64)args->skaddr, args->newstate);
    return 0;
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    u64 sk = ctx->args[0];
    int o = ctx->args[1], n = ctx->args[2];
    u32 i = ((o & 15) << 4) | (n & 15);
    u64 *c = raw_cnt.lookup(&i);
    if (c) (*c)++;
    if (o == 4 || o == 5)
        raw_logit(sk, o, n, 0, 0);
    raw_work(sk, n);
    return 0;
}

static __always_inline int reglog(u64 tp, u32 kind) {
    u32 z = 2;
    u64 *ix = idx.lookup(&z);
    if (!ix) return 0;
    u32 i = __sync_fetch_and_add(ix, 1);
    if (i >= 4096) return 0;
    struct reg *r = reg_log.lookup(&i);
    if (!r) return 0;
    r->ts = bpf_ktime_get_ns(); r->tp = tp; r->pid = bpf_get_current_pid_tgid() >> 32; r->kind = kind;
    bpf_get_current_comm(&r->comm, 16);
    return 0;
}
int kp_reg(struct pt_regs *ctx) { return reglog(PT_REGS_PARM1(ctx), 1); }
int kp_unreg(struct pt_regs *ctx) { return reglog(PT_REGS_PARM1(ctx), 2); }
