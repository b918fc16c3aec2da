/* SPDX-License-Identifier: Apache-2.0 */
/* iocost.c - the send/recv loop of bench/iocost.py, in C so that the figure is
 * the kernel's path and not the interpreter's: one thread, a connected pair of
 * sockets of the kind asked for, CALLS times "send 64 bytes, receive them";
 * prints this thread's CPU ns per call (a send or a receive). KIND-eagain:
 * CALLS receives on the empty socket, each ending in EAGAIN (the receive
 * tracepoint fires all the same): the kernel's own work per call is small, so
 * what a probe adds stands out. KIND-close: CALLS times "dup the descriptor,
 * close the copy" (the owner's close probe runs for every close() on the
 * host); the kind `file` is /dev/null, a descriptor that is no socket.
 * syscall: CALLS getppid() calls, which no probe of ours traces: what attaching
 * any syscall tracepoint (the owner's accept and close probes) adds to every
 * system call of every process on the host (the syscall-tracing slow path).
 * connect: CALLS loopback TCP connections made, accepted and closed one after
 * another (the accepted side closes first, the connecting side then with
 * SO_LINGER 0: no TIME_WAIT piles up, 8 state changes each); prints the wall
 * ns per connection (the softirq half of each connection runs in this thread
 * too, and so do the state-change programs, which CPU time may not count).
 *
 *   iocost tcp|unix|udp[-eagain|-close] CALLS
 *   iocost file-close CALLS
 *   iocost syscall CALLS
 *   iocost connect CALLS
 */
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One connection to the listener l at addr: connect, accept, close both. */
static int one_connection(int l, const struct sockaddr_in *addr)
{
    struct linger abort_close = {1, 0};
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (const void *)addr, sizeof(*addr)))
        return -1;
    int s = accept(l, NULL, NULL);
    if (s < 0 || close(s) || setsockopt(c, SOL_SOCKET, SO_LINGER, &abort_close, sizeof(abort_close)))
        return -1;
    return close(c);
}

static int connections(long calls)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (void *)&addr, sizeof(addr)) || listen(l, 64) || getsockname(l, (void *)&addr, &len))
        return 1;
    for (long i = 0; i < 1000; i++)
        if (one_connection(l, &addr))
            return 1;
    long long t0 = wall_ns();
    for (long i = 0; i < calls; i++)
        if (one_connection(l, &addr))
            return 1;
    printf("%.1f\n", (double)(wall_ns() - t0) / calls);
    return 0;
}

static int pair(const char *kind, int *a, int *b)
{
    int sv[2];
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    if (!strcmp(kind, "syscall")) {
        *a = *b = -1;
        return 0;
    }
    if (!strcmp(kind, "file")) {
        *a = *b = open("/dev/null", O_RDWR);
        return *a < 0 ? -1 : 0;
    }
    if (!strcmp(kind, "unix")) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
            return -1;
        *a = sv[0], *b = sv[1];
        return 0;
    }
    if (!strcmp(kind, "udp")) {
        *a = socket(AF_INET, SOCK_DGRAM, 0), *b = socket(AF_INET, SOCK_DGRAM, 0);
        if (*a < 0 || *b < 0 || bind(*b, (void *)&addr, sizeof(addr)) || getsockname(*b, (void *)&addr, &len)
            || connect(*a, (void *)&addr, sizeof(addr)))
            return -1;
        return 0;
    }
    if (strcmp(kind, "tcp"))
        return -1;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    *a = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0 || *a < 0 || bind(l, (void *)&addr, sizeof(addr)) || listen(l, 1)
        || getsockname(l, (void *)&addr, &len) || connect(*a, (void *)&addr, sizeof(addr)))
        return -1;
    *b = accept(l, NULL, NULL);
    close(l);
    return *b < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
    int a, b;
    char buf[64] = {0}, kind[16] = "";
    long calls = argc == 3 ? atol(argv[2]) : 0;
    const char *dash = argc == 3 ? strchr(argv[1], '-') : NULL;
    int eagain = dash && !strcmp(dash, "-eagain"), closing = dash && !strcmp(dash, "-close");
    if (argc == 3 && !strcmp(argv[1], "connect") && calls >= 1 && calls <= 100000000)
        return connections(calls);
    if (argc == 3)
        snprintf(kind, sizeof(kind), "%.*s", dash ? (int)(dash - argv[1]) : (int)strlen(argv[1]), argv[1]);
    if (calls < 1 || calls > 100000000 || (dash && !eagain && !closing) || (!strcmp(kind, "file") && !closing)
        || (!strcmp(kind, "syscall") && dash) || pair(kind, &a, &b)) {
        fprintf(stderr, "usage: iocost tcp|unix|udp[-eagain|-close] CALLS, iocost file-close CALLS, "
                        "iocost syscall CALLS, iocost connect CALLS (1..100000000)\n");
        return 2;
    }
    if (a < 0) {                            /* syscall */
        for (long i = 0; i < 10000; i++)
            syscall(SYS_getppid);
        long long t0 = cpu_ns();
        for (long i = 0; i < calls; i++)
            syscall(SYS_getppid);
        printf("%.1f\n", (double)(cpu_ns() - t0) / calls);
        return 0;
    }
    if (closing) {
        for (long i = 0; i < 10000; i++)
            if (close(dup(b)))
                return 1;
        long long t0 = cpu_ns();
        for (long i = 0; i < calls; i++)
            if (close(dup(b)))
                return 1;
        printf("%.1f\n", (double)(cpu_ns() - t0) / calls);
        return 0;
    }
    if (eagain) {
        for (long i = 0; i < 10000; i++)
            if (recv(b, buf, 64, MSG_DONTWAIT) != -1 || errno != EAGAIN)
                return 1;
        long long t0 = cpu_ns();
        for (long i = 0; i < calls; i++)
            if (recv(b, buf, 64, MSG_DONTWAIT) != -1 || errno != EAGAIN)
                return 1;
        printf("%.1f\n", (double)(cpu_ns() - t0) / calls);
        return 0;
    }
    for (long i = 0; i < 10000; i++)        /* warm caches and the owner entry */
        if (send(a, buf, 64, 0) != 64 || recv(b, buf, 64, 0) != 64)
            return 1;
    long long t0 = cpu_ns();
    for (long i = 0; i < calls; i++)
        if (send(a, buf, 64, 0) != 64 || recv(b, buf, 64, 0) != 64)
            return 1;
    printf("%.1f\n", (double)(cpu_ns() - t0) / (2.0 * calls));
    return 0;
}
