"""How the state-change program attaches to sock:inet_sock_set_state.

Two forms of the same program (bpf/tcpstates.bpf.c):

- raw tracepoint (`-DTCPSTATES_STATE_RAW`): the kernel calls the program
  with the tracepoint's arguments (the socket, old and new state) without
  first filling a perf-event record; the program reads the record's fields
  (ports, addresses, family, protocol) from the socket itself, at the byte
  offsets of the running kernel's BTF (never a header tree's). Its only
  reason to skip a hit is its own nesting on a CPU. The perf-event form
  shares one per-CPU "a BPF program is running" guard with every kprobe and
  perf-event tracepoint program on the host (ours for the owner's close(),
  accept and exit probes, and other tools'): a state change in a softirq that
  interrupts any of them is skipped (counted as a kernel miss).
- perf-event tracepoint (`TRACEPOINT_PROBE`): the tracepoint's own fields,
  for kernels without BTF (or with a layout these members are not found in).

`attach = "auto"` (the kernel stage's option) takes the raw form wherever
BTF gives every offset; `"tracepoint"` keeps the perf-event form.
"""

from __future__ import annotations

import dataclasses

from tcpstates.btf import VMLINUX, BTF, BTFError, offset_cflags

PROG_RAW = b"raw_tracepoint__inet_sock_set_state"
# the raw form's second program: it runs a state change the kernel skipped the
# main program for (nested on its CPU); attached after it by the loader
PROG_RESCUE = b"tcpstates_rescue"
PROG_TRACEPOINT = b"tracepoint__sock__inet_sock_set_state"
RAW_TRACEPOINT = b"inet_sock_set_state"

# what TP_fast_assign of sock:inet_sock_set_state reads (include/trace/events/sock.h)
FIELDS = {
    "SOCK_SK_PROTOCOL": ("sock", "sk_protocol"),
    "SOCK_SKC_FAMILY": ("sock", "__sk_common.skc_family"),
    "SOCK_SKC_DPORT": ("sock", "__sk_common.skc_dport"),
    "SOCK_SKC_DADDR": ("sock", "__sk_common.skc_daddr"),
    "SOCK_SKC_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "SOCK_SKC_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    "INET_SOCK_SPORT": ("inet_sock", "inet_sport"),
    "INET_SOCK_SADDR": ("inet_sock", "inet_saddr"),
}
SIZES = {"SOCK_SK_PROTOCOL": 2, "SOCK_SKC_FAMILY": 2, "SOCK_SKC_DPORT": 2, "SOCK_SKC_DADDR": 4,
         "SOCK_SKC_V6_DADDR": 16, "SOCK_SKC_V6_RCV_SADDR": 16, "INET_SOCK_SPORT": 2,
         "INET_SOCK_SADDR": 4}


@dataclasses.dataclass
class Attachment:
    raw: bool
    cflags: list[str]
    prog_name: bytes
    why_not: str | None = None     # why the perf-event form, when auto fell back

    @property
    def rescue(self) -> bytes | None:
        return PROG_RESCUE if self.raw else None

    @property
    def slots(self) -> int:
        """Programs with their own per-CPU state (bpf/tcpstates.bpf.c TCPSTATES_SLOTS)."""
        return 2 if self.raw else 1

    @property
    def label(self) -> str:
        return "raw tracepoint" if self.raw else "perf-event tracepoint"


def choose(mode: str = "auto", btf_path: str = VMLINUX) -> Attachment:
    """The attachment for mode (auto, raw, tracepoint). raw that cannot be had
    raises BTFError (the caller turns it into one line and what to do)."""
    if mode == "tracepoint":
        return Attachment(False, [], PROG_TRACEPOINT)
    try:
        cflags = offset_cflags(BTF.from_file(btf_path), FIELDS, SIZES)
    except (OSError, BTFError) as exc:
        why = f"no socket offsets from the kernel's BTF ({btf_path}: {exc})"
        if mode == "raw":
            raise BTFError(why) from None
        return Attachment(False, [], PROG_TRACEPOINT, why)
    return Attachment(True, ["-DTCPSTATES_STATE_RAW=1", *cflags], PROG_RAW)
