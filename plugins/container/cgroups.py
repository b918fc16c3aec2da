"""What a cgroup path says about its process: container, runtime, pod, QoS, unit.

`classify(path)` takes one cgroup path (the v2 line of /proc/PID/cgroup, or
the v1 hierarchy's path) and returns a CgroupInfo. Nested runtimes (kind,
minikube: a container inside a container) yield the innermost container.
Known false positives are rejected: session-N.scope and vte-spawn-*.scope are
units, not containers; *.mount units and the conmon monitor processes of
podman and cri-o are not containers either.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

HEX64 = r"[0-9a-f]{64}"
UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"

# (runtime, regex on one path component) — systemd-driver scope names first.
_SCOPES = [
    ("docker", re.compile(rf"^docker-({HEX64})\.scope$")),
    ("containerd", re.compile(rf"^cri-containerd-({HEX64})\.scope$")),
    ("cri-o", re.compile(rf"^crio-({HEX64})\.scope$")),
    ("podman", re.compile(rf"^libpod-({HEX64})\.scope$")),
    ("nerdctl", re.compile(rf"^nerdctl-({HEX64})\.scope$")),
]
_CONMON = re.compile(rf"^(crio-conmon|libpod-conmon)-{HEX64}\.scope$")
_BARE_ID = re.compile(rf"^({HEX64})$")
_POD = re.compile(rf"^(?:(?:kubelet-)?kubepods-(?:burstable-|besteffort-)?)?pod({UUID})(?:\.slice)?$")
_LXC = re.compile(r"^lxc\.payload\.(.+)$")
_UNIT = re.compile(r"^(.+\.(?:service|scope))$")
_NOT_A_CONTAINER_UNIT = re.compile(r"^(session-\d+\.scope|vte-spawn-.+\.scope|.+\.mount)$")


@dataclasses.dataclass(frozen=True)
class CgroupInfo:
    path: str
    container_id: str | None = None
    runtime: str | None = None
    pod_uid: str | None = None
    pod_qos: str | None = None
    systemd_unit: str | None = None

    def fields(self) -> dict[str, str]:
        out = {"cgroup": self.path}
        for key in ("container_id", "runtime", "pod_uid", "pod_qos", "systemd_unit"):
            value = getattr(self, key)
            if value is not None:
                out["container_runtime" if key == "runtime" else key] = value
        return out


def classify(path: str) -> CgroupInfo:
    parts = [p for p in path.split("/") if p]
    container = runtime = pod = qos = unit = None
    in_kubepods = False
    for i, part in enumerate(parts):
        if _CONMON.match(part):
            # the monitor of a container, not the container: what was found
            # above it still stands, but this process is not in a container
            container = runtime = None
            break
        matched = False
        for name, rx in _SCOPES:
            m = rx.match(part)
            if m:
                container, runtime, matched = m.group(1), name, True
                break
        if matched:
            continue
        if part.startswith(("kubepods", "kubelet-kubepods")) and not _POD.match(part):
            in_kubepods = True
            if "burstable" in part:
                qos = "burstable"
            elif "besteffort" in part:
                qos = "besteffort"
            continue
        if in_kubepods and part in ("burstable", "besteffort"):   # cgroupfs driver
            qos = part
            continue
        m = _POD.match(part)
        if m and in_kubepods:
            pod = m.group(1).replace("_", "-")
            qos = qos or "guaranteed"
            continue
        m = _BARE_ID.match(part)
        if m:
            # cgroupfs driver: /docker/<id>, /kubepods/.../pod<uid>/<id>,
            # /system.slice/containerd.service/<ns>/<id>, nerdctl's /default/<id>
            parent = parts[i - 1] if i else ""
            container = m.group(1)
            runtime = ("docker" if parent == "docker" else
                       "cri" if in_kubepods else
                       "containerd" if parent in ("default", "k8s.io", "moby") else
                       "nerdctl" if parent == "nerdctl" else "unknown")
            continue
        m = _LXC.match(part)
        if m or (part == "lxc" and i + 1 < len(parts)):
            container = m.group(1) if m else parts[i + 1]
            runtime = "lxc"
            continue
        m = _UNIT.match(part)
        if m and not part.startswith(("docker-", "cri-containerd-", "crio-", "libpod-", "nerdctl-")):
            unit = m.group(1)
    if container is None:
        pod = pod if in_kubepods else None
    if container is not None and unit is not None and _NOT_A_CONTAINER_UNIT.match(unit):
        unit = None
    return CgroupInfo(path=path, container_id=container, runtime=runtime,
                      pod_uid=pod, pod_qos=qos if pod else None,
                      systemd_unit=unit if container is None else None)


def proc_cgroup_path(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The process's cgroup path: the v2 entry if any, else the most telling v1 one."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None   # exited: not an error
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            if path not in ("/", ""):
                return path
            v2 = path
            continue
        v1[controllers] = path
    for key in ("name=systemd", "pids", "memory", "cpu,cpuacct", "cpu"):
        if key in v1 and v1[key] not in ("/", ""):
            return v1[key]
    return next(iter(v1.values()), None) if v1 else v2


def cgroup2_root() -> Path | None:
    """Where cgroup v2 is mounted: /sys/fs/cgroup (unified) or .../unified (hybrid)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


class CgroupIdResolver:
    """cgroup v2 id (the kernfs inode number bpf_get_current_cgroup_id gives) → path.

    Lets an event whose process already exited still be attributed. The
    directory walk is done lazily, once per unknown id, bounded in size.
    """

    LIMIT = 65536

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cgroup2_root()
        self.paths: dict[int, str] = {}

    def _walk(self) -> None:
        if self.root is None:
            return
        self.paths.clear()
        root = str(self.root)
        for dirpath, _dirs, _files in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            self.paths[ino] = dirpath[len(root):] or "/"
            if len(self.paths) >= self.LIMIT:
                break

    def path(self, cgroup_id: int) -> str | None:
        if cgroup_id in self.paths:
            return self.paths[cgroup_id]
        self._walk()
        return self.paths.get(cgroup_id)
