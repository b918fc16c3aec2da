/* tcpstates.bpf.c - the kernel stage: one record per TCP state change.
 *
 * bcc dialect. Reads nothing but the fields of the sock:inet_sock_set_state
 * tracepoint and BPF helpers, so the header tree it is compiled against need
 * not match the running kernel (no kernel struct layouts).
 *
 * Compile-time switches (-D cflags set by core/kernel_probe.py):
 *   TCPSTATES_PERF_BUFFER     use a perf buffer instead of a BPF ring buffer
 *                             (kernels older than 5.8)
 *   TCPSTATES_RINGBUF_PAGES   ring buffer size in pages (power of two)
 *   TCPSTATES_MAX_SOCKETS     entries of the per-socket LRU timestamp map
 *   TCPSTATES_FILTER_LPORT    consult the lport_allowed map
 *   TCPSTATES_FILTER_DPORT    consult the dport_allowed map
 *   TCPSTATES_FAMILY          AF_INET or AF_INET6 to keep only that family
 * The port sets themselves live in maps filled from Python after load, so the
 * C text never changes with the user's ports.
 */
#include "tcpstates.h"

#ifndef TCPSTATES_RINGBUF_PAGES
#define TCPSTATES_RINGBUF_PAGES 2048
#endif
#ifndef TCPSTATES_MAX_SOCKETS
#define TCPSTATES_MAX_SOCKETS 65536
#endif

#define TCPSTATES_IPPROTO_TCP 6
#define TCPSTATES_AF_INET 2
#define TCPSTATES_TCP_CLOSE 7

/* ns timestamp of each live socket's last transition. LRU, so a full map
 * evicts the oldest socket instead of silently refusing new ones. */
BPF_TABLE("lru_hash", u64, u64, last_change, TCPSTATES_MAX_SOCKETS);

/* Records that could not be handed to user space, per CPU. */
BPF_PERCPU_ARRAY(drops, u64, 1);

#ifdef TCPSTATES_FILTER_LPORT
BPF_ARRAY(lport_allowed, u8, 65536);
#endif
#ifdef TCPSTATES_FILTER_DPORT
BPF_ARRAY(dport_allowed, u8, 65536);
#endif

#ifdef TCPSTATES_PERF_BUFFER
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(scratch, struct tcpstates_event, 1);
#else
BPF_RINGBUF_OUTPUT(events, TCPSTATES_RINGBUF_PAGES);
#endif

static __always_inline int port_allowed(void *map_lookup_result)
{
    u8 *allowed = map_lookup_result;
    return allowed && *allowed;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != TCPSTATES_IPPROTO_TCP)
        return 0;
#ifdef TCPSTATES_FAMILY
    if (args->family != TCPSTATES_FAMILY)
        return 0;
#endif
    /* Filtered sockets return before touching the timestamp map (as
     * libbpf-tools does): a filtered event costs one array lookup. */
#ifdef TCPSTATES_FILTER_LPORT
    u32 lport = args->sport;
    if (!port_allowed(lport_allowed.lookup(&lport)))
        return 0;
#endif
#ifdef TCPSTATES_FILTER_DPORT
    u32 dport = args->dport;
    if (!port_allowed(dport_allowed.lookup(&dport)))
        return 0;
#endif

    u64 ts = bpf_ktime_get_ns();   /* one clock read for span, record and update */
    u64 sk = (u64)args->skaddr;
    u64 span = TCPSTATES_SPAN_UNKNOWN;
    u64 *prev = last_change.lookup(&sk);
    if (prev)
        span = ts - *prev;

    struct tcpstates_event *e;
#ifdef TCPSTATES_PERF_BUFFER
    u32 zero = 0;
    e = scratch.lookup(&zero);
    if (!e)
        return 0;
#else
    e = events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        u32 zero = 0;
        u64 *count = drops.lookup(&zero);
        if (count)
            (*count)++;
        goto update;
    }
#endif
    u64 pid_tgid = bpf_get_current_pid_tgid();
    e->ts_ns = ts;
    e->skaddr = sk;
    e->span_ns = span;
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->pid = pid_tgid >> 32;
    e->tid = (u32)pid_tgid;
    e->sport = args->sport;
    e->dport = args->dport;
    e->family = args->family;
    e->oldstate = args->oldstate;
    e->newstate = args->newstate;
    if (args->family == TCPSTATES_AF_INET) {
        __builtin_memset(e->saddr, 0, sizeof(e->saddr));
        __builtin_memset(e->daddr, 0, sizeof(e->daddr));
        bpf_probe_read_kernel(e->saddr, 4, args->saddr);
        bpf_probe_read_kernel(e->daddr, 4, args->daddr);
    } else {
        bpf_probe_read_kernel(e->saddr, 16, args->saddr_v6);
        bpf_probe_read_kernel(e->daddr, 16, args->daddr_v6);
    }
    bpf_get_current_comm(e->comm, sizeof(e->comm));
#ifdef TCPSTATES_PERF_BUFFER
    if (events.perf_submit(args, e, sizeof(*e)) != 0) {
        u64 *count = drops.lookup(&zero);
        if (count)
            (*count)++;
    }
#else
    events.ringbuf_submit(e, 0);   /* 0: adaptive wake-up, see DESIGN §3 */
update:
#endif
    if (args->newstate == TCPSTATES_TCP_CLOSE)
        last_change.delete(&sk);
    else
        last_change.update(&sk, &ts);
    return 0;
}
