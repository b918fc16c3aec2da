/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/* tcpstates.h - the records the kernel stage shares with user space.
 *
 * The event layout is mirrored by EVENT_STRUCT in plugins/kernel/decoder.py
 * (its owner tail by RAW_OWNER in plugins/owner/enricher.py), the connection
 * record by CONN_STRUCT (plugins/kernel/conndecoder.py), the per-CPU state by
 * CPU_STATE (plugins/kernel/cpustate.py), the aggregates by AGG_STRUCT
 * (plugins/kernel/aggregates.py). tests/test_kernel_units.py compiles this
 * header with the C compiler and compares every field's offset and size in
 * all of them with the Python's (and reads aggregates written in C back).
 * Natural alignment, no padding holes: the event is 136 bytes, the per-CPU
 * state 64.
 */
#ifndef TCPSTATES_H
#define TCPSTATES_H

#define TCPSTATES_SPAN_UNKNOWN 0xffffffffffffffffULL

struct tcpstates_event {
    u64 ts_ns;        /* bpf_ktime_get_ns() of the transition (CLOCK_MONOTONIC) */
    u64 skaddr;       /* struct sock * as a number: the socket's identity */
    u64 span_ns;      /* time spent in oldstate, TCPSTATES_SPAN_UNKNOWN if not seen */
    u64 cgroup_id;    /* cgroup v2 id of the on-CPU task */
    u32 pid;          /* on-CPU TGID (bcc's C-PID) */
    u32 tid;          /* on-CPU thread id */
    u16 sport;        /* host order, as the tracepoint gives it */
    u16 dport;
    u16 family;       /* AF_INET or AF_INET6 */
    u8 oldstate;
    u8 newstate;
    u8 saddr[16];     /* IPv4 in the first 4 bytes */
    u8 daddr[16];
    char comm[16];    /* on-CPU thread name (bcc's C-COMM) */
    /* The socket's owner as the kernel knows it (bpf/owner.bpf.h); all zero
     * unless compiled with TCPSTATES_OWNER or when no owner is known. */
    u64 owner_start_ns;   /* owner's start time (boottime ns): PID + this = identity */
    u64 owner_cgroup_id;  /* owner's cgroup v2 id, captured in the owner's context */
    u32 owner_pid;        /* owner TGID */
    u32 owner_how;        /* 0 unknown, 1 syscall transition, 2 accept, 3 send/recv */
    char owner_comm[16];  /* owner's thread-group leader name */
};

/* Connection-record mode (-DTCPSTATES_CONNECTIONS): one record per socket
 * when it closes, instead of one per state change. Mirrored by CONN_STRUCT in
 * plugins/kernel/conndecoder.py. 288 bytes.
 *
 * closed = 0: a connection whose ->CLOSE the program never ran for (a
 * tracepoint hit the kernel did not run it for), found still in the conns map
 * when a new connection began at the same socket address. ev.ts_ns is then
 * that moment (the close happened between last_ns and it), ev.span_ns unknown,
 * ev.oldstate the last state seen, ev.newstate CLOSE, the endpoints those last
 * seen, the owner fields zero (the owner map may already hold the new socket). */
#define TCPSTATES_NSTATES 16      /* state_ns is indexed by state number & 15 */
#define TCPSTATES_ERROR_READ 1    /* tcpstates_conn_event.error_flags */
#define TCPSTATES_ERROR_UNSENT 2
#define TCPSTATES_ERROR_ABORTED 4 /* FIN_WAIT2->CLOSE with neither the peer's FIN
                                     received nor the socket orphaned by its close */

struct tcpstates_conn_event {
    struct tcpstates_event ev;    /* the ->CLOSE transition; span_ns is the time in
                                     its old state; pid/tid/comm/cgroup_id are
                                     the on-CPU task at the socket's first sight */
    u64 start_ns;                 /* bpf_ktime_get_ns() at the first transition seen */
    u64 last_ns;                  /* ... at the last transition seen (closed: the close) */
    u64 state_ns[TCPSTATES_NSTATES];  /* ns spent in each state, by state number */
    u8 first_state;               /* old state of the first transition seen */
    u8 complete;                  /* 1: seen from connect()/the SYN (CLOSE->SYN_SENT,
                                     LISTEN->SYN_RECV); 0: it began before tracing */
    u8 closed;                    /* 1: its ->CLOSE was seen; 0: see above */
    u8 error_flags;               /* TCPSTATES_ERROR_READ: error below was read (sk_err
                                     at a BTF offset); TCPSTATES_ERROR_UNSENT with it:
                                     the socket had sent no segment (tcp_sock.segs_out
                                     0), so a connect that closes so ended inside
                                     connect() itself, its error returned to the
                                     caller and never stored in sk_err;
                                     TCPSTATES_ERROR_ABORTED with it: its own side
                                     aborted it in FIN_WAIT2 (a RST sent) */
    s32 error;                    /* the socket's sk_err at its ->CLOSE: the errno a
                                     failed connect or an aborted connection
                                     ended with (ECONNREFUSED, ETIMEDOUT, ...), 0 none */
};

/* One per CPU, in a memory-mappable array: user space reads it without a
 * bpf() syscall (a map syscall blocks tracepoint programs on that CPU for
 * its duration, which the kernel counts as misses). 128 bytes, two cache lines:
 * the rows are written on every state change, each by its own CPU, and must not
 * share a line (a row of ten u64 would straddle into the next CPU's).
 *
 * hits/done bracket every run of the program that passed the protocol check:
 * hits != done means a run is in flight on that CPU, and start_ns (written
 * right after hits) is a lower bound of its record's timestamp. The reader
 * uses this to merge ring and spill records in time order without waiting.
 */
struct tcpstates_cpu {
    u64 hits;         /* runs that passed the protocol check (atomic: a barrier) */
    u64 done;         /* runs finished, their record visible (atomic: a barrier) */
    u64 start_ns;     /* bpf_ktime_get_ns() at the start of the latest run */
    u64 filtered;     /* runs that ended in an in-kernel filter */
    u64 ringed;       /* records committed to the ring (perf mode: the perf buffer) */
    u64 spilled;      /* records the ring refused that went to the spill buffer */
    u64 drops;        /* records that could not be handed over at all */
    u64 reserved;     /* fault injection's counter (TCPSTATES_TEST_LOSE_EVERY) */
    u64 running;      /* raw form, main program's slot: 1 from its first instruction
                         to its last (what the rescue tests, bpf/tcpstates.bpf.c) */
    u64 nested_other; /* raw form, rescue's slot: skipped changes of sockets other
                         than TCP (MPTCP's own socket, SCTP): the main program's
                         misses, not lost events of ours */
    u64 pad[6];       /* to 128 bytes (above) */
};

/* In-kernel aggregates (-DTCPSTATES_AGGREGATES, bpf/aggregates.bpf.h): one
 * per CPU in a memory-mappable array; mirrored by AGG_STRUCT in
 * plugins/kernel/aggregates.py. Log2 buckets of microseconds: bucket i holds
 * spans whose us count has bit length i; 56 buckets cover every u64 of ns. */
#define TCPSTATES_AGG_BUCKETS 56
#define TCPSTATES_AGG_EXTRA 2
#define TCPSTATES_AGG_HANDSHAKE 0   /* SYN_SENT -> ESTABLISHED span */
#define TCPSTATES_AGG_LIFETIME 1    /* ESTABLISHED entered -> CLOSE */

struct tcpstates_agg {
    u64 events;                                            /* state changes folded in */
    u64 state_sum_ns[TCPSTATES_NSTATES];                   /* by old state, known spans */
    u64 state_hist[TCPSTATES_NSTATES][TCPSTATES_AGG_BUCKETS];  /* [old][bucket] */
    u64 transitions[TCPSTATES_NSTATES][TCPSTATES_NSTATES];     /* [old][new] */
    u64 extra_sum_ns[TCPSTATES_AGG_EXTRA];
    u64 extra_hist[TCPSTATES_AGG_EXTRA][TCPSTATES_AGG_BUCKETS];
};

#endif
