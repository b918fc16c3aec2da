"""The `workload` filter: keep events by the owner's container, pod, names or unit.

Runs after the `container` enricher (required). Every criterion given must
match (AND); within one criterion any value may match (OR). Names, units and
images match as shell globs; an event whose field is unknown never matches a
criterion on that field — unknown stays unknown, also for `exclude`, which
only inverts the result.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

from tcpstates.api import Filter
from tcpstates.events import Event
from tcpstates.options import option
from tcpstates.text import refuse_lone_backslash

# option name → event field matched as glob
_GLOBS = {"namespace": "k8s_namespace", "pod": "k8s_pod", "container": "k8s_container|container_name",
          "image": "container_image", "systemd_unit": "systemd_unit"}


@dataclasses.dataclass
class WorkloadOptions:
    container_id: list[str] = option([], "keep owners in containers whose id starts with one of these")
    pod_uid: list[str] = option([], "keep owners in these Kubernetes pods (by UID)")
    runtime: list[str] = option([], "keep owners in containers of these runtimes (docker, containerd, ...)")
    namespace: list[str] = option([], "keep owners in these Kubernetes namespaces (shell globs)")
    pod: list[str] = option([], "keep owners in Kubernetes pods with these names (shell globs)")
    container: list[str] = option([], "keep owners in containers with these names: Kubernetes container "
                                  "name or Docker/Podman name (shell globs)")
    image: list[str] = option([], "keep owners in containers of these images (shell globs, e.g. \"nginx:*\")")
    systemd_unit: list[str] = option([], "keep owners in these systemd units (shell globs)")
    delegated: bool = option(False, "also match containers in cgroup subtrees delegated to a user "
                             "(rootless containers: their ids and names are that user's word)")
    exclude: bool = option(False, "invert: drop the matching events instead")

    def validate(self) -> None:
        if not any((self.container_id, self.pod_uid, self.runtime, self.namespace, self.pod, self.container,
                    self.image, self.systemd_unit)):
            raise ValueError("give container_id, pod_uid, runtime, namespace, pod, container, image or "
                             "systemd_unit")
        if any(not p for p in self.container_id):
            raise ValueError("container_id: empty prefix would match every container")
        for opt in _GLOBS:
            refuse_lone_backslash(opt, getattr(self, opt))


def _glob(values: list[str], patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(v, p) for v in values for p in patterns)


class WorkloadFilter(Filter):
    """Keep events by the owner's container, pod, names, image or systemd unit (after `container`)."""

    name = "workload"
    description = "keep events by container id/name/image, Kubernetes namespace/pod/UID, runtime or unit"
    Options = WorkloadOptions
    requires = ("owner", "container")

    def __init__(self, options: Any, context: Any) -> None:
        super().__init__(options, context)
        self._globs = [(fields.split("|"), getattr(options, opt)) for opt, fields in _GLOBS.items()
                       if getattr(options, opt)]

    def keep(self, event: Event) -> bool:
        o, x = self.options, event.extra
        cid = x.get("container_id")
        if x.get("container_delegated_uid") is not None and not o.delegated:
            return o.exclude   # never matches: a user could have named it anything
        match = ((not o.container_id or (cid is not None and cid.startswith(tuple(o.container_id)))) and
                 (not o.pod_uid or x.get("pod_uid") in o.pod_uid) and
                 (not o.runtime or x.get("container_runtime") in o.runtime))
        for fields, patterns in self._globs:
            if not match:
                break
            values = [x[f] for f in fields if isinstance(x.get(f), str)]
            match = _glob(values, patterns)
        return match != o.exclude
