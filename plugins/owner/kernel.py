"""What the owner enricher asks of the kernel stage: the -D switches of bpf/owner.bpf.h.

The owner probes need (a) the process-context tracepoints sock:sock_send_length
and sock:sock_recv_length (Linux >= 6.4) for "who uses the socket", (b) the
syscalls:sys_exit_accept{,4} tracepoints for "who accepted it", and (c) the
running kernel's BTF for the few task/file member offsets that turn an accepted
descriptor into its socket and give the owner's start time (identity). Each part
that is missing is left out and named (doctor, and a warning at start), and
the enricher falls back to what the transitions alone tell.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from tcpstates.btf import VMLINUX, BTF, BTFError
from tcpstates.btf import offset_cflags as _offsets

TRACEFS = tuple(filter(None, (os.environ.get("TCPSTATES_TRACEFS"),))) or (
    "/sys/kernel/tracing", "/sys/kernel/debug/tracing")
IO_TRACEPOINTS = (("sock", "sock_send_length"), ("sock", "sock_recv_length"))
ACCEPT_TRACEPOINTS = (("syscalls", "sys_exit_accept4"), ("syscalls", "sys_exit_accept"))
EXIT_TRACEPOINTS = (("sched", "sched_process_exit"),)
CLOSE_TRACEPOINTS = (("syscalls", "sys_enter_close"),)
# -D name suffix → (struct, member): task identity, and fd → struct sock
TASK_FIELDS = {
    "TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "TASK_START_BOOTTIME": ("task_struct", "start_boottime"),
    "TASK_COMM": ("task_struct", "comm"),
    # no struct socket attached any more: closed, not only shut down
    "SOCK_SK_SOCKET": ("sock", "sk_socket"),
}
FD_FIELDS = {
    "TASK_FILES": ("task_struct", "files"),
    "FILES_FDT": ("files_struct", "fdt"),
    "FDTABLE_FD": ("fdtable", "fd"),
    "FDTABLE_MAX_FDS": ("fdtable", "max_fds"),
    "FILE_PRIVATE_DATA": ("file", "private_data"),
    "SOCKET_SK": ("socket", "sk"),
    "SOCK_SK_PROTOCOL": ("sock", "sk_protocol"),
}
# close(fd): is the descriptor a socket (its inode's mode) before private_data is read as one
CLOSE_FIELDS = {
    "FILE_F_INODE": ("file", "f_inode"),
    "INODE_I_MODE": ("inode", "i_mode"),
    "SOCK_SKC_STATE": ("sock", "__sk_common.skc_state"),
    # a descriptor of a NETLINK_XFRM socket (protocol 6 too) must not make an owner entry
    "SOCK_SK_TYPE": ("sock", "sk_type"),
}
# a file's reference count: file_ref_t f_ref (Linux >= 6.13) reads 0 with one
# reference, the atomic f_count before it 1 (TCPSTATES_FILE_REF_ONE)
FILE_REFS = (("f_ref", 0), ("f_count", 1))
# the network namespace of a socket: sk->__sk_common.skc_net (possible_net_t) -> net.ns.inum
NETNS_FIELDS = {
    "SOCK_SKC_NET": ("sock", "__sk_common.skc_net"),
    "NET_NS_INUM": ("net", "ns.inum"),
}


IO_OFF = ("send/recv tracking turned off (owner kernel_io = false): hand-offs and pre-fork "
          "children are only seen at accept/close")
CLOSE_OFF = ("close tracking turned off (owner kernel_close = false): an accepter that hands a "
             "socket on and closes its copy stays named until the new holder uses it")
GEN_SLOTS = 65536   # TCPSTATES_OWNER_GEN_SLOTS in bpf/owner.bpf.h


def _pid_max() -> int:
    """The kernel's pid_max now (if it is raised later, PIDs share exit
    counters: another PID's exit then makes an owner count as gone, shown as
    unknown without need — never named wrongly)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 1 << 22


@dataclasses.dataclass
class OwnerSupport:
    """Which owner probes this kernel allows, and why not the others."""

    cflags: list[str]
    io: bool = False
    io_raw: bool = False      # the send/recv probes attach as raw tracepoints
    accept: bool = False
    identity: bool = False
    exits: bool = False
    netns: bool = False       # records with no owner say when their socket is in another netns
    closes: bool = False      # an owner's close() of one descriptor of a socket still held is seen
    missing: list[str] = dataclasses.field(default_factory=list)

    def add(self, *flags: str) -> None:
        """Append -D flags; one the probes share (a member offset two of them
        read) and already given is not given again."""
        self.cflags += [f for f in flags if f not in self.cflags]


def _tracefs() -> Path | None:
    for root in TRACEFS:
        if Path(root, "events").is_dir():
            return Path(root)
    return None


def _field_offsets(tracefs: Path | None, tps: tuple[tuple[str, str], ...],
                   fields: dict[str, int]) -> dict[str, int] | None:
    """{field: offset} from the format files of every tracepoint in tps, or
    None when one is missing or they disagree or a field has another size."""
    if tracefs is None:
        return None
    found: dict[str, int] = {}
    for category, name in tps:
        try:
            text = (tracefs / "events" / category / name / "format").read_text()
        except OSError:
            return None
        mine: dict[str, int] = {}
        for m in re.finditer(r"field:[^;]*?(\w+);\s*offset:(\d+);\s*size:(\d+);", text):
            if m.group(1) in fields and int(m.group(3)) == fields[m.group(1)]:
                mine[m.group(1)] = int(m.group(2))
        if len(mine) != len(fields) or any(found.get(k, v) != v for k, v in mine.items()):
            return None
        found.update(mine)
    return found


# members read whole by the probes: their size must be what the C assumes
SIZES = {"TASK_GROUP_LEADER": 8, "TASK_START_BOOTTIME": 8, "TASK_COMM": 16, "TASK_FILES": 8,
         "FILES_FDT": 8, "FDTABLE_FD": 8, "FDTABLE_MAX_FDS": 4, "FILE_PRIVATE_DATA": 8,
         "SOCKET_SK": 8, "SOCK_SK_PROTOCOL": 2, "SOCK_SK_SOCKET": 8, "SOCK_SK_TYPE": 2,
         "FILE_F_INODE": 8, "INODE_I_MODE": 2, "SOCK_SKC_STATE": 1, "SOCK_SKC_NET": 8, "NET_NS_INUM": 4,
         "FILE_F_REF": 8}
# what the raw send/recv probes read of a socket: protocol 6 alone is also a
# NETLINK_XFRM socket's (any user's) and a raw IPPROTO_TCP socket's; of type
# SOCK_STREAM it is TCP
RAW_IO_FIELDS = {
    "SOCK_SK_PROTOCOL": FD_FIELDS["SOCK_SK_PROTOCOL"],
    "SOCK_SK_TYPE": ("sock", "sk_type"),
}


def owner_support(max_sockets: int, btf_path: str = VMLINUX,
                  io: bool = True, io_probe: str = "auto", close: bool = True) -> OwnerSupport:
    """The -D flags for this kernel (always at least -DTCPSTATES_OWNER); io:
    the send/recv probes are wanted (owner.kernel_io), where the kernel has them;
    io_probe: how they attach (owner.kernel_io_probe: auto, tracepoint)."""
    s = OwnerSupport(cflags=["-DTCPSTATES_OWNER=1", f"-DTCPSTATES_OWNER_MAX={int(max_sockets)}"])
    tracefs = _tracefs()
    offsets = _field_offsets(tracefs, IO_TRACEPOINTS, {"sk": 8, "family": 2, "protocol": 2}) if io else None
    if not io:
        s.missing.append(IO_OFF)
    elif offsets is not None:
        s.io = True
        s.add("-DTCPSTATES_OWNER_IO=1", f"-DTCPSTATES_TP_IO_SK={offsets['sk']}",
              f"-DTCPSTATES_TP_IO_FAMILY={offsets['family']}",
              f"-DTCPSTATES_TP_IO_PROTOCOL={offsets['protocol']}")
    else:
        s.missing.append("sock:sock_send_length/sock_recv_length tracepoints (Linux >= 6.4): "
                         "hand-offs and pre-fork children are only seen at accept/close")
    try:
        btf = BTF.from_file(btf_path)
    except (OSError, BTFError) as exc:
        s.missing.append(f"kernel BTF ({btf_path}: {exc}): no accept tracking, "
                         f"no start times (owner identity is the PID only)")
        return s
    try:
        s.add(*_offsets(btf, TASK_FIELDS, SIZES), "-DTCPSTATES_OWNER_TASK=1")
        s.identity = True
    except BTFError as exc:
        s.missing.append(f"task offsets in BTF ({exc}): owner identity is the PID only")
        return s
    _netns(s, btf)
    if s.io:
        _io_socket_type(s, btf, raw=io_probe != "tracepoint")
    # process exits (group_dead: Linux >= 6.13), only needed with the send/recv owners
    exits = _field_offsets(tracefs, EXIT_TRACEPOINTS, {"group_dead": 1}) if s.io else None
    if exits is not None:
        s.exits = True
        s.add("-DTCPSTATES_OWNER_EXIT=1", f"-DTCPSTATES_TP_EXIT_GROUP_DEAD={exits['group_dead']}")
        if _pid_max() <= GEN_SLOTS:
            # each PID has its own exit counter: a moved count proves the exit,
            # even of a process the LRU of exits no longer remembers
            s.add("-DTCPSTATES_OWNER_SLOT_PER_PID=1")
        # exec renames a process: its owner entries' names are read again at its next send/recv
        if tracefs is not None and (tracefs / "events" / "sched" / "sched_process_exec" / "format").is_file():
            s.add("-DTCPSTATES_OWNER_EXEC=1")
        else:
            s.missing.append("sched:sched_process_exec: an owner that execs keeps its old name")
    elif s.io:
        s.missing.append("sched:sched_process_exit with group_dead (Linux >= 6.13): a socket a "
                         "second holder closes after its I/O owner exited keeps naming that owner")
    exit_ret = _field_offsets(tracefs, ACCEPT_TRACEPOINTS, {"ret": 8})
    if exit_ret is None:
        s.missing.append("syscalls:sys_exit_accept/accept4 tracepoints (CONFIG_FTRACE_SYSCALLS): "
                         "accepted sockets are named only once used")
        return s
    try:
        s.add(*_offsets(btf, FD_FIELDS, SIZES), "-DTCPSTATES_OWNER_ACCEPT=1",
              f"-DTCPSTATES_TP_EXIT_RET={exit_ret['ret']}")
        s.accept = True
    except BTFError as exc:
        s.missing.append(f"file offsets in BTF ({exc}): accepted sockets are named only once used")
        return s
    if close:
        _closes(s, btf, tracefs)
    else:
        s.missing.append(CLOSE_OFF)
    return s


def home_netns() -> int:
    """The inode of this process's network namespace (0 when not known)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def _netns(s: OwnerSupport, btf: BTF) -> None:
    """Mark records with no owner whose socket is in another network namespace:
    the listeners and the /proc snapshot user space reads are this namespace's only."""
    home = home_netns()
    try:
        fields = _offsets(btf, NETNS_FIELDS, SIZES) if home else []
    except BTFError as exc:
        fields, why = [], f"{exc}"
    else:
        why = "/proc/self/ns/net unreadable"
    if not fields:
        s.missing.append(f"network namespace of a socket ({why}): a connection in another "
                         f"namespace queued on a listener may be named after a listener on the "
                         f"same port in this one")
        return
    s.netns = True
    s.add(*fields, f"-DTCPSTATES_OWNER_HOME_NETNS={home}U")


def _closes(s: OwnerSupport, btf: BTF, tracefs: Path | None) -> None:
    """Watch close(): an accepter that hands a socket on (SCM_RIGHTS, fork) and
    closes its descriptor stops being named for it."""
    fd = _field_offsets(tracefs, CLOSE_TRACEPOINTS, {"fd": 8})
    try:
        fields = _offsets(btf, CLOSE_FIELDS, SIZES) + _file_refs(btf) if fd is not None else []
    except BTFError:
        fields = []
    if not fields or fd is None:
        s.missing.append("syscalls:sys_enter_close tracepoint or file/inode offsets in BTF: an "
                         "accepter that hands a socket on and closes its copy stays named until "
                         "the new holder uses it")
        return
    s.closes = True
    s.add(*fields, "-DTCPSTATES_OWNER_CLOSE=1", f"-DTCPSTATES_TP_CLOSE_FD={fd['fd']}")


def _file_refs(btf: BTF) -> list[str]:
    """The offset of struct file's reference count and what one reference reads as."""
    for member, one in FILE_REFS:
        try:
            off, size = btf.member("file", member)
        except BTFError:
            continue
        if size != SIZES["FILE_F_REF"]:
            raise BTFError(f"file.{member} is {size} bytes, expected {SIZES['FILE_F_REF']}")
        return [f"-DTCPSTATES_OFF_FILE_F_REF={off}", f"-DTCPSTATES_FILE_REF_ONE={one}"]
    raise BTFError("struct file has neither f_ref nor f_count")


def _io_socket_type(s: OwnerSupport, btf: BTF, *, raw: bool) -> None:
    """What the send/recv probes read of the socket itself (sk_protocol and
    sk_type, from BTF). raw: attach them as raw tracepoints, which the kernel
    calls without first filling the perf-event record of every send/recv on
    the host, and which need both offsets. Otherwise (perf-event tracepoints)
    the record gives family and protocol but not the type: a raw IPPROTO_TCP
    socket (any user's, in a user namespace of their own) passes both, so the
    type is read too where BTF gives it."""
    try:
        fields = _offsets(btf, RAW_IO_FIELDS, SIZES)
    except BTFError as exc:
        # the raw form falls back to the perf-event one, which then lacks the type too
        s.missing.append(f"sock.sk_protocol/sk_type in BTF ({exc}): " + (
            "send/recv probes attach as perf-event tracepoints (more kernel time per send/recv) and " if raw else
            "the perf-event send/recv probes ") + "cannot tell a raw IPPROTO_TCP socket from TCP "
            "(its sends can evict owners)")
        return
    if raw:
        s.io_raw = True
        s.add("-DTCPSTATES_OWNER_IO_RAW=1")
    s.add(*fields)

