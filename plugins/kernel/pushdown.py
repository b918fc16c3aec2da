"""Address and process conditions (AddressRule, ProcessRule) as BPF maps.

The kernel stage tests up to MAX_RULES rules of each kind with one map
lookup per side: each map entry carries a bit mask, bit i set when the entry
matches rule i. The masks of which rules need which side are compile-time
constants (-D switches), so the program decides every rule at once:

    keep rules:  every rule needing side A has its bit in A's mask (same for B)
    drop rules:  for some rule, each side it tests (A, B) has its bit

Address maps are LPM tries keyed by prefix length + a family tag (4 or 6) +
the address; the longest matching entry answers, so each entry's mask is that
of every rule network containing it. An IPv4-mapped IPv6 address is looked
up twice (as IPv6 and as IPv4), as the user-space filter matches it against
both kinds of networks. Process maps: a hash TGID -> mask, and an LPM trie of
command names (a whole name with its NUL, or a prefix glob's bytes) -> mask.

Rules beyond MAX_RULES are not pushed down (dropping fewer events is always
correct: user space still checks every filter).

Duration bounds per old state (the duration filter's max_ms and states) go
into a 16-entry array indexed by the old state: [lo, hi] ns for a known time
in that state (span_plan). A lower bound alone, the same for every state,
stays a -D constant (no map look-up).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

from tcpstates.api import AddressRule, IPNetwork, ProcessRule

MAX_RULES = 8          # bits of the u8 map values
TAGS = {4: 4, 6: 6}    # IP version -> family tag in the key (bytes 4..7)


@dataclasses.dataclass
class MapPlan:
    """What to compile and what to put into which map after load."""

    cflags: list[str] = dataclasses.field(default_factory=list)
    #: map name -> [(key bytes, u8 value or the value's bytes)]
    entries: dict[str, list[tuple[bytes, int | bytes]]] = dataclasses.field(default_factory=dict)


def _masks(sides: list[tuple[bool, bool, bool]]) -> tuple[int, int, int, int, int]:
    """(A keep, B keep, A drop, B drop, drop rules) masks from each rule's
    (tests A, tests B, exclude)."""
    akeep = bkeep = adrop = bdrop = drop = 0
    for i, (a, b, exclude) in enumerate(sides):
        bit = 1 << i
        if exclude:
            drop |= bit
            adrop |= bit if a else 0
            bdrop |= bit if b else 0
        else:
            akeep |= bit if a else 0
            bkeep |= bit if b else 0
    return akeep, bkeep, adrop, bdrop, drop


def lpm_key(net: IPNetwork) -> bytes:
    """struct tcpstates_lpm_key: u32 prefixlen (native order), u32 tag, 16 address bytes."""
    addr = net.network_address.packed.ljust(16, b"\0")
    return struct.pack("=II", 32 + net.prefixlen, TAGS[net.version]) + addr


def _lpm_entries(sets: list[tuple[IPNetwork, ...] | None]) -> list[tuple[bytes, int]]:
    nets = {n for s in sets if s for n in s}
    out = []
    for net in sorted(nets, key=lambda n: (n.version, n.prefixlen, int(n.network_address))):
        mask = 0
        for i, s in enumerate(sets):
            if s and any(n.version == net.version and net.subnet_of(n) for n in s):  # type: ignore[arg-type]
                mask |= 1 << i
        out.append((lpm_key(net), mask))
    return out


def address_plan(rules: tuple[AddressRule, ...] | list[AddressRule]) -> MapPlan:
    rules = list(rules)[:MAX_RULES]
    plan = MapPlan()
    if not rules:
        return plan
    masks = _masks([(r.local is not None, r.remote is not None, r.exclude) for r in rules])
    for side, sets in (("L", [r.local for r in rules]), ("R", [r.remote for r in rules])):
        if any(s is not None for s in sets):
            entries = _lpm_entries(sets)
            plan.cflags += [f"-DTCPSTATES_FILTER_{side}ADDR={max(1, len(entries))}"]
            plan.entries[f"{side.lower()}addr_rules"] = list(entries)
    names = ("LKEEP", "RKEEP", "LDROP", "RDROP", "DROP")
    plan.cflags += [f"-DTCPSTATES_ADDR_{n}={m}" for n, m in zip(names, masks)]
    return plan


def comm_key(name: str, prefix: bool = False) -> bytes:
    """struct tcpstates_comm_key: u32 prefixlen (native order), the name NUL-padded
    to 16 bytes. A whole name's prefix takes its NUL too (`curl` is `curl\\0`,
    never `curly`); a prefix (`ng` of `ng*`) only its own bytes."""
    raw = name.encode()
    return struct.pack("=I", 8 * (len(raw) + (0 if prefix else 1))) + raw.ljust(16, b"\0")


def _comm_entries(rules: list[ProcessRule]) -> list[tuple[bytes, int]]:
    """The LPM entries of every rule's names and prefixes; each entry's mask has
    the bit of every rule that matches whatever the entry matches (the longest
    matching entry answers alone)."""
    def mask(text: str, whole: bool) -> int:
        out = 0
        for i, r in enumerate(rules):
            if (whole and text in (r.comms or ())) or any(text.startswith(p) for p in r.comm_prefixes):
                out |= 1 << i
        return out
    names = {c for r in rules for c in r.comms or ()}
    prefixes = {p for r in rules for p in r.comm_prefixes}
    return ([(comm_key(c), mask(c, True)) for c in sorted(names)] +
            [(comm_key(p, prefix=True), mask(p, False)) for p in sorted(prefixes)])


def process_plan(rules: tuple[ProcessRule, ...] | list[ProcessRule]) -> MapPlan:
    rules = list(rules)[:MAX_RULES]
    plan = MapPlan()
    if not rules:
        return plan
    masks = _masks([(r.pids is not None, r.comms is not None, r.exclude) for r in rules])
    pids: dict[int, int] = {}
    for i, r in enumerate(rules):
        for p in r.pids or ():
            pids[p] = pids.get(p, 0) | 1 << i
    comms = _comm_entries(rules)
    plan.entries["pid_rules"] = [(struct.pack("=I", p), m) for p, m in sorted(pids.items())]
    plan.entries["comm_rules"] = list(comms)
    plan.cflags += [f"-DTCPSTATES_FILTER_PROC={max(1, len(pids), len(comms))}"]
    names = ("PKEEP", "CKEEP", "PDROP", "CDROP", "DROP")
    plan.cflags += [f"-DTCPSTATES_PROC_{n}={m}" for n, m in zip(names, masks)]
    return plan


def comm_lookup(entries: list[tuple[bytes, int | bytes]], comm: bytes) -> int:
    """What the kernel's lookup yields for a raw comm (up to 15 bytes), for the
    tests: the mask of the longest entry whose first prefixlen bits it shares."""
    data = comm[:15].ljust(16, b"\0")
    best = (-1, 0)
    for key, mask in entries:
        plen = struct.unpack("=I", key[:4])[0]
        if data[:plen // 8] == key[4:4 + plen // 8] and plen > best[0]:
            best = (plen, int(mask) if isinstance(mask, int) else 0)
    return best[1]


def rules_pass(a: int, b: int, masks: tuple[int, int, int, int, int]) -> bool:
    """The kernel's test (tcpstates.bpf.c rules_pass), for the tests."""
    akeep, bkeep, adrop, bdrop, drop = masks
    if a & akeep != akeep or b & bkeep != bkeep:
        return False
    return ((a | ~adrop) & (b | ~bdrop) & drop) == 0


def lpm_lookup(entries: list[tuple[bytes, int]], family: int, addr: str) -> int:
    """What the kernel's lookup(s) yield for an address, for the tests: the
    longest matching entry's mask, ORed with the IPv4 one for a mapped address."""
    ip = ipaddress.ip_address(addr)
    keys = [ip]
    if family == 10 and isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        keys.append(ip.ipv4_mapped)
    out = 0
    for k in keys:
        best = (-1, 0)
        for key, mask in entries:
            plen, tag = struct.unpack("=II", key[:8])
            if tag != k.version:
                continue
            net = ipaddress.ip_network((key[8:8 + (4 if tag == 4 else 16)], plen - 32))
            if k in net and plen > best[0]:
                best = (plen, mask)
        out |= best[1]
    return out


def plan(address_rules: tuple[AddressRule, ...], process_rules: tuple[ProcessRule, ...], *,
         connections: bool = False) -> MapPlan:
    """Everything the address and process rules need: cflags and map contents.

    Connection records accumulate every transition of a socket and carry the
    process of its first one: a per-transition drop would falsify both, so in
    that mode these rules stay in user space (as the transition filter does)."""
    out = MapPlan()
    if connections:
        return out
    for part in (address_plan(address_rules), process_plan(process_rules)):
        out.cflags += part.cflags
        out.entries.update(part.entries)
    return out


NSTATES = 16               # entries of span_range (state numbers fit in 4 bits)
SPAN_MAX = (1 << 64) - 2   # the largest known span (all ones means unknown)


def span_plan(min_span_ns: int | None, span_ranges: dict[int, tuple[int, int]] | None) -> MapPlan:
    """struct tcpstates_span_range {u64 lo, hi} per old state, keyed by its
    number; a state no filter judges keeps [min_span_ns or 0, SPAN_MAX].
    Empty when no per-state range is asked for (min_span_ns alone is a -D
    constant, build_cflags)."""
    if not span_ranges:
        return MapPlan()
    floor = min_span_ns or 0
    entries: list[tuple[bytes, int | bytes]] = []
    for state in range(NSTATES):
        lo, hi = span_ranges.get(state, (0, SPAN_MAX))
        entries.append((struct.pack("=I", state),
                        struct.pack("=QQ", min(max(lo, floor), SPAN_MAX), min(max(hi, 0), SPAN_MAX))))
    return MapPlan(cflags=["-DTCPSTATES_FILTER_SPAN=1"], entries={"span_range": entries})
