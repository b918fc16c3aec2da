"""The `container` enricher and the `workload` filter: which container (or systemd unit) owns the socket.

From the owner's cgroup (the `owner` enricher's owner_pid, read from
/proc/PID/cgroup; for a process that has already exited, the cgroup id the
kernel captured in the owner's context, resolved through the cgroup v2
tree) it derives container_id, container_runtime, pod_uid, pod_qos, and for
processes outside containers systemd_unit (see tcpstates.plugins.container.cgroups). Results
are cached with bounded memory; an exited process is not an error.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
from typing import Any

from tcpstates.api import Enricher, Filter, RunContext
from tcpstates.plugins.container.cgroups import CgroupIdResolver, CgroupInfo, classify, proc_cgroup_path
from tcpstates.plugins.container.docker_api import DockerNames
from tcpstates.events import Event
from tcpstates.options import option


@dataclasses.dataclass
class ContainerOptions:
    cache_size: int = option(16384, "processes and cgroups remembered", min=16, max=1 << 20)
    cgroup_path: bool = option(True, "also add the raw cgroup path as `cgroup`")
    docker_socket: str = option("/var/run/docker.sock", "Docker Engine API socket for container "
                                "name and image (skipped when absent; \"\" disables)")


class _Lru(collections.OrderedDict):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)


class ContainerEnricher(Enricher):
    """Adds container_id, container_runtime, pod_uid, pod_qos or systemd_unit."""

    name = "container"
    description = "container id/runtime, Kubernetes pod UID and QoS, or systemd unit of the owner"
    Options = ContainerOptions
    requires = ("owner",)

    def __init__(self, options: Any, context: RunContext) -> None:
        super().__init__(options, context)
        self.by_pid: _Lru = _Lru(options.cache_size)
        self.by_cgroup: _Lru = _Lru(options.cache_size)
        self.resolver = CgroupIdResolver()
        self.docker = DockerNames(options.docker_socket) if options.docker_socket else None

    def lookup(self, pid: int | None, cgroup_id: int | None) -> CgroupInfo | None:
        if pid:
            info = self.by_pid.get(pid)
            if info is not None:
                return info
            path = proc_cgroup_path(pid)
            if path is not None:
                info = classify(path)
                self.by_pid.put(pid, info)
                if cgroup_id:
                    self.by_cgroup.put(cgroup_id, info)
                return info
        if cgroup_id:
            info = self.by_cgroup.get(cgroup_id)
            if info is None:
                path = self.resolver.path(cgroup_id)
                if path is not None:
                    info = classify(path)
                    self.by_cgroup.put(cgroup_id, info)
            return info
        return None

    def enrich(self, event: Event) -> None:
        extra = event.extra
        info = self.lookup(extra.get("owner_pid"), extra.get("owner_cgroup_id"))
        if info is not None:
            fields = info.fields()
            if not self.options.cgroup_path:
                fields.pop("cgroup", None)
            if self.docker is not None and info.runtime == "docker" and info.container_id:
                names = self.docker.lookup(info.container_id)
                if names:
                    fields.update(names)
            extra.update(fields)

    def forget(self, pid: int) -> None:
        self.by_pid.pop(pid, None)


@dataclasses.dataclass
class ContainerFilterOptions:
    container_id: list[str] = option([], "keep owners in containers whose id starts with one of these")
    pod_uid: list[str] = option([], "keep owners in these Kubernetes pods")
    systemd_unit: list[str] = option([], "keep owners in these systemd units (shell globs allowed)")
    runtime: list[str] = option([], "keep owners in containers of these runtimes (docker, containerd, ...)")
    exclude: bool = option(False, "invert: drop the matching events instead")

    def validate(self) -> None:
        if not (self.container_id or self.pod_uid or self.systemd_unit or self.runtime):
            raise ValueError("give container_id, pod_uid, systemd_unit or runtime")
        if any(not p for p in self.container_id):
            raise ValueError("container_id: empty prefix would match every container")


class WorkloadFilter(Filter):
    """Keep events by the owner's container, pod or systemd unit (after `container`)."""

    name = "workload"
    description = "keep events by container id prefix, pod UID, systemd unit or runtime"
    Options = ContainerFilterOptions
    requires = ("owner", "container")

    def keep(self, event: Event) -> bool:
        o, x = self.options, event.extra
        cid = x.get("container_id")
        match = ((not o.container_id or (cid is not None and cid.startswith(tuple(o.container_id)))) and
                 (not o.pod_uid or x.get("pod_uid") in o.pod_uid) and
                 (not o.runtime or x.get("container_runtime") in o.runtime) and
                 (not o.systemd_unit or any(fnmatch.fnmatchcase(x.get("systemd_unit") or "", u)
                                            for u in o.systemd_unit)))
        return match != o.exclude
