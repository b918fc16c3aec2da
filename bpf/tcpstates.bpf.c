/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/* tcpstates.bpf.c - the kernel stage: one record per TCP state change.
 *
 * bcc dialect. Reads nothing but the fields of the sock:inet_sock_set_state
 * tracepoint and BPF helpers, so the header tree it is compiled against need
 * not match the running kernel (no kernel struct layouts from headers: the
 * few kernel members read — by the raw-tracepoint form for the tracepoint's
 * own fields, by the owner probes and for a connection's sk_err — are at
 * offsets taken from the running kernel's BTF, passed as -D flags).
 *
 * Licence: GPL-2.0-only OR Apache-2.0 (LICENSES/GPL-2.0-only.txt, LICENSE).
 * bcc loads it declaring "GPL", which the kernel requires for the helpers
 * used here (bpf_probe_read_kernel); the Python code is Apache-2.0.
 *
 * Compile-time switches (-D cflags built by plugins/kernel/probe.py build_cflags):
 *   TCPSTATES_PERF_BUFFER     use a perf buffer instead of a BPF ring buffer
 *                             (kernels older than 5.8)
 *   TCPSTATES_RINGBUF_PAGES   ring buffer size in pages (power of two)
 *   TCPSTATES_MAX_SOCKETS     entries of the per-socket LRU timestamp map
 *   TCPSTATES_FILTER_LPORT    consult the lport_allowed map (with
 *                             TCPSTATES_CONNECTIONS a connect's CLOSE->SYN_SENT,
 *                             local port 0, is judged by its next change)
 *   TCPSTATES_FILTER_DPORT    consult the dport_allowed map
 *   TCPSTATES_FAMILY          AF_INET or AF_INET6 to keep only that family
 *   TCPSTATES_FILTER_TRANSITION  consult the transition_allowed map
 *   TCPSTATES_MIN_SPAN_NS     drop events whose known time in the old state is shorter
 *   TCPSTATES_FILTER_SPAN     consult span_range: per old state, the [lo, hi] ns a
 *                             known time in it must lie in (pushdown.py span_plan)
 *   TCPSTATES_NCPUS           entries of cpu_state (possible CPUs)
 *   TCPSTATES_WAKEUP_FLAGS    ring submit flags: 0 adaptive wake-ups, 1
 *                             (BPF_RB_NO_WAKEUP) when the reader polls on a timer
 *   TCPSTATES_CONNECTIONS     connection records: accumulate per socket (conns
 *                             map) and emit one struct tcpstates_conn_event when
 *                             it closes, nothing per state change (the
 *                             transition and duration filters are not used)
 *   TCPSTATES_OFF_SOCK_SK_ERR  (with TCPSTATES_CONNECTIONS) sock.sk_err's byte
 *                             offset from the running kernel's BTF: a record
 *                             carries the error the socket ended with; with
 *   TCPSTATES_OFF_TCP_SOCK_SEGS_OUT  tcp_sock.segs_out's: whether it sent anything
 *   TCPSTATES_OFF_SOCK_SK_FLAGS  (optional with them) sock.sk_flags': whether a
 *                             FIN_WAIT2->CLOSE was an abort by its own side
 *   TCPSTATES_OFF_TCP_SOCK_LINGER2  (optional with that) tcp_sock.linger2's:
 *                             whether an orphan's FIN_WAIT2->CLOSE was an abort
 *   TCPSTATES_FILTER_LADDR / _RADDR  consult the laddr_rules / raddr_rules LPM
 *                             tries (value: their entry count), with the rule masks
 *                             TCPSTATES_ADDR_{LKEEP,RKEEP,LDROP,RDROP,DROP}
 *   TCPSTATES_FILTER_PROC     consult pid_rules (hash) / comm_rules (LPM trie: names
 *                             and prefix globs) (value: entries), with
 *                             the masks TCPSTATES_PROC_{PKEEP,CKEEP,PDROP,CDROP,DROP}
 *                             (address and process rules: plugins/kernel/pushdown.py)
 *   TCPSTATES_AGGREGATES      fold every kept state change into in-kernel
 *                             histograms and counters (bpf/aggregates.bpf.h);
 *                             not with TCPSTATES_CONNECTIONS
 *   TCPSTATES_NO_EVENTS       (with TCPSTATES_AGGREGATES) no consumer needs the
 *                             records: aggregate and return, nothing reserved
 *   TCPSTATES_SEPARATE_READS  read each kernel member on its own, never several
 *                             neighbours in one read (what a kernel whose layout
 *                             parts them gets; set by the tests only)
 *   TCPSTATES_STATE_RAW       attach as a raw tracepoint (the kernel calls the
 *                             program without filling a perf-event record, and
 *                             only its own nesting on a CPU can make it skip a
 *                             hit, not every other tracing program's), reading
 *                             the tracepoint's fields from the socket at the
 *                             running kernel's BTF offsets, all required:
 *                             TCPSTATES_OFF_SOCK_{SK_PROTOCOL,SKC_FAMILY,SKC_DPORT,
 *                             SKC_DADDR,SKC_V6_DADDR,SKC_V6_RCV_SADDR},
 *                             TCPSTATES_OFF_INET_SOCK_{SPORT,SADDR}
 *                             (plugins/kernel/attach.py); adds the rescue program
 *                             (tcpstates_rescue) and a second per-CPU slot
 * Fault injection, set only by the tests (environment variables read in
 * plugins/kernel/probe.py, never by a configuration):
 *   TCPSTATES_TEST_LOSE_EVERY  every Nth hit vanishes unseen
 *   TCPSTATES_TEST_REUSE       every checked LRU node looks reused by another socket
 *   TCPSTATES_TEST_SKIP_CLOSE_PORT  a connection's ->CLOSE whose local or remote
 *                             port is this one vanishes unseen (the only way to
 *                             make the kernel's rare lost ->CLOSE happen on demand)
 *   TCPSTATES_TEST_NEST_PORT  (raw form) the main program acts as if the kernel had
 *                             skipped it for this port's changes and the rescue
 *                             takes them (nesting cannot be had on demand)
 * The port sets themselves live in maps filled from Python after load, so the
 * C text never changes with the user's ports.
 */
#include "tcpstates.h"

#ifndef TCPSTATES_RINGBUF_PAGES
#define TCPSTATES_RINGBUF_PAGES 2048
#endif
#ifndef TCPSTATES_WAKEUP_FLAGS
#define TCPSTATES_WAKEUP_FLAGS 0
#endif
#ifndef TCPSTATES_NCPUS
#define TCPSTATES_NCPUS 128
#endif
#ifndef TCPSTATES_MAX_SOCKETS
#define TCPSTATES_MAX_SOCKETS 65536
#endif
/* Per-CPU slots of everything a run writes outside the stack (cpu_state, agg,
 * the staging entries): the raw form has two programs on the tracepoint, the
 * main one (slot 0) and the rescue (slot 1), which runs only while the main
 * one is interrupted on its CPU, so the two never share a slot. */
#ifdef TCPSTATES_STATE_RAW
#define TCPSTATES_SLOTS 2
#else
#define TCPSTATES_SLOTS 1
#endif

#define TCPSTATES_IPPROTO_TCP 6
#define TCPSTATES_AF_INET 2
#define TCPSTATES_AF_INET6 10
#define TCPSTATES_TCP_CLOSE 7
#define TCPSTATES_TCP_FIN_WAIT2 5
#define TCPSTATES_TCP_SYN_SENT 2
#define TCPSTATES_TCP_SYN_RECV 3
#define TCPSTATES_TCP_LISTEN 10

/* Every value of an LRU map keyed by socket carries its key (`sk`). The
 * kernel hands a node freed by an update, a delete or an eviction straight
 * back to a free list (no RCU grace period), so another CPU's update can
 * reuse it for another socket while a pointer lookup() returned is still
 * held here. A reader checks the key after reading what it needs
 * (TCPSTATES_SAME_SK, behind a compiler barrier so the check is not moved
 * before the reads) and treats another key as "not found": unknown, never
 * another socket's data. */
#ifdef TCPSTATES_TEST_REUSE
/* fault injection for the tests only: every node checked was reused for
 * another socket between the reads and the check */
#define TCPSTATES_REUSED_NOW(v) ((v)->sk ^= 1)
#else
#define TCPSTATES_REUSED_NOW(v) 0
#endif
#define TCPSTATES_SAME_SK(v, key) ({ TCPSTATES_REUSED_NOW(v); asm volatile("" ::: "memory"); (v)->sk == (key); })
struct tcpstates_sk_ts {
    u64 sk;
    u64 ts;
};

/* the owner map and probes (-DTCPSTATES_OWNER); otherwise zeroes owner fields */
#include "owner.bpf.h"
/* in-kernel histograms (-DTCPSTATES_AGGREGATES); otherwise nothing */
#include "aggregates.bpf.h"

/* ns timestamp of each live socket's last transition. LRU, so a full map
 * evicts the oldest socket instead of silently refusing new ones. */
BPF_TABLE("lru_hash", u64, struct tcpstates_sk_ts, last_change, TCPSTATES_MAX_SOCKETS);

/* Per-CPU counters and the in-flight marker (struct tcpstates_cpu), indexed
 * by CPU number + slot * TCPSTATES_NCPUS; BPF_F_MMAPABLE (1 << 10) so user
 * space reads it from memory. */
BPF_F_TABLE("array", u32, struct tcpstates_cpu, cpu_state, TCPSTATES_NCPUS * TCPSTATES_SLOTS, (1U << 10));

#ifdef TCPSTATES_CONNECTIONS
/* What a live connection has accumulated so far (connection-record mode). */
struct tcpstates_conn {
    u64 sk;               /* its key (TCPSTATES_SAME_SK) */
    u64 start_ns;
    u64 last_ns;
    u64 cgroup_id;
    u32 pid;
    u32 tid;
    char comm[16];
    u64 state_ns[TCPSTATES_NSTATES];
    u8 first_state;
    u8 complete;
    u8 last_state;        /* the state its last transition seen entered */
    u8 pad;
    /* endpoints as last seen (the active opener's port is bound after
     * CLOSE->SYN_SENT): a record for it can be made without its ->CLOSE */
    u16 sport;
    u16 dport;
    u16 family;
    u8 pad2[6];
    u8 saddr[16];
    u8 daddr[16];
};
/* LRU for the same reason as last_change; sized by the same switch */
BPF_TABLE("lru_hash", u64, struct tcpstates_conn, conns, TCPSTATES_MAX_SOCKETS);
/* staging of a new entry (too big for the stack next to the record); a
 * program never runs nested on one CPU (the kernel skips and counts such
 * runs) and the rescue has its own slot, so nothing is overwritten under us */
BPF_PERCPU_ARRAY(conn_scratch, struct tcpstates_conn, TCPSTATES_SLOTS);
/* staging of an unclosed connection's record when the ring refuses it (the
 * stack has no room for a second record beside the closing path's) */
BPF_PERCPU_ARRAY(conn_stage, struct tcpstates_conn_event, TCPSTATES_SLOTS);
#endif

#ifdef TCPSTATES_FILTER_LPORT
BPF_ARRAY(lport_allowed, u8, 65536);
#endif
#ifdef TCPSTATES_FILTER_DPORT
BPF_ARRAY(dport_allowed, u8, 65536);
#endif
#ifdef TCPSTATES_FILTER_TRANSITION
/* key (oldstate << 4) | newstate: 1 keeps that transition */
BPF_ARRAY(transition_allowed, u8, 256);
#endif
#ifdef TCPSTATES_FILTER_SPAN
struct tcpstates_span_range {
    u64 lo;
    u64 hi;
};
/* key: the old state (0..15), every entry filled from Python after load */
BPF_ARRAY(span_range, struct tcpstates_span_range, 16);
#endif

/* Address and process rules (pushdown.py): each map value has bit i set when
 * the entry matches rule i; the event passes when every keep rule finds its
 * bits and no drop rule finds all of its own. */
static __always_inline int rules_pass(u32 a, u32 b, u32 akeep, u32 bkeep,
                                      u32 adrop, u32 bdrop, u32 drop)
{
    if ((a & akeep) != akeep || (b & bkeep) != bkeep)
        return 0;
    return ((a | ~adrop) & (b | ~bdrop) & drop) == 0;
}
#if defined(TCPSTATES_FILTER_LADDR) || defined(TCPSTATES_FILTER_RADDR)
#ifndef TCPSTATES_ADDR_LKEEP
#define TCPSTATES_ADDR_LKEEP 0
#endif
#ifndef TCPSTATES_ADDR_RKEEP
#define TCPSTATES_ADDR_RKEEP 0
#endif
#ifndef TCPSTATES_ADDR_LDROP
#define TCPSTATES_ADDR_LDROP 0
#endif
#ifndef TCPSTATES_ADDR_RDROP
#define TCPSTATES_ADDR_RDROP 0
#endif
#ifndef TCPSTATES_ADDR_DROP
#define TCPSTATES_ADDR_DROP 0
#endif
/* prefix length counts the tag's 32 bits: IPv4 and IPv6 networks never mix */
struct tcpstates_lpm_key {
    u32 prefixlen;
    u32 tag;          /* 4 or 6 */
    u8 addr[16];
};
#endif
/* Copying an address out of the tracepoint's fields: the raw form keeps them in
 * its own map value (state_args), which the program reads directly; the
 * perf-event form's are in the tracepoint record, read with the helper. */
#ifdef TCPSTATES_STATE_RAW
#define TCPSTATES_ARGS_COPY(dst, src, n) __builtin_memcpy((dst), (src), (n))
#else
#define TCPSTATES_ARGS_COPY(dst, src, n) bpf_probe_read_kernel((dst), (n), (src))
#endif
/* The key of one tracepoint address (a macro: the args struct has no name yet). */
#define LPM_KEY(k, args, a4, a6) do {                                    \
    (k)->prefixlen = 160;                                                \
    if ((args)->family == TCPSTATES_AF_INET) {                           \
        (k)->tag = 4;                                                    \
        TCPSTATES_ARGS_COPY((k)->addr, (args)->a4, 4);                   \
    } else {                                                             \
        (k)->tag = 6;                                                    \
        TCPSTATES_ARGS_COPY((k)->addr, (args)->a6, 16);                  \
    }                                                                    \
} while (0)
#if defined(TCPSTATES_FILTER_LADDR) || defined(TCPSTATES_FILTER_RADDR)
/* An IPv4-mapped IPv6 key (::ffff:a.b.c.d) turned into its IPv4 key: the
 * user-space filter matches such an address against both kinds of networks. */
static __always_inline int lpm_key_to_v4(struct tcpstates_lpm_key *k)
{
    if (k->tag != 6 || *(u64 *)k->addr != 0 || k->addr[8] || k->addr[9] ||
        k->addr[10] != 0xff || k->addr[11] != 0xff)
        return 0;
    k->tag = 4;
    __builtin_memcpy(k->addr, &k->addr[12], 4);
    __builtin_memset(&k->addr[4], 0, 12);
    return 1;
}
#endif
/* Two copies, one per trie, on purpose: bcc cannot rewrite a map method
 * inside a macro, and a map is not a value a function can take. */
#ifdef TCPSTATES_FILTER_LADDR
BPF_LPM_TRIE(laddr_rules, struct tcpstates_lpm_key, u8, TCPSTATES_FILTER_LADDR);
static __always_inline u32 laddr_bits(struct tcpstates_lpm_key *k)
{
    u8 *v = laddr_rules.lookup(k);
    u32 out = v ? *v : 0;
    if (lpm_key_to_v4(k)) {
        v = laddr_rules.lookup(k);
        out |= v ? *v : 0;
    }
    return out;
}
#endif
#ifdef TCPSTATES_FILTER_RADDR
BPF_LPM_TRIE(raddr_rules, struct tcpstates_lpm_key, u8, TCPSTATES_FILTER_RADDR);
static __always_inline u32 raddr_bits(struct tcpstates_lpm_key *k)
{
    u8 *v = raddr_rules.lookup(k);
    u32 out = v ? *v : 0;
    if (lpm_key_to_v4(k)) {
        v = raddr_rules.lookup(k);
        out |= v ? *v : 0;
    }
    return out;
}
#endif
#ifdef TCPSTATES_FILTER_PROC
#ifndef TCPSTATES_PROC_PKEEP
#define TCPSTATES_PROC_PKEEP 0
#endif
#ifndef TCPSTATES_PROC_CKEEP
#define TCPSTATES_PROC_CKEEP 0
#endif
#ifndef TCPSTATES_PROC_PDROP
#define TCPSTATES_PROC_PDROP 0
#endif
#ifndef TCPSTATES_PROC_CDROP
#define TCPSTATES_PROC_CDROP 0
#endif
#ifndef TCPSTATES_PROC_DROP
#define TCPSTATES_PROC_DROP 0
#endif
/* a whole command name is an entry with its NUL (prefixlen 8 * (length + 1)),
 * a prefix glob (`nginx*`) one of its bytes only; looked up with all 128 bits */
struct tcpstates_comm_key {
    u32 prefixlen;
    char comm[16];
};
BPF_HASH(pid_rules, u32, u8, TCPSTATES_FILTER_PROC);
BPF_LPM_TRIE(comm_rules, struct tcpstates_comm_key, u8, TCPSTATES_FILTER_PROC);
#endif

#ifdef TCPSTATES_PERF_BUFFER
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, TCPSTATES_RINGBUF_PAGES);
/* The shared ring can refuse a reservation even when it has room (its lock
 * is contended across CPUs; since Linux 6.15 it is a resilient spinlock that
 * gives up instead of waiting). Such records go to this per-CPU perf buffer
 * instead, so they are late, never lost. */
BPF_PERF_OUTPUT(spill);
#endif
/* A filter that drops an event after the record was reserved gives the
 * reservation back. In perf-buffer mode nothing is reserved before the
 * filters (the record is built on the stack after them): nothing to give
 * back, and a perf output map has no ringbuf_discard to compile. */
static __always_inline void discard_reserved(void *e)
{
#ifndef TCPSTATES_PERF_BUFFER
    if (e)
        events.ringbuf_discard(e, BPF_RB_NO_WAKEUP);
#endif
}

static __always_inline int port_allowed(void *map_lookup_result)
{
    u8 *allowed = map_lookup_result;
    return allowed && *allowed;
}

/* A macro, not a function: the tracepoint's args struct is generated by bcc
 * together with the probe and cannot be named before it. */
#define FILL_EVENT(e, args, ts, sk, span) do {                          \
    u64 pid_tgid = bpf_get_current_pid_tgid();                          \
    (e)->ts_ns = (ts);                                                   \
    (e)->skaddr = (sk);                                                  \
    (e)->span_ns = (span);                                               \
    (e)->cgroup_id = bpf_get_current_cgroup_id();                        \
    (e)->pid = pid_tgid >> 32;                                           \
    (e)->tid = (u32)pid_tgid;                                            \
    (e)->sport = (args)->sport;                                          \
    (e)->dport = (args)->dport;                                          \
    (e)->family = (args)->family;                                        \
    (e)->oldstate = (args)->oldstate;                                    \
    (e)->newstate = (args)->newstate;                                    \
    if ((args)->family == TCPSTATES_AF_INET) {                           \
        __builtin_memset((e)->saddr, 0, sizeof((e)->saddr));             \
        __builtin_memset((e)->daddr, 0, sizeof((e)->daddr));             \
        TCPSTATES_ARGS_COPY((e)->saddr, (args)->saddr, 4);               \
        TCPSTATES_ARGS_COPY((e)->daddr, (args)->daddr, 4);               \
    } else {                                                             \
        TCPSTATES_ARGS_COPY((e)->saddr, (args)->saddr_v6, 16);           \
        TCPSTATES_ARGS_COPY((e)->daddr, (args)->daddr_v6, 16);           \
    }                                                                    \
    bpf_get_current_comm((e)->comm, sizeof((e)->comm));                  \
    TCPSTATES_OWNER_FILL(e, args, sk);                                   \
} while (0)

/* The endpoints of the tracepoint's args into x (an entry or an event). */
#define FILL_ENDPOINTS(x, args) do {                                     \
    (x)->sport = (args)->sport;                                          \
    (x)->dport = (args)->dport;                                          \
    (x)->family = (args)->family;                                        \
    if ((args)->family == TCPSTATES_AF_INET) {                           \
        __builtin_memset((x)->saddr, 0, sizeof((x)->saddr));             \
        __builtin_memset((x)->daddr, 0, sizeof((x)->daddr));             \
        TCPSTATES_ARGS_COPY((x)->saddr, (args)->saddr, 4);               \
        TCPSTATES_ARGS_COPY((x)->daddr, (args)->daddr, 4);               \
    } else {                                                             \
        TCPSTATES_ARGS_COPY((x)->saddr, (args)->saddr_v6, 16);           \
        TCPSTATES_ARGS_COPY((x)->daddr, (args)->daddr_v6, 16);           \
    }                                                                    \
} while (0)

/* The record of an earlier connection at sk whose ->CLOSE the program never
 * ran for, from its entry cn alone (args belong to the new connection): when
 * it closed is unknown, ts is when that became known. */
#define FILL_UNCLOSED(r, ts, sk, cn) do {                                \
    (r)->ev.ts_ns = (ts);                                                \
    (r)->ev.skaddr = (sk);                                               \
    (r)->ev.span_ns = TCPSTATES_SPAN_UNKNOWN;                            \
    (r)->ev.cgroup_id = (cn)->cgroup_id;                                 \
    (r)->ev.pid = (cn)->pid;                                             \
    (r)->ev.tid = (cn)->tid;                                             \
    (r)->ev.sport = (cn)->sport;                                         \
    (r)->ev.dport = (cn)->dport;                                         \
    (r)->ev.family = (cn)->family;                                       \
    (r)->ev.oldstate = (cn)->last_state;                                 \
    (r)->ev.newstate = TCPSTATES_TCP_CLOSE;                              \
    __builtin_memcpy((r)->ev.saddr, (cn)->saddr, sizeof((r)->ev.saddr)); \
    __builtin_memcpy((r)->ev.daddr, (cn)->daddr, sizeof((r)->ev.daddr)); \
    __builtin_memcpy((r)->ev.comm, (cn)->comm, sizeof((r)->ev.comm));    \
    TCPSTATES_OWNER_ZERO(&(r)->ev);                                      \
    (r)->start_ns = (cn)->start_ns;                                      \
    (r)->last_ns = (cn)->last_ns;                                        \
    __builtin_memcpy((r)->state_ns, (cn)->state_ns, sizeof((r)->state_ns)); \
    (r)->first_state = (cn)->first_state;                                \
    (r)->complete = (cn)->complete;                                      \
    (r)->closed = 0;                                                     \
    (r)->error_flags = 0;                                                \
    (r)->error = 0;                                                      \
} while (0)

/* The socket's error at its ->CLOSE (sk_err, at the running kernel's offset
 * from BTF): the kernel stores it before it moves a socket to CLOSE for a RST
 * (ECONNREFUSED in SYN_SENT, ECONNRESET, EPIPE), a timeout (ETIMEDOUT, or the
 * ICMP error seen meanwhile) or an ICMP error to a connect; a close by its
 * own process leaves it 0. Without the offset the record says "not read". */
#ifdef TCPSTATES_OFF_SOCK_SK_ERR
/* A FIN_WAIT2->CLOSE is orderly when the peer's FIN came (tcp_fin sets
 * SOCK_DONE first) or when the socket's close orphaned it into a FIN_WAIT2
 * timewait (sock_orphan sets SOCK_DEAD first); with neither, its own side
 * aborted it (SO_LINGER 0, a close with unread data: a RST sent, sk_err
 * left 0). An orphan with TCP_LINGER2 < 0 (tcp_sock.linger2 -1) gets no
 * timewait: the kernel aborts it (a RST sent), at its close in FIN_WAIT2 or
 * when the ACK of its FIN moves it there. enum sock_flags has begun
 * SOCK_DEAD, SOCK_DONE since Linux 2.6; sock.sk_flags (__sk_common.skc_flags
 * on newer kernels) and tcp_sock.linger2 are read at their BTF offsets;
 * without the flags (-DTCPSTATES_OFF_SOCK_SK_FLAGS) such an abort stays
 * "normal", without linger2 (-DTCPSTATES_OFF_TCP_SOCK_LINGER2) an orphan's.
 * Still "normal": an orphan aborted for too many orphans or for data after
 * its close (rare; nothing at the tracepoint tells them from a timewait). */
#ifdef TCPSTATES_OFF_SOCK_SK_FLAGS
#define TCPSTATES_SOCK_DEAD 1ULL
#define TCPSTATES_SOCK_DONE 2ULL
#ifdef TCPSTATES_OFF_TCP_SOCK_LINGER2
#define CONN_LINGER2(sk, linger2_)                                       \
    bpf_probe_read_kernel(&(linger2_), sizeof(linger2_),                 \
        (void *)(sk) + TCPSTATES_OFF_TCP_SOCK_LINGER2)
#else
#define CONN_LINGER2(sk, linger2_) do { } while (0)
#endif
#define CONN_ABORTED(r, sk) do {                                         \
    if ((r)->ev.oldstate == TCPSTATES_TCP_FIN_WAIT2) {                   \
        u64 flags_ = TCPSTATES_SOCK_DONE | TCPSTATES_SOCK_DEAD;          \
        int linger2_ = 0;                                                \
        bpf_probe_read_kernel(&flags_, sizeof(flags_),                   \
            (void *)(sk) + TCPSTATES_OFF_SOCK_SK_FLAGS);                 \
        CONN_LINGER2(sk, linger2_);                                      \
        if (!(flags_ & TCPSTATES_SOCK_DONE) &&                           \
                (!(flags_ & TCPSTATES_SOCK_DEAD) || linger2_ < 0))       \
            (r)->error_flags |= TCPSTATES_ERROR_ABORTED;                 \
    }                                                                    \
} while (0)
#else
#define CONN_ABORTED(r, sk) do { } while (0)
#endif
/* With it, whether the socket ever sent a segment (tcp_sock.segs_out): a
 * SYN_SENT->CLOSE with no error and nothing sent is a connect that failed
 * inside connect() (no free local port: EADDRNOTAVAIL, or its route gone),
 * the errno returned to the caller alone; one whose SYN left and that its
 * own process closed has sent at least that SYN. */
#define CONN_ERROR(r, sk) do {                                           \
    int err_ = 0;                                                        \
    u32 segs_ = 1;                                                       \
    (r)->error_flags = bpf_probe_read_kernel(&err_, sizeof(err_),        \
        (void *)(sk) + TCPSTATES_OFF_SOCK_SK_ERR) == 0 ? TCPSTATES_ERROR_READ : 0; \
    if (bpf_probe_read_kernel(&segs_, sizeof(segs_),                     \
            (void *)(sk) + TCPSTATES_OFF_TCP_SOCK_SEGS_OUT) == 0 && segs_ == 0) \
        (r)->error_flags |= TCPSTATES_ERROR_UNSENT;                      \
    CONN_ABORTED(r, sk);                                                 \
    (r)->error = err_;                                                   \
} while (0)
#else
#define CONN_ERROR(r, sk) do { (r)->error_flags = 0; (r)->error = 0; } while (0)
#endif

/* A connection record from the socket's accumulated entry cn: the task is
 * the one at its first sight (kept in cn), so none of the current task's
 * helpers (pid, cgroup, comm) is called here, twice per connection. */
#define FILL_CONN(r, args, ts, sk, span, cn) do {                        \
    (r)->ev.ts_ns = (ts);                                                \
    (r)->ev.skaddr = (sk);                                               \
    (r)->ev.span_ns = (span);                                            \
    (r)->ev.pid = (cn)->pid;                                             \
    (r)->ev.tid = (cn)->tid;                                             \
    (r)->ev.cgroup_id = (cn)->cgroup_id;                                 \
    (r)->ev.oldstate = (args)->oldstate;                                 \
    (r)->ev.newstate = (args)->newstate;                                 \
    FILL_ENDPOINTS(&(r)->ev, args);                                      \
    __builtin_memcpy((r)->ev.comm, (cn)->comm, sizeof((r)->ev.comm));    \
    TCPSTATES_OWNER_FILL(&(r)->ev, args, sk);                            \
    (r)->start_ns = (cn)->start_ns;                                      \
    (r)->last_ns = (ts);                                                 \
    __builtin_memcpy((r)->state_ns, (cn)->state_ns, sizeof((r)->state_ns)); \
    (r)->first_state = (cn)->first_state;                                \
    (r)->complete = (cn)->complete;                                      \
    (r)->closed = 1;                                                     \
    CONN_ERROR(r, sk);                                                   \
} while (0)

#ifdef TCPSTATES_STATE_RAW
/* The fields of the tracepoint's record, under the names bcc gives them, so
 * the program below reads `args->x` in either attachment. */
struct tcpstates_state_args {
    const void *skaddr;
    int oldstate;
    int newstate;
    u16 sport;
    u16 dport;
    u16 family;
    u16 protocol;
    u8 saddr[4];
    u8 daddr[4];
    u8 saddr_v6[16];
    u8 daddr_v6[16];
};

#define READ_ONCE_U64(x) (*(volatile u64 *)&(x))
#define WRITE_ONCE_U64(x, v) (*(volatile u64 *)&(x) = (v))

/* where a run keeps them: per CPU and program slot (the stack of the
 * connection-record path has no room for them) */
BPF_PERCPU_ARRAY(state_args, struct tcpstates_state_args, TCPSTATES_SLOTS);

static __always_inline u16 tcpstates_ntohs(u16 x)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap16(x);
#else
    return x;
#endif
}

/* Where members the program reads lie together in the socket, one read takes
 * them all: a bpf_probe_read_kernel costs ~30 ns here whatever its size up to
 * a few dozen bytes (bench/README.md, "State-change program"), and the state
 * change is the hottest path. Whether they lie together is known at compile
 * time from their BTF offsets (-D flags); where they do not, each is read on
 * its own. */
#define TCPSTATES_MIN(a, b) ((a) < (b) ? (a) : (b))
#define TCPSTATES_MAX(a, b) ((a) > (b) ? (a) : (b))
#define TCPSTATES_SPAN_BUF 32
#ifdef TCPSTATES_SEPARATE_READS
#define TCPSTATES_SPAN_MAX 0     /* each member on its own (the tests' switch for the other layout) */
#else
#define TCPSTATES_SPAN_MAX TCPSTATES_SPAN_BUF
#endif
/* sock_common's head: skc_daddr, skc_dport, skc_family */
#define TCPSTATES_HEAD_LO TCPSTATES_MIN(TCPSTATES_OFF_SOCK_SKC_DADDR, \
    TCPSTATES_MIN(TCPSTATES_OFF_SOCK_SKC_DPORT, TCPSTATES_OFF_SOCK_SKC_FAMILY))
#define TCPSTATES_HEAD_HI TCPSTATES_MAX(TCPSTATES_OFF_SOCK_SKC_DADDR + 4, \
    TCPSTATES_MAX(TCPSTATES_OFF_SOCK_SKC_DPORT + 2, TCPSTATES_OFF_SOCK_SKC_FAMILY + 2))
/* inet_sock's inet_saddr and inet_sport */
#define TCPSTATES_INET_LO TCPSTATES_MIN(TCPSTATES_OFF_INET_SOCK_SADDR, TCPSTATES_OFF_INET_SOCK_SPORT)
#define TCPSTATES_INET_HI TCPSTATES_MAX(TCPSTATES_OFF_INET_SOCK_SADDR + 4, TCPSTATES_OFF_INET_SOCK_SPORT + 2)
/* the two IPv6 addresses */
#define TCPSTATES_V6_LO TCPSTATES_MIN(TCPSTATES_OFF_SOCK_SKC_V6_DADDR, TCPSTATES_OFF_SOCK_SKC_V6_RCV_SADDR)
#define TCPSTATES_V6_HI (TCPSTATES_MAX(TCPSTATES_OFF_SOCK_SKC_V6_DADDR, TCPSTATES_OFF_SOCK_SKC_V6_RCV_SADDR) + 16)

/* Member `off` (n bytes) of a span read from the socket at `lo` into buf
 * (u64-aligned, so a member's own alignment holds for the compiler). */
#define TCPSTATES_FROM_SPAN(dst, buf, lo, off, n) \
    __builtin_memcpy((dst), (char *)(buf) + ((off) - (lo)), (n))

/* What include/trace/events/sock.h's TP_fast_assign stores, read from the
 * same members: inet_sport, inet_saddr (inet_sock), skc_dport, skc_daddr,
 * the v6 addresses for AF_INET6 and the v4-mapped form otherwise. Returns 0
 * for a protocol other than TCP (nothing else is read then). A read that
 * fails leaves zeroes (as before: each buffer starts zeroed). */
static __always_inline int read_state_args(struct bpf_raw_tracepoint_args *ctx,
                                           struct tcpstates_state_args *a)
{
    const char *sk = (const char *)ctx->args[0];
    u16 protocol = 0, be_sport = 0, be_dport = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), sk + TCPSTATES_OFF_SOCK_SK_PROTOCOL);
    if (protocol != TCPSTATES_IPPROTO_TCP)
        return 0;
    a->skaddr = sk;
    a->oldstate = (int)ctx->args[1];
    a->newstate = (int)ctx->args[2];
    a->protocol = protocol;
    a->family = 0;
#if TCPSTATES_HEAD_HI - TCPSTATES_HEAD_LO <= TCPSTATES_SPAN_MAX
    {
        u64 head[TCPSTATES_SPAN_BUF / 8] = {};
        bpf_probe_read_kernel(head, TCPSTATES_HEAD_HI - TCPSTATES_HEAD_LO, sk + TCPSTATES_HEAD_LO);
        TCPSTATES_FROM_SPAN(&a->family, head, TCPSTATES_HEAD_LO, TCPSTATES_OFF_SOCK_SKC_FAMILY, 2);
        TCPSTATES_FROM_SPAN(&be_dport, head, TCPSTATES_HEAD_LO, TCPSTATES_OFF_SOCK_SKC_DPORT, 2);
        TCPSTATES_FROM_SPAN(a->daddr, head, TCPSTATES_HEAD_LO, TCPSTATES_OFF_SOCK_SKC_DADDR, 4);
    }
#else
    bpf_probe_read_kernel(&a->family, sizeof(a->family), sk + TCPSTATES_OFF_SOCK_SKC_FAMILY);
    bpf_probe_read_kernel(&be_dport, sizeof(be_dport), sk + TCPSTATES_OFF_SOCK_SKC_DPORT);
    if (bpf_probe_read_kernel(a->daddr, 4, sk + TCPSTATES_OFF_SOCK_SKC_DADDR))
        __builtin_memset(a->daddr, 0, 4);
#endif
#if TCPSTATES_INET_HI - TCPSTATES_INET_LO <= TCPSTATES_SPAN_MAX
    {
        u64 inet[TCPSTATES_SPAN_BUF / 8] = {};
        bpf_probe_read_kernel(inet, TCPSTATES_INET_HI - TCPSTATES_INET_LO, sk + TCPSTATES_INET_LO);
        TCPSTATES_FROM_SPAN(&be_sport, inet, TCPSTATES_INET_LO, TCPSTATES_OFF_INET_SOCK_SPORT, 2);
        TCPSTATES_FROM_SPAN(a->saddr, inet, TCPSTATES_INET_LO, TCPSTATES_OFF_INET_SOCK_SADDR, 4);
    }
#else
    bpf_probe_read_kernel(&be_sport, sizeof(be_sport), sk + TCPSTATES_OFF_INET_SOCK_SPORT);
    if (bpf_probe_read_kernel(a->saddr, 4, sk + TCPSTATES_OFF_INET_SOCK_SADDR))
        __builtin_memset(a->saddr, 0, 4);
#endif
    a->sport = tcpstates_ntohs(be_sport);
    a->dport = tcpstates_ntohs(be_dport);
    if (a->family == TCPSTATES_AF_INET6) {
#if TCPSTATES_V6_HI - TCPSTATES_V6_LO <= TCPSTATES_SPAN_MAX
        u64 v6[TCPSTATES_SPAN_BUF / 8] = {};
        bpf_probe_read_kernel(v6, TCPSTATES_V6_HI - TCPSTATES_V6_LO, sk + TCPSTATES_V6_LO);
        TCPSTATES_FROM_SPAN(a->saddr_v6, v6, TCPSTATES_V6_LO, TCPSTATES_OFF_SOCK_SKC_V6_RCV_SADDR, 16);
        TCPSTATES_FROM_SPAN(a->daddr_v6, v6, TCPSTATES_V6_LO, TCPSTATES_OFF_SOCK_SKC_V6_DADDR, 16);
#else
        if (bpf_probe_read_kernel(a->saddr_v6, 16, sk + TCPSTATES_OFF_SOCK_SKC_V6_RCV_SADDR))
            __builtin_memset(a->saddr_v6, 0, 16);
        if (bpf_probe_read_kernel(a->daddr_v6, 16, sk + TCPSTATES_OFF_SOCK_SKC_V6_DADDR))
            __builtin_memset(a->daddr_v6, 0, 16);
#endif
    } else {
        __builtin_memset(a->saddr_v6, 0, 16);
        __builtin_memset(a->daddr_v6, 0, 16);
        a->saddr_v6[10] = a->saddr_v6[11] = a->daddr_v6[10] = a->daddr_v6[11] = 0xff;
        __builtin_memcpy(&a->saddr_v6[12], a->saddr, 4);
        __builtin_memcpy(&a->daddr_v6[12], a->daddr, 4);
    }
    return 1;
}

/* One state change, in slot 0 (the main program) or 1 (the rescue); c is
 * the slot's cpu_state row (the caller has it already). */
static __always_inline int state_change(struct bpf_raw_tracepoint_args *ctx, u32 slot,
                                        u32 cpu_slot, struct tcpstates_cpu *c)
{
    struct tcpstates_state_args *args = state_args.lookup(&slot);
    if (!args)
        return 0;
    if (!read_state_args(ctx, args)) {
        /* the kernel counted the main program's skip of this change as a
         * miss, but it was no TCP socket's: not a lost event */
        if (slot == 1)
            c->nested_other++;
        return 0;
    }
/* the program's context, which perf_submit needs (args is not the context here) */
#define TCPSTATES_TP_CTX ctx
#else
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    const u32 slot = 0;
#define TCPSTATES_TP_CTX args
#endif
    if (args->protocol != TCPSTATES_IPPROTO_TCP)
        return 0;
#ifndef TCPSTATES_STATE_RAW
    u32 cpu_slot = bpf_get_smp_processor_id();
    struct tcpstates_cpu *c = cpu_state.lookup(&cpu_slot);
    if (!c)
        return 0;   /* cannot happen (sized for every possible CPU); the
                       in-kernel cross-check would report it as unaccounted */
#endif
#ifdef TCPSTATES_TEST_NEST_PORT
    /* fault injection for the tests only: the main program acts as if the
     * kernel had skipped it (nested on its CPU) for this port's changes; the
     * rescue takes them */
    if (slot == 0 && (args->sport == TCPSTATES_TEST_NEST_PORT || args->dport == TCPSTATES_TEST_NEST_PORT))
        return 0;
#endif
#ifdef TCPSTATES_TEST_LOSE_EVERY
    /* fault injection for the tests only: vanish without a trace, like a
     * tracepoint hit the program never got to see */
    if (++c->reserved % TCPSTATES_TEST_LOSE_EVERY == 0)
        return 0;
#endif
#ifdef TCPSTATES_TEST_SKIP_CLOSE_PORT
    /* fault injection for the tests only: a connection's ->CLOSE on this port
     * vanishes as a lost tracepoint hit does (a listener's is kept) */
    if (args->newstate == TCPSTATES_TCP_CLOSE && args->oldstate != TCPSTATES_TCP_LISTEN &&
        (args->sport == TCPSTATES_TEST_SKIP_CLOSE_PORT || args->dport == TCPSTATES_TEST_SKIP_CLOSE_PORT))
        return 0;
#endif
    /* A locked add: a full barrier, so the run is marked in flight before
     * the clock is read (the reader's time-order merge relies on it). */
    __sync_fetch_and_add(&c->hits, 1);
    c->start_ns = bpf_ktime_get_ns();

    u64 sk = (u64)args->skaddr;
    u64 ts, span = TCPSTATES_SPAN_UNKNOWN;
    struct tcpstates_sk_ts *prev = NULL;
#ifndef TCPSTATES_CONNECTIONS
    struct tcpstates_event *e = NULL;
    struct tcpstates_event local;
#endif
#ifdef TCPSTATES_FILTER_LPORT
    u32 lport = args->sport;
#endif
#ifdef TCPSTATES_FILTER_DPORT
    u32 dport = args->dport;
#endif
#ifdef TCPSTATES_FILTER_TRANSITION
    u32 transition = ((u32)args->oldstate << 4) | (args->newstate & 15);
#endif

    /* Filtered sockets return before touching the timestamp map (as
     * libbpf-tools does): a filtered event costs an array lookup or two. */
#ifdef TCPSTATES_FAMILY
    if (args->family != TCPSTATES_FAMILY)
        goto filtered;
#endif
#if defined(TCPSTATES_FILTER_LPORT) && !defined(TCPSTATES_CONNECTIONS)
    if (!port_allowed(lport_allowed.lookup(&lport)))
        goto filtered;
#endif
#ifdef TCPSTATES_FILTER_DPORT
    if (!port_allowed(dport_allowed.lookup(&dport)))
        goto filtered;
#endif
#if (defined(TCPSTATES_FILTER_LADDR) || defined(TCPSTATES_FILTER_RADDR)) && !defined(TCPSTATES_CONNECTIONS)
    {
        /* a socket's addresses do not change once it is connected or bound
         * (as its ports): dropped like them, before the timestamp map */
        u32 lbits = 0, rbits = 0;
        struct tcpstates_lpm_key ak = {};
#ifdef TCPSTATES_FILTER_LADDR
        LPM_KEY(&ak, args, saddr, saddr_v6);
        lbits = laddr_bits(&ak);
#endif
#ifdef TCPSTATES_FILTER_RADDR
        __builtin_memset(&ak, 0, sizeof(ak));
        LPM_KEY(&ak, args, daddr, daddr_v6);
        rbits = raddr_bits(&ak);
#endif
        if (!rules_pass(lbits, rbits, TCPSTATES_ADDR_LKEEP, TCPSTATES_ADDR_RKEEP,
                        TCPSTATES_ADDR_LDROP, TCPSTATES_ADDR_RDROP, TCPSTATES_ADDR_DROP))
            goto filtered;
    }
#endif

#ifdef TCPSTATES_CONNECTIONS
    goto connection;
#else
#ifdef TCPSTATES_FILTER_PROC
    {
        /* the on-CPU process changes between a socket's transitions (softirq,
         * another thread): a dropped event still moves the socket's clock,
         * so a kept later one gets its true time in the old state */
        u32 pbits = 0, cbits = 0;
        if (TCPSTATES_PROC_PKEEP | TCPSTATES_PROC_PDROP) {
            u32 tgid = bpf_get_current_pid_tgid() >> 32;
            u8 *v = pid_rules.lookup(&tgid);
            pbits = v ? *v : 0;
        }
        if (TCPSTATES_PROC_CKEEP | TCPSTATES_PROC_CDROP) {
            struct tcpstates_comm_key ck = {.prefixlen = 8 * sizeof(ck.comm)};
            bpf_get_current_comm(ck.comm, sizeof(ck.comm));
            u8 *v = comm_rules.lookup(&ck);
            cbits = v ? *v : 0;
        }
        if (!rules_pass(pbits, cbits, TCPSTATES_PROC_PKEEP, TCPSTATES_PROC_CKEEP,
                        TCPSTATES_PROC_PDROP, TCPSTATES_PROC_CDROP, TCPSTATES_PROC_DROP))
            goto filtered_clock;
    }
#endif
#ifdef TCPSTATES_FILTER_TRANSITION
    /* decided before a record is reserved: a reserved and discarded record
     * costs the ring and the reader as much as a kept one (a state filter
     * that keeps only failures drops nearly every event); the socket's
     * clock still moves */
    if (!port_allowed(transition_allowed.lookup(&transition)))
        goto filtered_clock;
#endif
#if !defined(TCPSTATES_PERF_BUFFER) && !defined(TCPSTATES_NO_EVENTS)
    e = events.ringbuf_reserve(sizeof(*e));
#endif
    /* The clock is read after the reservation: a record's timestamp is then
     * later than its ring position was taken, which the reader's merge uses. */
    ts = bpf_ktime_get_ns();
    prev = last_change.lookup(&sk);
    if (prev) {
        span = ts - prev->ts;
        if (!TCPSTATES_SAME_SK(prev, sk)) {
            prev = NULL;
            span = TCPSTATES_SPAN_UNKNOWN;
        }
    }
#ifdef TCPSTATES_MIN_SPAN_NS
    /* duration filter: an unknown span passes (user space decides) */
    if (prev && span < TCPSTATES_MIN_SPAN_NS) {
        discard_reserved(e);
        goto filtered_update;
    }
#endif
#ifdef TCPSTATES_FILTER_SPAN
    /* duration filter per old state: an unknown span passes (user space decides) */
    if (prev) {
        u32 olds = args->oldstate & 15;
        struct tcpstates_span_range *range = span_range.lookup(&olds);
        if (range && (span < range->lo || span > range->hi)) {
            discard_reserved(e);
            goto filtered_update;
        }
    }
#endif
    /* every in-kernel filter has passed: what a sink would be handed */
    TCPSTATES_AGGREGATE(args, ts, sk, span, prev != NULL, cpu_slot);
#ifdef TCPSTATES_NO_EVENTS
    goto update;          /* nobody reads records: none is reserved or sent */
#endif

#ifndef TCPSTATES_PERF_BUFFER
    if (e) {
        FILL_EVENT(e, args, ts, sk, span);
        /* Waking the reader costs the traced workload more than anything
         * else here; with NO_WAKEUP the reader polls on a short timer. */
        events.ringbuf_submit(e, TCPSTATES_WAKEUP_FLAGS);
        c->ringed++;
    } else {
        /* The ring refused (full, or its resilient lock gave up): the spill
         * perf buffer takes it. Staged on this run's own stack, never in a
         * shared per-CPU slot. A failure here is counted, never silent. */
        FILL_EVENT(&local, args, ts, sk, span);
        if (spill.perf_submit(TCPSTATES_TP_CTX, &local, sizeof(local)) == 0)
            c->spilled++;
        else
            c->drops++;
    }
#else
    FILL_EVENT(&local, args, ts, sk, span);
    if (events.perf_submit(TCPSTATES_TP_CTX, &local, sizeof(local)) == 0)
        c->ringed++;
    else
        c->drops++;
#endif
    goto update;

#if defined(TCPSTATES_FILTER_TRANSITION) || defined(TCPSTATES_FILTER_PROC)
filtered_clock:
    /* dropped before a record was reserved (process and transition filters):
     * the socket's clock still moves, so a later kept event gets its true
     * time in the old state */
    ts = bpf_ktime_get_ns();
    prev = last_change.lookup(&sk);
    if (prev && !TCPSTATES_SAME_SK(prev, sk))
        prev = NULL;
#endif
#if defined(TCPSTATES_MIN_SPAN_NS) || defined(TCPSTATES_FILTER_SPAN) || defined(TCPSTATES_FILTER_TRANSITION) || defined(TCPSTATES_FILTER_PROC)
filtered_update:
    c->filtered++;
#endif
update:
    /* The compiler may carry "prev is set" in a flag of its own across the
     * filters' branches; the verifier cannot tie such a flag to the pointer
     * (perf-buffer mode with a duration filter was rejected: "invalid mem
     * access 'scalar'"). Hiding prev's value makes the test below the
     * pointer's own. */
    asm volatile("" : "+r"(prev));
    if (args->newstate == TCPSTATES_TCP_CLOSE)
        last_change.delete(&sk);
    else if (prev && TCPSTATES_SAME_SK(prev, sk))
        prev->ts = ts;        /* in place: an update would allocate a new LRU node */
    else {
        struct tcpstates_sk_ts fresh = {.sk = sk, .ts = ts};
        last_change.update(&sk, &fresh);
    }
    goto out;
#endif /* !TCPSTATES_CONNECTIONS */

#ifdef TCPSTATES_CONNECTIONS
connection: {
    u32 old = args->oldstate, new = args->newstate;
#ifdef TCPSTATES_FILTER_LPORT
    /* A connect's first change (CLOSE->SYN_SENT) has local port 0: the port
     * is bound after it. A record is judged by its ports at the close, so
     * that change cannot be judged yet: it is folded in and the connection
     * judged by its next change, whose failing drops the entry it began
     * (else it would be handed over as unclosed when its memory is reused). */
    if (!port_allowed(lport_allowed.lookup(&lport)) &&
        (lport != 0 || old != TCPSTATES_TCP_CLOSE || new != TCPSTATES_TCP_SYN_SENT)) {
        if (old == TCPSTATES_TCP_SYN_SENT)
            conns.delete(&sk);
        goto filtered;
    }
#endif
    int listener = new == TCPSTATES_TCP_LISTEN || (old == TCPSTATES_TCP_LISTEN && new == TCPSTATES_TCP_CLOSE);
    ts = bpf_ktime_get_ns();
    /* a new socket at this address: a connection starts afresh
     * (CLOSE->SYN_SENT, LISTEN->SYN_RECV for an accepted one), or a listener */
    int fresh = (old == TCPSTATES_TCP_CLOSE && new == TCPSTATES_TCP_SYN_SENT)
             || (old == TCPSTATES_TCP_LISTEN && new == TCPSTATES_TCP_SYN_RECV);
    int reborn = fresh || (old == TCPSTATES_TCP_CLOSE && new == TCPSTATES_TCP_LISTEN);
    /* one lookup per transition (a new socket's too: that is where an entry
     * left by a lost ->CLOSE is found); a listener's close needs none */
    struct tcpstates_conn *cn = (listener && !reborn) ? NULL : conns.lookup(&sk);
    if (cn && reborn) {
        /* An entry left at a new socket's address: an earlier connection
         * whose ->CLOSE the program never ran for (its socket was freed and the
         * memory reused; a seen ->CLOSE deletes the entry). Handed over as an
         * unclosed record, never overwritten unseen; checked again after the
         * fill (its node may have gone to another socket meanwhile). */
        struct tcpstates_conn_event *u = NULL;
#ifndef TCPSTATES_PERF_BUFFER
        u = events.ringbuf_reserve(sizeof(*u));
        if (u) {
            FILL_UNCLOSED(u, ts, sk, cn);
            if (TCPSTATES_SAME_SK(cn, sk)) {
                events.ringbuf_submit(u, TCPSTATES_WAKEUP_FLAGS);
                c->ringed++;
            } else
                events.ringbuf_discard(u, BPF_RB_NO_WAKEUP);
        }
#endif
        if (!u) {
            u = conn_stage.lookup(&slot);
            if (u) {
                FILL_UNCLOSED(u, ts, sk, cn);
                if (TCPSTATES_SAME_SK(cn, sk)) {
#ifndef TCPSTATES_PERF_BUFFER
                    if (spill.perf_submit(TCPSTATES_TP_CTX, u, sizeof(*u)) == 0)
                        c->spilled++;
#else
                    if (events.perf_submit(TCPSTATES_TP_CTX, u, sizeof(*u)) == 0)
                        c->ringed++;
#endif
                    else
                        c->drops++;
                }
            } else
                c->drops++;
        }
        if (listener)
            conns.delete(&sk);    /* a connection's entry is replaced below */
        cn = NULL;
    }
    if (listener) {
        TCPSTATES_OWNER_TRACK(args, sk);
        goto filtered;        /* a listener is not a connection */
    }
    if (cn) {
        span = ts - cn->last_ns;
        if (!TCPSTATES_SAME_SK(cn, sk)) {
            cn = NULL;        /* its node went to another socket: begun unseen */
            span = TCPSTATES_SPAN_UNKNOWN;
        }
    }
    if (cn) {
        cn->state_ns[old & (TCPSTATES_NSTATES - 1)] += span;
        cn->last_ns = ts;
        cn->last_state = new;
        /* The endpoints complete themselves once: an accepted socket's peer
         * is set after LISTEN->SYN_RECV (read again, with the addresses); the
         * opener's own port is bound after CLOSE->SYN_SENT (its addresses
         * were already set: the port alone, no helper call) */
        if (cn->dport != args->dport)
            FILL_ENDPOINTS(cn, args);
        else
            cn->sport = args->sport;
    } else {
        cn = conn_scratch.lookup(&slot);
        if (!cn) {
            c->drops++;
            goto out;
        }
        __builtin_memset(cn, 0, sizeof(*cn));
        cn->sk = sk;
        u64 pid_tgid = bpf_get_current_pid_tgid();
        cn->start_ns = ts;
        cn->last_ns = ts;
        cn->cgroup_id = bpf_get_current_cgroup_id();
        cn->pid = pid_tgid >> 32;
        cn->tid = (u32)pid_tgid;
        bpf_get_current_comm(cn->comm, sizeof(cn->comm));
        cn->first_state = old;
        cn->last_state = new;
        cn->complete = fresh;
        FILL_ENDPOINTS(cn, args);
        if (new != TCPSTATES_TCP_CLOSE)
            conns.update(&sk, cn);
    }
    if (new != TCPSTATES_TCP_CLOSE) {
        TCPSTATES_OWNER_TRACK(args, sk);
        goto out;             /* folded into the entry: nothing to hand over */
    }
    struct tcpstates_conn_event *r = NULL;
#ifndef TCPSTATES_PERF_BUFFER
    /* The entry is checked again once the record is filled: if its node went
     * to another socket meanwhile, the record would carry that socket's
     * process and times; it is dropped and counted instead. */
    r = events.ringbuf_reserve(sizeof(*r));
    if (r) {
        FILL_CONN(r, args, ts, sk, span, cn);
        if (TCPSTATES_SAME_SK(cn, sk)) {
            events.ringbuf_submit(r, TCPSTATES_WAKEUP_FLAGS);
            c->ringed++;
        } else {
            events.ringbuf_discard(r, BPF_RB_NO_WAKEUP);
            c->drops++;
        }
    } else {
        struct tcpstates_conn_event local_conn;
        FILL_CONN(&local_conn, args, ts, sk, span, cn);
        if (!TCPSTATES_SAME_SK(cn, sk))
            c->drops++;
        else if (spill.perf_submit(TCPSTATES_TP_CTX, &local_conn, sizeof(local_conn)) == 0)
            c->spilled++;
        else
            c->drops++;
    }
#else
    struct tcpstates_conn_event local_conn;
    FILL_CONN(&local_conn, args, ts, sk, span, cn);
    if (!TCPSTATES_SAME_SK(cn, sk))
        c->drops++;
    else if (events.perf_submit(TCPSTATES_TP_CTX, &local_conn, sizeof(local_conn)) == 0)
        c->ringed++;
    else
        c->drops++;
#endif
    conns.delete(&sk);
    goto out;
}
#endif /* TCPSTATES_CONNECTIONS */

filtered:
    c->filtered++;
out:
    /* after the record is visible: the reader may now rely on having it */
    __sync_fetch_and_add(&c->done, 1);
    return 0;
}

#ifdef TCPSTATES_STATE_RAW
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    /* marked running before anything else and until the last: a state change
     * that interrupts it anywhere in between is the rescue's */
    u32 cpu = bpf_get_smp_processor_id();
    struct tcpstates_cpu *c = cpu_state.lookup(&cpu);
    if (!c)
        return 0;
    WRITE_ONCE_U64(c->running, 1);
    int ret = state_change(ctx, 0, cpu, c);
    WRITE_ONCE_U64(c->running, 0);
    return ret;
}

/* The rescue, attached to the same tracepoint after the main program (by
 * plugins/kernel/loader.py). The kernel skips a program that a state change
 * interrupts on its own CPU (a softirq handling a packet on top of its run in
 * a process's system call) and counts it as a miss. Whenever the main program
 * is running on this CPU while the tracepoint is called, this call is such a
 * skipped one: the rescue handles it, in its own slot. Any other time it
 * returns at once. The main program's misses minus the rescue's runs (its
 * slot's hits) are the state changes lost: a skip is lost only when the
 * interruption came before `running` is set or after it is cleared, while the
 * kernel still holds the main program active (bench/README.md). */
static __always_inline int rescue_run(struct bpf_raw_tracepoint_args *ctx, u32 cpu)
{
    u32 cpu_slot = cpu + TCPSTATES_NCPUS;
    struct tcpstates_cpu *c = cpu_state.lookup(&cpu_slot);
    return c ? state_change(ctx, 1, cpu_slot, c) : 0;
}

int tcpstates_rescue(struct bpf_raw_tracepoint_args *ctx)
{
    u32 cpu = bpf_get_smp_processor_id();
    struct tcpstates_cpu *main_run = cpu_state.lookup(&cpu);
    if (!main_run)
        return 0;
#ifdef TCPSTATES_TEST_NEST_PORT
    {
        u16 be_sport = 0, be_dport = 0;
        const char *sk = (const char *)ctx->args[0];
        bpf_probe_read_kernel(&be_sport, sizeof(be_sport), sk + TCPSTATES_OFF_INET_SOCK_SPORT);
        bpf_probe_read_kernel(&be_dport, sizeof(be_dport), sk + TCPSTATES_OFF_SOCK_SKC_DPORT);
        if (tcpstates_ntohs(be_sport) == TCPSTATES_TEST_NEST_PORT ||
            tcpstates_ntohs(be_dport) == TCPSTATES_TEST_NEST_PORT)
            return rescue_run(ctx, cpu);
    }
#endif
    if (!READ_ONCE_U64(main_run->running))
        return 0;
    return rescue_run(ctx, cpu);
}
#endif
