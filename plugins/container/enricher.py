"""The `container` enricher: which container (or systemd unit) owns the socket.

Identity, never a bare PID: the owner's cgroup id captured in the kernel in
the owner's own context (`owner_cgroup_id` from the `owner` enricher) is the
first key. Resolved to a path through the kernel (cgroups.CgroupIdResolver),
classified (layouts.classify), cached per id; an id that cannot be resolved
(the cgroup is gone) is remembered as such — no tree walk per event.

The id alone does not tell where v1 hierarchies exist (hybrid or v1 hosts:
the v2 line may name only containerd.service, or the root). There, and when
the owner came from /proc at start (no id), the owner's /proc/PID is read
through one directory descriptor and cached by (PID, start time); a process
that started after the event is another process that reused the PID, and
gets nothing; and when the event names the owner's start time
(`owner_start`), a process with another start time is another process —
the owner exited and its PID was reused, even before the event — and gets
nothing either. Only what the v2 path of an id says is ever cached by that
id, so one process's v1 container never sticks to another process.

Names (pod, namespace, container, image) come from the runtimes' files on
the node (metadata.py) and, for Docker, the Engine socket when present.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tcpstates import speedups
from tcpstates.api import Enricher, RunContext
from tcpstates.events import Event
from tcpstates.options import option
from tcpstates.plugins.container.cgroups import (CLK_TCK, LRU, CgroupIdResolver, CgroupInfo, ProcessCgroups, classify,
                                                 classify_proc, host_is_v1_or_hybrid, read_process)
from tcpstates.plugins.container.docker_api import DockerNames
from tcpstates.plugins.container.metadata import MetadataRoots, RuntimeMetadata

TICK_NS = 10_000_000     # /proc start times have clock-tick (10 ms) resolution


# the value types a per-batch memo key may hold (see _lookup_in_batch)
_ID_TYPES = (int, type(None))

_c_enrich = speedups.load("tcpstates.plugins.container._enrich")   # optional (setup.py); the Python path is the reference
C_ENRICH_AVAILABLE = _c_enrich is not None


@dataclasses.dataclass
class ContainerOptions:
    cache_size: int = option(16384, "processes and cgroups remembered", min=16, max=1 << 20)
    cgroup_path: bool = option(True, "also add the raw cgroup path as `cgroup`")
    names: bool = option(True, "add Kubernetes/Docker/Podman names and images from the runtimes' files")
    docker_socket: str = option("/var/run/docker.sock", "Docker Engine API socket for container "
                                "name and image when Docker's files are not readable (\"\" disables)")
    containerd_root: str = option("/run/containerd/io.containerd.runtime.v2.task",
                                  "containerd's task state dir (OCI bundles: <ns>/<id>/config.json)")
    storage_roots: list[str] = option(["/run/containers/storage", "/var/lib/containers/storage"],
                                      "containers/storage roots of CRI-O and podman")
    docker_root: str = option("/var/lib/docker", "Docker's data root (containers/<id>/config.v2.json)")
    proc: str = option("/proc", "procfs of the host (e.g. /host/proc in a pod without hostPID)")
    hybrid: str = option("auto", "does the host have cgroup v1 hierarchies (then /proc/PID/cgroup is read "
                         "even when the v2 id resolves)", choices=("auto", "yes", "no"))


class ContainerEnricher(Enricher):
    """Adds container_id, container_runtime, pod_uid, pod_qos or systemd_unit, and names."""

    name = "container"
    description = "container id/runtime/name/image, Kubernetes namespace/pod/container, or systemd unit"
    Options = ContainerOptions
    requires = ("owner",)

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        from pathlib import Path
        self.proc = Path(options.proc)
        self.by_cgroup: LRU = LRU(options.cache_size)
        self.by_identity: LRU = LRU(options.cache_size)
        self.resolver = CgroupIdResolver(limit=options.cache_size)
        self.hybrid = host_is_v1_or_hybrid(str(self.proc / "self" / "cgroup")) if options.hybrid == "auto" \
            else options.hybrid == "yes"
        self.docker = DockerNames(options.docker_socket) if options.docker_socket and options.names else None
        self.metadata = RuntimeMetadata(MetadataRoots(options.containerd_root, tuple(options.storage_roots),
                                                      options.docker_root), limit=options.cache_size) \
            if options.names else None
        # CLOCK_BOOTTIME (where /proc start times live) minus CLOCK_MONOTONIC (event times)
        self.boot_offset = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
        self._batch: dict[int, ProcessCgroups | None] | None = None    # per-batch memo, in enrich_batch only
        # per-batch memo of the fields each cgroup gives (enrich_batch only)
        self._fields_memo: dict[int, tuple[CgroupInfo, dict[str, str]]] | None = None
        # per-batch memo of lookup() per (pid, cgroup id), with the event time it was made for
        self._lookup_memo: dict[tuple[Any, Any, Any], tuple[CgroupInfo, int]] | None = None
        # per-batch: owner key -> (event time its lookup was made for, the fields it gives)
        self._hits: dict[tuple[Any, Any, Any], tuple[int, dict[str, str]]] | None = None
        self.use_c = True

    # -- resolution --------------------------------------------------------------------
    def _by_id(self, cgroup_id: int) -> CgroupInfo | None:
        info = self.by_cgroup.get(cgroup_id)
        if info is None and cgroup_id not in self.by_cgroup:
            path = self.resolver.path(cgroup_id)
            info = classify(path) if path is not None else None
            self.by_cgroup.put(cgroup_id, info)     # None too: the negative cache
        return info

    def _process(self, pid: int) -> ProcessCgroups | None:
        # one read per PID per batch: a PID cannot be reused in between and matter
        memo = self._batch
        if memo is None:
            return read_process(pid, self.proc)
        if pid not in memo:
            memo[pid] = read_process(pid, self.proc)
        return memo[pid]

    def _by_process(self, pid: int, event_ns: int, start: int | None = None) -> CgroupInfo | None:
        if start is not None and (pid, start) in self.by_identity:
            # the kernel named the owner's start time: this identity was read
            # from /proc before, and a PID with that start time is that process
            # (no re-read per batch, and still known after it exits)
            if start * 1_000_000_000 // CLK_TCK > event_ns + self.boot_offset + TICK_NS:
                return None                           # started after the event
            return self.by_identity[(pid, start)]
        p = self._process(pid)
        if p is None:
            return None
        if p.started_ns() > event_ns + self.boot_offset + TICK_NS:
            return None                               # started after the event: the PID was reused
        if start is not None and p.start_ticks != start:
            # not the process the event names: the owner exited and its PID was
            # reused (possibly before the event, e.g. an owner the kernel still
            # remembers for a socket a child inherited)
            return None
        key = p.identity
        if key in self.by_identity:
            return self.by_identity[key]
        info = classify_proc(p.text)
        self.by_identity.put(key, info)
        return info

    def lookup(self, pid: int | None, cgroup_id: int | None, event_ns: int = 0,
               start: int | None = None) -> CgroupInfo | None:
        """The owner's cgroup info: by the kernel's cgroup id, else (or on v1 and
        hybrid hosts) by the process `pid` — only if it started by the event's
        time and, when `start` (owner_start, clock ticks) is given, at that time."""
        info = self._by_id(cgroup_id) if cgroup_id else None
        if info is not None and (info.telling or not self.hybrid):
            return info
        if not self.hybrid and cgroup_id:
            return None                               # v2 only: the id was the whole truth, and it is gone
        if isinstance(pid, int) and pid > 0:
            by_pid = self._by_process(pid, event_ns, start)
            if by_pid is not None and (info is None or by_pid.telling):
                return by_pid
        return info

    # -- the stage ---------------------------------------------------------------------
    def _names(self, info: CgroupInfo) -> dict[str, str]:
        if info.container_id is None or info.runtime in ("lxc", "systemd-nspawn") or info.delegated_uid:
            # a user-delegated subtree's id is that user's word: never look it up in the
            # (rootful) runtimes' files, where it could borrow a real container's names
            return {}
        names = self.metadata.lookup(info.container_id, None if info.runtime in ("cri", "unknown")
                                     else info.runtime) if self.metadata else {}
        if not names and self.docker is not None and info.runtime in ("docker", "unknown"):
            names = self.docker.lookup(info.container_id) or {}
        return dict(names)           # a copy: the caller edits it, the cache keeps its own

    @staticmethod
    def _owner_ids(event: Event) -> tuple[Any, Any, Any]:
        """The owner's PID, cgroup id (the on-CPU task's cgroup when that
        task is the owner and the kernel captured none for the owner) and
        start time (None when not known)."""
        extra = event.extra
        pid = extra.get("owner_pid")
        cgroup_id = extra.get("owner_cgroup_id")
        if not cgroup_id and pid is not None and pid == event.pid:
            cgroup_id = event.cgroup_id
        return pid, cgroup_id, extra.get("owner_start")

    def enrich(self, event: Event) -> None:
        extra = event.extra
        pid, cgroup_id, start = self._owner_ids(event)
        info = self._lookup_in_batch(pid, cgroup_id, event.ts_ns, start)
        if info is None:
            return
        # a batch's events mostly share a few cgroups: their fields (names
        # read from the runtimes' files) are made once per cgroup and batch.
        # Keyed by identity, with the info kept alive so the id stays its own.
        memo = self._fields_memo
        if memo is not None:
            hit = memo.get(id(info))
            if hit is not None:
                extra.update(hit[1])
                return
        fields = self._fields(info)
        if memo is not None:
            memo[id(info)] = (info, fields)
        extra.update(fields)

    def _lookup_in_batch(self, pid: Any, cgroup_id: Any, event_ns: int, start: Any = None) -> CgroupInfo | None:
        """lookup(), remembered for the batch per (pid, cgroup id, start): a process
        found for an event is the same process for any later event of the
        batch (it had started by the earlier one), so only a later event
        reuses an answer; an earlier one, or a miss, asks again."""
        memo = self._lookup_memo
        # only what the kernel gives (ints or nothing): a replayed 1.0 or True
        # equals 1 as a key but is not that process
        if type(start) not in _ID_TYPES:
            start = None                              # not a start time the owner stage makes
        if memo is None or type(pid) not in _ID_TYPES or type(cgroup_id) not in _ID_TYPES:
            return self.lookup(pid, cgroup_id, event_ns, start)
        key = (pid, cgroup_id, start)
        hit = memo.get(key)
        if hit is not None and event_ns >= hit[1]:
            return hit[0]
        info = self.lookup(pid, cgroup_id, event_ns, start)
        if info is not None:
            memo[key] = (info, event_ns)
        return info

    def _fields(self, info: CgroupInfo) -> dict[str, str]:
        """The fields `info` gives an event (never edited afterwards: shared)."""
        fields = info.fields()
        if not self.options.cgroup_path:
            fields.pop("cgroup", None)
        names = self._names(info)
        if names:
            runtime = names.pop("runtime", None)
            if runtime and fields.get("container_runtime") in ("cri", "unknown"):
                fields["container_runtime"] = runtime
            fields.update(names)
        return fields

    def enrich_batch(self, batch: list[Event]) -> None:
        """enrich() for each event, through a per-batch memo of the fields each
        owner key gets: at a busy server's rate most events of a batch share a
        few owners, and the per-event work is one lookup and one merge (in C
        where built: _enrich.c)."""
        self._batch, self._fields_memo, self._lookup_memo, self._hits = {}, {}, {}, {}
        try:
            if _c_enrich is not None and self.use_c:
                _c_enrich.enrich(batch, self._hits, self._enrich_one)
                return
            hits, id_types, owner_ids, one = self._hits, _ID_TYPES, self._owner_ids, self._enrich_one
            for e in batch:
                key = owner_ids(e)
                if type(key[0]) in id_types and type(key[1]) in id_types and type(key[2]) in id_types:
                    hit = hits.get(key)
                    if hit is not None and type(e.ts_ns) is int and type(hit[0]) is int and e.ts_ns >= hit[0]:
                        e.extra.update(hit[1])
                        continue
                one(e)
        finally:
            self._batch = self._fields_memo = self._lookup_memo = self._hits = None

    def _enrich_one(self, e: Event) -> None:
        """enrich() for an event the batch's hits did not answer; remembers the
        answer (with the event time its lookup was made for) for later events."""
        pid, cgroup_id, start = self._owner_ids(e)
        if type(pid) not in _ID_TYPES or type(cgroup_id) not in _ID_TYPES or type(start) not in _ID_TYPES:
            self.enrich(e)               # not what the kernel gives: no memo
            return
        info = self._lookup_in_batch(pid, cgroup_id, e.ts_ns, start)
        if info is None:
            return
        made = self._fields_memo
        assert made is not None and self._lookup_memo is not None and self._hits is not None
        fields = made.get(id(info))
        if fields is None:
            fields = made[id(info)] = (info, self._fields(info))
        e.extra.update(fields[1])
        key = (pid, cgroup_id, start)
        self._hits[key] = (self._lookup_memo[key][1], fields[1])
