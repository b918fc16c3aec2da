/* SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0 */
/* owner.bpf.h - the owner half of the kernel stage: which process holds each
 * TCP socket, learnt in that process's own context.
 *
 * Included by tcpstates.bpf.c. Without -DTCPSTATES_OWNER it only zeroes the
 * owner fields of the record (TCPSTATES_OWNER_FILL), so the record layout
 * never changes with the switch.
 *
 * With TCPSTATES_OWNER (asked for by the owner enricher through
 * KernelConstraints.cflags, see plugins/owner/kernel.py), a per-socket LRU map
 * sk_owner remembers the last process seen holding the socket:
 *   - the transitions that only happen inside the owner's own system call
 *     (connect, listen; close/shutdown unless the socket's known owner was
 *     seen using it) set it to the on-CPU process;
 *   - accept()/accept4() set it for the new socket (fd -> struct sock through
 *     task->files, with member offsets from the running kernel's BTF);
 *   - sock:sock_send_length / sock:sock_recv_length (Linux >= 6.4), which run
 *     in the sending/receiving process, set it when the holder changed (a
 *     hand-off over SCM_RIGHTS, a pre-fork child) — one map lookup when it
 *     did not.
 * Every record then carries the owner the map holds for its socket.
 *
 * Identity is (TGID, start time of the thread-group leader in boottime ns, as
 * /proc/PID/stat's starttime): a reused PID never inherits an old process's
 * name. The comm is the group leader's, read when the owner is recorded.
 *
 * Switches (-D, set by plugins/owner/kernel.py):
 *   TCPSTATES_OWNER            enable all of this
 *   TCPSTATES_OWNER_MAX        sk_owner entries (LRU)
 *   TCPSTATES_OWNER_IO         attach the sock_send_length/sock_recv_length probes
 *   TCPSTATES_OWNER_IO_RAW     ... as raw tracepoints (needs TCPSTATES_OFF_SOCK_SK_PROTOCOL
 *                              and _SK_TYPE)
 *   TCPSTATES_OWNER_ACCEPT     attach the accept/accept4 exit probes (needs the FD offsets)
 *   TCPSTATES_OWNER_TASK       task offsets are known (start time, leader comm)
 *   TCPSTATES_OWNER_EXIT       attach sched:sched_process_exit: remember exited
 *                              processes, so a close by a second holder after
 *                              the I/O owner exited names the closer
 *   TCPSTATES_OWNER_GONE_MAX   exited processes remembered (LRU)
 *   TCPSTATES_OWNER_EXEC       attach sched:sched_process_exec: an owner's
 *                              name is read again at its first send/recv
 *                              (or close) after an exec
 *   TCPSTATES_OWNER_SLOT_PER_PID  pid_max fits the per-PID-slot counters: a
 *                              slot's exit count moving proves its PID's exit
 *   TCPSTATES_OWNER_HOME_NETNS  the inode of tcpstates' own network namespace: a
 *                              record with no owner whose socket lives in another
 *                              one is marked TCPSTATES_OWNER_FOREIGN (needs
 *                              TCPSTATES_OFF_SOCK_SKC_NET, _NET_NS_INUM)
 *   TCPSTATES_OWNER_CLOSE      attach syscalls:sys_enter_close: an owner closing its
 *                              descriptor of a socket another reference still holds
 *                              (a hand-off, a forking server's parent) is marked as
 *                              having let go (needs the FD offsets, TCPSTATES_TP_CLOSE_FD, _SOCK_SK_TYPE,
 *                              TCPSTATES_OFF_FILE_F_INODE, _INODE_I_MODE, _FILE_F_REF,
 *                              TCPSTATES_FILE_REF_ONE: what a file's reference count
 *                              reads with one reference, 0 for the file_ref_t of
 *                              Linux >= 6.13, 1 for the atomic f_count before)
 *   TCPSTATES_OFF_<STRUCT>_<MEMBER>  byte offsets from BTF
 *   TCPSTATES_TP_IO_SK, TCPSTATES_TP_IO_FAMILY, TCPSTATES_TP_IO_PROTOCOL, TCPSTATES_TP_EXIT_RET,
 *   TCPSTATES_TP_EXIT_GROUP_DEAD
 *                              field offsets from the tracepoints' format files
 */
#ifndef TCPSTATES_OWNER_BPF_H
#define TCPSTATES_OWNER_BPF_H

/* how the owner was learnt (tcpstates_event.owner_how; 0 = not known) */
#define TCPSTATES_OWNER_SYSCALL 1   /* connect/listen/close/shutdown transition */
#define TCPSTATES_OWNER_ACCEPT_ 2   /* accept() returned it */
#define TCPSTATES_OWNER_IO_     3   /* send/recv on it */
/* or'ed into owner_how: the owner may have exited before this record (a
 * process with its PID slot exited since, and its own exit is not among the
 * ones remembered): user space checks that it is still alive, else unknown */
#define TCPSTATES_OWNER_UNSURE  0x100
/* owner_how of a record with no owner whose socket is in another network
 * namespace than tcpstates': what user space knows of listeners and of
 * sockets from before tracing (sock_diag, /proc/net/tcp, its own namespace)
 * is not about this socket, so it stays unknown */
#define TCPSTATES_OWNER_FOREIGN 0x200
/* owner_how of a record whose socket had an owner that has let it go (exited
 * or closed its descriptor while another process still holds the socket):
 * not known who holds it now, but it is no longer in an accept queue, so user
 * space must not take it for one (owner_left) */
#define TCPSTATES_OWNER_LEFT    0x400

#define TCPSTATES_OWNER_ZERO(e) do {                                     \
    (e)->owner_start_ns = 0;                                             \
    (e)->owner_cgroup_id = 0;                                            \
    (e)->owner_pid = 0;                                                  \
    (e)->owner_how = 0;                                                  \
    __builtin_memset((e)->owner_comm, 0, sizeof((e)->owner_comm));       \
} while (0)

#ifndef TCPSTATES_OWNER

#define TCPSTATES_OWNER_FILL(e, args, sk) TCPSTATES_OWNER_ZERO(e)
#define TCPSTATES_OWNER_TRACK(args, sk) do { } while (0)

#else /* TCPSTATES_OWNER */

#ifndef TCPSTATES_OWNER_MAX
#define TCPSTATES_OWNER_MAX 65536
#endif

struct tcpstates_owner {
    u64 sk;               /* its key (TCPSTATES_SAME_SK in tcpstates.bpf.c) */
    u64 start_ns;
    u64 cgroup_id;
    u32 pid;
    u32 how;
    char comm[16];
    u64 gen;              /* owner_exit_gen of its PID's slot when recorded */
    u32 closed;           /* a close/shutdown was seen: once no file holds the socket
                             (closed, not only shut down), that owner was the last
                             holder and stays named after it exits */
    u32 dropped;          /* the owner closed a descriptor of it (TCPSTATES_OWNER_CLOSE)
                             while another reference to the file remained: while a
                             file still holds the socket, someone else may hold it, so
                             the owner is not named until it or another process uses
                             or closes it again */
};

BPF_TABLE("lru_hash", u64, struct tcpstates_owner, sk_owner, TCPSTATES_OWNER_MAX);
/* The entry of socket sk, or NULL. Its node may be reused for another socket
 * once a concurrent send/recv on another CPU replaces this socket's entry
 * (each update takes a new node and frees the old one at once): a reader
 * checks the key again after its reads (TCPSTATES_SAME_SK). */
static __always_inline struct tcpstates_owner *owner_lookup(u64 sk)
{
    struct tcpstates_owner *o = sk_owner.lookup(&sk);
    return o && o->sk == sk ? o : NULL;
}
/* one staging slot per CPU: the entry is too big to build twice on the stack.
 * Written only in process context — the send/recv, accept and close probes,
 * and the state-change program for transitions made in the owner's own
 * system call (owner_is_syscall_transition) — where no other writer can
 * interrupt it on that CPU: a state change in a softirq that interrupts one
 * of them (the raw-tracepoint programs are not held off) never writes here. */
BPF_PERCPU_ARRAY(owner_scratch, struct tcpstates_owner, 1);

/* The current process's thread-group leader (NULL when the task offsets are
 * not known): its start time is the process's identity with the TGID. */
static __always_inline char *owner_leader(void)
{
    char *leader = NULL;
#ifdef TCPSTATES_OWNER_TASK
    char *task = (char *)bpf_get_current_task();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if ((u32)pid_tgid == pid_tgid >> 32)
        return task;          /* the caller is the leader thread itself: no read */
    bpf_probe_read_kernel(&leader, sizeof(leader), task + TCPSTATES_OFF_TASK_GROUP_LEADER);
#endif
    return leader;
}

/* The start time of the current process (0 when not known). */
static __always_inline u64 owner_current_start(void)
{
    u64 start = 0;
#ifdef TCPSTATES_OWNER_TASK
    char *leader = owner_leader();
    if (leader)
        bpf_probe_read_kernel(&start, sizeof(start), leader + TCPSTATES_OFF_TASK_START_BOOTTIME);
#endif
    return start;
}

/* The current process as an owner: TGID, cgroup, and (when the task offsets
 * are known) the group leader's start time and comm. */
static __always_inline void owner_current(struct tcpstates_owner *o, u32 how)
{
    o->pid = bpf_get_current_pid_tgid() >> 32;
    o->how = how;
    o->cgroup_id = bpf_get_current_cgroup_id();
    o->start_ns = 0;
#ifdef TCPSTATES_OWNER_TASK
    char *leader = owner_leader();
    if (leader) {
        bpf_probe_read_kernel(&o->start_ns, sizeof(o->start_ns), leader + TCPSTATES_OFF_TASK_START_BOOTTIME);
        bpf_probe_read_kernel(o->comm, sizeof(o->comm), leader + TCPSTATES_OFF_TASK_COMM);
        return;
    }
#endif
    bpf_get_current_comm(o->comm, sizeof(o->comm));
}

#if defined(TCPSTATES_OWNER_EXIT) && defined(TCPSTATES_OWNER_TASK) && defined(TCPSTATES_OWNER_IO)
#ifndef TCPSTATES_OWNER_GONE_MAX
#define TCPSTATES_OWNER_GONE_MAX 16384
#endif
/* Processes that have exited, by identity (TGID and the start time of its
 * group leader, as owners carry it): a later process with the same PID is
 * another key, so its exit cannot hide an earlier one's. Written once per
 * process exit, read only at a close-type transition of a socket whose
 * owner was seen doing I/O. */
struct tcpstates_identity {
    u64 start_ns;
    u32 pid;
    u32 pad;
};
BPF_TABLE("lru_hash", struct tcpstates_identity, u8, owner_gone, TCPSTATES_OWNER_GONE_MAX);

/* Exits (low 32 bits) and execs (high 32 bits) per PID slot (PID modulo the
 * size): an owner entry keeps the count of its PID's slot from when it was
 * recorded, so the send/recv fast path can tell "no process with this PID can
 * have exited or exec'd since" with one array read, and checks the identity
 * (two reads of the current task) only when one may have. Slots shared by
 * several PIDs (pid_max above the size) only send more cases to that check. */
#define TCPSTATES_OWNER_GEN_SLOTS 65536
#define TCPSTATES_OWNER_EXEC_ONE (1ULL << 32)
BPF_ARRAY(owner_exit_gen, u64, TCPSTATES_OWNER_GEN_SLOTS);

static __always_inline u64 owner_gen(u32 pid)
{
    u32 slot = pid & (TCPSTATES_OWNER_GEN_SLOTS - 1);
    u64 *gen = owner_exit_gen.lookup(&slot);
    return gen ? *gen : 0;
}

/* Runs in the exiting task, before its files are closed; group_dead: the
 * last thread of the process (bcc attaches it by its name). */
int tracepoint__sched__sched_process_exit(void *ctx)
{
    if (!*(u8 *)((char *)ctx + TCPSTATES_TP_EXIT_GROUP_DEAD))
        return 0;
    struct tcpstates_identity id = {};
    u8 one = 1;
    id.pid = bpf_get_current_pid_tgid() >> 32;
    id.start_ns = owner_current_start();
    owner_gone.update(&id, &one);
    u32 slot = id.pid & (TCPSTATES_OWNER_GEN_SLOTS - 1);
    u64 *gen = owner_exit_gen.lookup(&slot);
    if (gen)
        __sync_fetch_and_add(gen, 1);
    return 0;
}

#ifdef TCPSTATES_OWNER_EXEC
/* An exec changes the process's name but not its identity: moving its PID
 * slot's count sends the owner's next send/recv to the slow path, which
 * reads the name again (sched:sched_process_exec runs after de_thread, in
 * the process with its final TGID). */
int tracepoint__sched__sched_process_exec(void *ctx)
{
    u32 slot = (bpf_get_current_pid_tgid() >> 32) & (TCPSTATES_OWNER_GEN_SLOTS - 1);
    u64 *gen = owner_exit_gen.lookup(&slot);
    if (gen)
        __sync_fetch_and_add(gen, TCPSTATES_OWNER_EXEC_ONE);
    return 0;
}
#endif

/* Has the process `o` names exited? 0: no (no process with its PID exited
 * since it was recorded); 1: yes (its identity is among the exits remembered,
 * or its PID slot is its PID's alone and saw an exit: the first exit of that
 * PID since was its own); 2: maybe (another PID of its slot exited, or its own
 * exit was pushed out of the owner_gone LRU). */
static __always_inline int owner_exited(struct tcpstates_owner *o)
{
    if ((u32)o->gen == (u32)owner_gen(o->pid))
        return 0;
    struct tcpstates_identity id = {};
    id.pid = o->pid;
    id.start_ns = o->start_ns;
    if (owner_gone.lookup(&id))
        return 1;
#ifdef TCPSTATES_OWNER_SLOT_PER_PID
    return 1;
#else
    return 2;
#endif
}
#else
#define owner_exited(o) 0
#define owner_gen(pid) 0
#endif

static __always_inline void owner_set_current(u64 sk, u32 how, u32 closed)
{
    u32 zero = 0;
    struct tcpstates_owner *o = owner_scratch.lookup(&zero);
    if (!o)
        return;
    owner_current(o, how);
    o->sk = sk;
    o->gen = owner_gen(o->pid);
    o->closed = closed;
    o->dropped = 0;
    sk_owner.update(&sk, o);
}

/* No file holds socket sk any more (closed, not only shut down): its
 * struct socket was detached (sock_orphan). Without the offset: assumed. */
static __always_inline int owner_orphaned(u64 sk)
{
#ifdef TCPSTATES_OFF_SOCK_SK_SOCKET
    u64 sock = 0;
    bpf_probe_read_kernel(&sock, sizeof(sock), (char *)sk + TCPSTATES_OFF_SOCK_SK_SOCKET);
    return sock == 0;
#else
    return 1;
#endif
}

/* Has the owner `o` left socket sk to someone else? It exited before the
 * socket was closed, and it is not the task running now (a process's exit
 * closes its files after sched_process_exit, in its own context: then it is
 * the closer). The socket is then held by a process that inherited it (a
 * fork before the exit) and has not used it: who that is, is not known here
 * — naming the exited process would be confidently wrong. 0: it has not;
 * 1: it has; 2: it may have (owner_exited's "maybe": user space checks). */
static __always_inline int owner_left(struct tcpstates_owner *o, u64 sk)
{
    if (o->closed || o->dropped) {   /* (the socket is read only for them: most records
                                        have neither) */
        int orphaned = owner_orphaned(sk);
        if (o->closed && orphaned)
            return 0;                /* its close was the last: it stays named */
        if (o->dropped && !orphaned)
            return 1;                /* it closed a descriptor while another reference
                                        held the socket: held by a process that got it
                                        (fork, SCM_RIGHTS) and has not used it */
    }
    int exited = owner_exited(o);
    if (!exited)
        return 0;
    if ((bpf_get_current_pid_tgid() >> 32) == o->pid && owner_current_start() == o->start_ns)
        return 0;
    return exited;
}

static __always_inline int owner_is_syscall_transition(int old, int new)
{
    /* (old, new) pairs that only happen inside the owner's own system call */
    return (old == 7 && new == 2)        /* CLOSE->SYN_SENT: connect */
        || (old == 7 && new == 10)       /* CLOSE->LISTEN: listen */
        || (old == 1 && new == 4)        /* ESTABLISHED->FIN_WAIT1: close/shutdown */
        || (old == 8 && new == 9)        /* CLOSE_WAIT->LAST_ACK: close/shutdown */
        || (old == 10 && new == 7);      /* LISTEN->CLOSE: close */
}

static __always_inline int owner_is_close_transition(int old, int new)
{
    return (old == 1 && new == 4) || (old == 8 && new == 9) || (old == 10 && new == 7);
}

/* Learn the owner from transition old->new of socket sk (no record).
 * A close-type transition runs in whoever dropped the last reference to the
 * file: after a hand-off that can be the dispatcher closing its own copy
 * late, although the worker used the socket. So the closing process does
 * not replace an owner seen sending or receiving on it (the user); it does
 * replace one only known from accept or a system call (a forking server's
 * parent, when the child's I/O cannot be seen), one that has exited since
 * (the closer is then the only holder left, TCPSTATES_OWNER_EXIT), or none.
 * Connect and listen always name theirs (a new socket). */
static __always_inline void owner_track(u64 sk, int old, int new)
{
    if (owner_is_syscall_transition(old, new) && (bpf_get_current_pid_tgid() >> 32) != 0) {
        int closing = owner_is_close_transition(old, new);
        struct tcpstates_owner *known = closing ? owner_lookup(sk) : NULL;
        if (!known || known->how != TCPSTATES_OWNER_IO_ || owner_exited(known))
            owner_set_current(sk, TCPSTATES_OWNER_SYSCALL, closing);
        else {
            /* the user stays named after the close: written as a new entry
             * from a copy, never into `known` (its node may be another
             * socket's by now) */
            u32 zero = 0;
            struct tcpstates_owner *o = owner_scratch.lookup(&zero);
            if (!o)
                return;
            __builtin_memcpy(o, known, sizeof(*o));
            if (!TCPSTATES_SAME_SK(known, sk))
                return;
            o->closed = 1;
            o->dropped = 0;          /* its last close (this one) comes after any earlier one */
            if (o->pid == (bpf_get_current_pid_tgid() >> 32))
                owner_current(o, o->how);   /* itself: its name now (after an exec) */
            sk_owner.update(&sk, o);
        }
    }
    else if (old == 10 && new == 3 && sk_owner.lookup(&sk))  /* LISTEN->SYN_RECV: a new child */
        sk_owner.delete(&sk);            /* has no owner yet: a stale entry of a freed socket at
                                            this address goes (looked up first: a lookup takes
                                            no lock, a delete the bucket's) */
}

#ifdef TCPSTATES_OWNER_HOME_NETNS
/* Is socket sk in another network namespace than tcpstates'? */
static __always_inline int owner_foreign_netns(u64 sk)
{
    char *net = NULL;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (char *)sk + TCPSTATES_OFF_SOCK_SKC_NET);
    if (!net)
        return 0;
    bpf_probe_read_kernel(&inum, sizeof(inum), net + TCPSTATES_OFF_NET_NS_INUM);
    return inum != 0 && inum != TCPSTATES_OWNER_HOME_NETNS;
}
#else
#define owner_foreign_netns(sk) 0
#endif

/* Fill the owner fields of record e for socket sk at transition old->new. */
static __always_inline void owner_fill(struct tcpstates_event *e, u64 sk, int old, int new)
{
    owner_track(sk, old, new);
    struct tcpstates_owner *o = owner_lookup(sk);
    int left = 1;
    if (o)
        left = owner_left(o, sk);
    if (o && left != 1) {
        e->owner_start_ns = o->start_ns;
        e->owner_cgroup_id = o->cgroup_id;
        e->owner_pid = o->pid;
        e->owner_how = o->how | (left == 2 ? TCPSTATES_OWNER_UNSURE : 0);
        __builtin_memcpy(e->owner_comm, o->comm, sizeof(e->owner_comm));
        if (!TCPSTATES_SAME_SK(o, sk))
            TCPSTATES_OWNER_ZERO(e);      /* reused under us: another socket's owner */
    } else {
        TCPSTATES_OWNER_ZERO(e);
        if (o && TCPSTATES_SAME_SK(o, sk))
            e->owner_how = TCPSTATES_OWNER_LEFT;
    }
    if (!e->owner_how && owner_foreign_netns(sk))
        e->owner_how = TCPSTATES_OWNER_FOREIGN;
    if (new == TCPSTATES_TCP_CLOSE && (o || sk_owner.lookup(&sk)))
        sk_owner.delete(&sk);
}

#define TCPSTATES_OWNER_FILL(e, args, sk) owner_fill((e), (sk), (args)->oldstate, (args)->newstate)
/* connection-record mode: transitions that make no record still teach the owner */
#define TCPSTATES_OWNER_TRACK(args, sk) owner_track((sk), (args)->oldstate, (args)->newstate)

#ifdef TCPSTATES_OFF_SOCK_SK_TYPE
/* Is sk a TCP socket? Read from the socket at the BTF offsets of sk_protocol
 * and sk_type. Protocol 6 is not TCP alone: a netlink socket of NETLINK_XFRM
 * (6), which any user may open, and a raw IPPROTO_TCP socket carry it too, and
 * an owner entry written for them would evict a real connection's. Protocol 6
 * of type SOCK_STREAM is TCP (netlink and raw sockets are never streams).
 * Where the two u16 members are neighbours (Linux >= 5.6: sk_type,
 * sk_protocol) one read takes both. */
static __always_inline int owner_sk_is_tcp(u64 sk)
{
    u16 protocol = 0, type = 0;
#if TCPSTATES_OFF_SOCK_SK_TYPE + 2 == TCPSTATES_OFF_SOCK_SK_PROTOCOL && !defined(TCPSTATES_SEPARATE_READS)
    u16 pair[2] = {};
    bpf_probe_read_kernel(pair, sizeof(pair), (char *)sk + TCPSTATES_OFF_SOCK_SK_TYPE);
    type = pair[0];
    protocol = pair[1];
#elif TCPSTATES_OFF_SOCK_SK_PROTOCOL + 2 == TCPSTATES_OFF_SOCK_SK_TYPE && !defined(TCPSTATES_SEPARATE_READS)
    u16 pair[2] = {};
    bpf_probe_read_kernel(pair, sizeof(pair), (char *)sk + TCPSTATES_OFF_SOCK_SK_PROTOCOL);
    protocol = pair[0];
    type = pair[1];
#else
    bpf_probe_read_kernel(&protocol, sizeof(protocol), (char *)sk + TCPSTATES_OFF_SOCK_SK_PROTOCOL);
    if (protocol != 6 /* IPPROTO_TCP */)
        return 0;
    bpf_probe_read_kernel(&type, sizeof(type), (char *)sk + TCPSTATES_OFF_SOCK_SK_TYPE);
#endif
    return protocol == 6 /* IPPROTO_TCP */ && type == 1 /* SOCK_STREAM */;
}
#endif

#ifdef TCPSTATES_OWNER_IO
/* Runs in the sending/receiving process for every send/recv on any socket:
 * the holder is unchanged when the entry names this process and no process
 * with its PID exited since it was recorded (one map lookup and, with
 * process-exit tracking, one array read). */
static __always_inline int owner_io_same(struct tcpstates_owner *o, u32 tgid)
{
    return o && o->pid == tgid && o->gen == owner_gen(tgid) && !o->dropped;
}

/* The holder changed (or may have): record the current process. */
static __always_inline int owner_io_changed(u64 sk, struct tcpstates_owner *o, u32 tgid)
{
    if (o && o->pid == tgid && o->start_ns == owner_current_start()) {
        /* the same process, after another one with its PID slot exited or
         * after its own exec: its name read again (a reused PID is another
         * process, whose name and identity replace the old one's below) */
        u32 closed = o->closed;
        owner_set_current(sk, TCPSTATES_OWNER_IO_, TCPSTATES_SAME_SK(o, sk) ? closed : 0);
        return 0;
    }
    owner_set_current(sk, TCPSTATES_OWNER_IO_, 0);
    return 0;
}

/* A send/recv on TCP socket sk: one lookup when the holder is unchanged. */
static __always_inline int owner_io_tcp(u64 sk)
{
    struct tcpstates_owner *o = owner_lookup(sk);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (owner_io_same(o, tgid))
        return 0;
    return owner_io_changed(sk, o, tgid);
}

#ifdef TCPSTATES_OWNER_IO_RAW
/* Raw tracepoints (TCPSTATES_OWNER_IO_RAW, chosen by plugins/owner/kernel.py
 * when BTF gives sock.sk_protocol's offset): the kernel calls the program
 * with the tracepoint's arguments (args[0] = struct sock *) without first
 * building the event record the perf-event path fills for every send/recv
 * on the host. The socket first, the map after: most of a host's sends and
 * receives may be on unix or UDP sockets, which then cost one read and no
 * lookup. (The other order, lookup first and the type read only before a
 * write, saved a busy TCP connection ~17 ns per call and cost every unix or
 * UDP call ~30 ns, a lookup that misses the cache: bench/README.md, run 13.) */
static __always_inline int owner_io_raw(u64 sk)
{
    if (!owner_sk_is_tcp(sk))
        return 0;
    return owner_io_tcp(sk);
}

/* bcc attaches a function by its raw_tracepoint__<event> name */
int raw_tracepoint__sock_send_length(struct bpf_raw_tracepoint_args *ctx)
{
    return owner_io_raw(ctx->args[0]);
}

int raw_tracepoint__sock_recv_length(struct bpf_raw_tracepoint_args *ctx)
{
    return owner_io_raw(ctx->args[0]);
}
#else
static __always_inline int owner_io(u64 sk, u16 family, u16 protocol)
{
    /* the family too: a NETLINK_XFRM socket's protocol is 6 as well */
    if (protocol != 6 /* IPPROTO_TCP */ || (family != 2 /* AF_INET */ && family != 10 /* AF_INET6 */))
        return 0;
#ifdef TCPSTATES_OFF_SOCK_SK_TYPE
    /* and the type where BTF gives its offset: a raw IPPROTO_TCP socket has
     * this family and protocol, and any user may open one in a user namespace
     * of their own (CAP_NET_RAW is checked against the socket's network
     * namespace). Without BTF such sockets can still fill the map (docs/events.md). */
    if (!owner_sk_is_tcp(sk))
        return 0;
#endif
    return owner_io_tcp(sk);
}

/* bcc generates a tracepoint's args struct only for probes in the main file,
 * so these read the fields at the offsets of the tracepoint's format file
 * (TCPSTATES_TP_IO_SK, TCPSTATES_TP_IO_PROTOCOL, set by plugins/owner/kernel.py).
 * bcc attaches a function by its tracepoint__<category>__<event> name. */
int tracepoint__sock__sock_send_length(void *ctx)
{
    return owner_io(*(u64 *)((char *)ctx + TCPSTATES_TP_IO_SK),
                    *(u16 *)((char *)ctx + TCPSTATES_TP_IO_FAMILY),
                    *(u16 *)((char *)ctx + TCPSTATES_TP_IO_PROTOCOL));
}

int tracepoint__sock__sock_recv_length(void *ctx)
{
    return owner_io(*(u64 *)((char *)ctx + TCPSTATES_TP_IO_SK),
                    *(u16 *)((char *)ctx + TCPSTATES_TP_IO_FAMILY),
                    *(u16 *)((char *)ctx + TCPSTATES_TP_IO_PROTOCOL));
}
#endif /* TCPSTATES_OWNER_IO_RAW */
#endif /* TCPSTATES_OWNER_IO */

#if defined(TCPSTATES_OWNER_ACCEPT) && defined(TCPSTATES_OWNER_TASK)
/* The struct sock behind descriptor fd of the current process:
 * task->files->fdt->fd[fd]->private_data (struct socket)->sk. accept()
 * returns a socket descriptor, so no file-type check is needed. */
static __always_inline char *owner_fd_file(long fd)
{
    char *task = (char *)bpf_get_current_task();
    char *files = NULL, *fdt = NULL, *file = NULL;
    char **fdarr = NULL;
    u32 max_fds = 0;
    bpf_probe_read_kernel(&files, sizeof(files), task + TCPSTATES_OFF_TASK_FILES);
    if (!files)
        return 0;
    bpf_probe_read_kernel(&fdt, sizeof(fdt), files + TCPSTATES_OFF_FILES_FDT);
    if (!fdt)
        return 0;
#if TCPSTATES_OFF_FDTABLE_MAX_FDS == 0 && TCPSTATES_OFF_FDTABLE_FD == 8 && !defined(TCPSTATES_SEPARATE_READS)
    /* neighbours (struct fdtable begins with them): one read takes both, on
     * every close() on the host */
    struct { u32 max_fds; u32 pad; char **fd; } head = {};
    bpf_probe_read_kernel(&head, sizeof(head), fdt);
    max_fds = head.max_fds;
    fdarr = head.fd;
    if (fd < 0 || fd >= max_fds)
        return 0;
#else
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), fdt + TCPSTATES_OFF_FDTABLE_MAX_FDS);
    if (fd < 0 || fd >= max_fds)
        return 0;
    bpf_probe_read_kernel(&fdarr, sizeof(fdarr), fdt + TCPSTATES_OFF_FDTABLE_FD);
#endif
    if (!fdarr)
        return 0;
    bpf_probe_read_kernel(&file, sizeof(file), fdarr + fd);
    if (!file)
        return 0;
    return file;
}

static __always_inline u64 owner_fd_sock(long fd)
{
    char *file = owner_fd_file(fd), *sock = NULL;
    u64 sk = 0;
    if (!file)
        return 0;
    bpf_probe_read_kernel(&sock, sizeof(sock), file + TCPSTATES_OFF_FILE_PRIVATE_DATA);
    if (!sock)
        return 0;
    bpf_probe_read_kernel(&sk, sizeof(sk), sock + TCPSTATES_OFF_SOCKET_SK);
    u16 protocol = 0;
    if (sk)
        bpf_probe_read_kernel(&protocol, sizeof(protocol), (char *)sk + TCPSTATES_OFF_SOCK_SK_PROTOCOL);
    return protocol == 6 /* IPPROTO_TCP: not a unix socket's */ ? sk : 0;
}

static __always_inline int owner_accepted(long ret)
{
    if (ret < 0)
        return 0;
    u64 sk = owner_fd_sock(ret);
    if (sk)
        owner_set_current(sk, TCPSTATES_OWNER_ACCEPT_, 0);
    return 0;
}

/* the `ret` field at its format-file offset (TCPSTATES_TP_EXIT_RET) */
int tracepoint__syscalls__sys_exit_accept4(void *ctx)
{
    return owner_accepted(*(long *)((char *)ctx + TCPSTATES_TP_EXIT_RET));
}

int tracepoint__syscalls__sys_exit_accept(void *ctx)
{
    return owner_accepted(*(long *)((char *)ctx + TCPSTATES_TP_EXIT_RET));
}

#ifdef TCPSTATES_OWNER_CLOSE
/* close(fd) of a TCP socket that another reference still holds: a dispatcher
 * that handed it to a worker over SCM_RIGHTS (or has it in flight), a forking
 * server's parent after the fork. If the closing process is its owner (or the
 * socket has no owner yet: from before tracing), the next state change (the
 * peer's FIN, in softirq) must not name it: the entry is marked dropped
 * (owner_left) until a process uses or closes the socket. Decided when the
 * close starts, from the file's reference count: one reference (this
 * descriptor's) means the last close, which runs tcp_close whose state
 * changes (ESTABLISHED->CLOSE on unread data comes before the socket is
 * orphaned) name the closer — never marked; more means another descriptor
 * (this process's or another's) or a message in flight holds the socket. (A
 * system call of another thread of the same process on that file holds a
 * reference for its duration: it is the closer's own process, whose next use
 * or close names it again.) Runs for every close() on the host: the walk of
 * the descriptor table and two reads to see that the descriptor is no
 * socket; for a TCP socket still held elsewhere, one lookup and one update. */
static __always_inline int owner_close_enter(long fd)
{
    char *file = owner_fd_file(fd), *inode = NULL, *sock = NULL;
    u16 mode = 0;
    u64 sk = 0;
    s64 refs = 0;
    if (!file)
        return 0;
#if TCPSTATES_OFF_FILE_PRIVATE_DATA + 8 == TCPSTATES_OFF_FILE_F_INODE && !defined(TCPSTATES_SEPARATE_READS)
    /* neighbours in struct file (Linux >= 6.12): one read takes both */
    char *pair[2] = {};
    bpf_probe_read_kernel(pair, sizeof(pair), file + TCPSTATES_OFF_FILE_PRIVATE_DATA);
    sock = pair[0];
    inode = pair[1];
#else
    bpf_probe_read_kernel(&inode, sizeof(inode), file + TCPSTATES_OFF_FILE_F_INODE);
#endif
    if (!inode)
        return 0;
    bpf_probe_read_kernel(&mode, sizeof(mode), inode + TCPSTATES_OFF_INODE_I_MODE);
    if ((mode & 0170000) != 0140000)          /* S_IFSOCK: private_data is a struct socket */
        return 0;
    bpf_probe_read_kernel(&refs, sizeof(refs), file + TCPSTATES_OFF_FILE_F_REF);
    if (refs <= TCPSTATES_FILE_REF_ONE)
        return 0;                             /* the last reference: tcp_close names the closer */
#if TCPSTATES_OFF_FILE_PRIVATE_DATA + 8 != TCPSTATES_OFF_FILE_F_INODE || defined(TCPSTATES_SEPARATE_READS)
    bpf_probe_read_kernel(&sock, sizeof(sock), file + TCPSTATES_OFF_FILE_PRIVATE_DATA);
#endif
    if (!sock)
        return 0;
    bpf_probe_read_kernel(&sk, sizeof(sk), sock + TCPSTATES_OFF_SOCKET_SK);
    if (!sk)
        return 0;
    if (!owner_sk_is_tcp(sk))
        return 0;
    u8 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), (char *)sk + TCPSTATES_OFF_SOCK_SKC_STATE);
    if (state == TCPSTATES_TCP_CLOSE)
        return 0;                             /* over: no state change is left to name */
    struct tcpstates_owner *known = owner_lookup(sk);
    if (known && (known->pid != (bpf_get_current_pid_tgid() >> 32) || known->dropped))
        return 0;                             /* someone else's (it still holds it), or marked */
    u32 zero = 0;
    struct tcpstates_owner *o = owner_scratch.lookup(&zero);
    if (!o)
        return 0;
    if (known) {
        __builtin_memcpy(o, known, sizeof(*o));
        if (!TCPSTATES_SAME_SK(known, sk))
            return 0;                         /* reused under us: another socket's entry */
    } else {
        /* a socket the probes never saw an owner of (from before tracing): the
         * process that closed a descriptor of it is recorded as having let go,
         * so a later record is not named after what /proc said at the start
         * (user space's snapshot) while another process holds it now */
        owner_current(o, TCPSTATES_OWNER_SYSCALL);
        o->sk = sk;
        o->gen = owner_gen(o->pid);
        o->closed = 0;
    }
    o->dropped = 1;
    sk_owner.update(&sk, o);
    return 0;
}

/* the `fd` field at its format-file offset (TCPSTATES_TP_CLOSE_FD) */
int tracepoint__syscalls__sys_enter_close(void *ctx)
{
    return owner_close_enter((long)*(u32 *)((char *)ctx + TCPSTATES_TP_CLOSE_FD));
}
#endif /* TCPSTATES_OWNER_CLOSE */
#endif /* TCPSTATES_OWNER_ACCEPT */

#endif /* TCPSTATES_OWNER */
#endif /* TCPSTATES_OWNER_BPF_H */
