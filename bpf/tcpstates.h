/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/* tcpstates.h - the one event record the kernel stage hands to user space.
 *
 * The layout is mirrored by EVENT_STRUCT in plugins/kernel/decoder.py; keep
 * both in step (tests/test_kernel_units.py compiles this header with the C
 * compiler and compares every field's offset and size with the decoder's).
 * Natural alignment, no padding holes: 136 bytes.
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

#endif
