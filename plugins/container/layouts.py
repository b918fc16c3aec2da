"""What a cgroup path says about its process: container, runtime, pod, QoS, unit.

`classify(path)` reads one cgroup path; `classify_proc(text)` reads the whole
/proc/PID/cgroup text of a v1, v2 or hybrid host and picks the line that
names the container. Every layout the runtimes document is a row of
docs/containers.md, with the source it comes from and a test per row
(tests/test_cgroups.py).

Rules (the research notes behind them are cited in docs/containers.md):

* Parts are scanned from the RIGHT: the innermost container wins (kind,
  minikube, docker-in-docker), and what a container creates below itself
  (crun's `container`, nspawn's `payload`, an inner systemd's units) is
  skipped because it matches no container pattern.
* `..` parts (a reader in a private cgroup namespace) are dropped.
* The monitor processes (conmon, lxc.monitor) are not the container.
* A bare 64-hex part names a container only under a parent that says which
  runtime made it (docker, a containerd namespace, a pod); elsewhere its
  runtime stays "unknown" and the metadata probe may tell.
* The colon form `<slice>:<prefix>:<id>` appears as a literal directory name
  when a systemd-style cgroupsPath reaches runc's cgroupfs driver (kubelet on
  systemd, containerd on cgroupfs); it is read like the scope it stands for.
"""

from __future__ import annotations

import dataclasses
import re

from tcpstates.text import escape_name

HEX64 = r"[0-9a-f]{64}"
UID = r"(?:[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})"

# systemd-driver scope prefixes (and the colon form's middle field) → runtime
_PREFIX_RUNTIME = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o",
                   "libpod": "podman", "nerdctl": "nerdctl"}
_SCOPE = re.compile(rf"^(docker|cri-containerd|crio|libpod|nerdctl)-({HEX64})\.scope$")
_COLON = re.compile(rf"^([^:]*\.slice):(docker|cri-containerd|crio|libpod|nerdctl):({HEX64})$")
_CRIO_CGROUPFS = re.compile(rf"^crio-({HEX64})$")                     # CRI-O, cgroupfs driver
_LIBPOD_CGROUPFS = re.compile(rf"^libpod-(?:payload-)?({HEX64})$")    # podman cgroupfs, split mode
_CONMON = re.compile(rf"^(?:crio-conmon|libpod-conmon)-{HEX64}(?:\.scope)?$")
_BARE = re.compile(rf"^({HEX64})$")
_LXC_PAYLOAD = re.compile(r"^lxc\.payload\.(.+)$")
_LXC_MONITOR = re.compile(r"^lxc\.monitor\.(.+)$")
_MACHINE = re.compile(r"^machine-(.+)\.scope$")
_NSPAWN_UNIT = re.compile(r"^systemd-nspawn@(.+)\.service$")
_POD_SYSTEMD = re.compile(rf"^(?:[a-z0-9_]+-)*kubepods(?:-(besteffort|burstable))?-pod({UID})\.slice$")
_POD_CGROUPFS = re.compile(rf"^pod({UID})$")
_PODMAN_POD = re.compile(rf"^(?:[a-z0-9_]+-)*libpod_pod_({HEX64})\.slice$")
_UNIT = re.compile(r"^.+\.(?:service|scope)$")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_CONTAINERD_NAMESPACES = frozenset({"default", "k8s.io", "moby"})


@dataclasses.dataclass(frozen=True)
class CgroupInfo:
    """What one cgroup path names; None means "not named here", never a guess."""

    path: str
    container_id: str | None = None
    runtime: str | None = None
    pod_uid: str | None = None
    pod_qos: str | None = None
    systemd_unit: str | None = None
    container_name: str | None = None     # only where the path itself carries it (lxc, nspawn)
    podman_pod_id: str | None = None
    # the container lies in a cgroup subtree systemd delegated to this user
    # (user@UID.service): rootless containers live there, and so does anything
    # that user chose to name like a container. Its id is the user's word only.
    delegated_uid: str | None = None

    @property
    def telling(self) -> bool:
        """Does it name a container or a pod (not just a unit)?"""
        return self.container_id is not None or self.pod_uid is not None or self.podman_pod_id is not None

    def fields(self) -> dict[str, str]:
        # names taken from the path (an LXC or nspawn container's name, a unit
        # unescaped from systemd's \\xNN) are escaped as every name in an event
        # is; the path itself stays as the kernel gives it (a structured field,
        # never put into a line of text)
        out = {"cgroup": self.path}
        for key in ("container_id", "runtime", "pod_uid", "pod_qos", "systemd_unit", "container_name",
                    "podman_pod_id", "delegated_uid"):
            value = getattr(self, key)
            if value is not None:
                out[{"runtime": "container_runtime", "delegated_uid": "container_delegated_uid"}.get(key, key)] = \
                    escape_name(value) if isinstance(value, str) else value
        return out


def _unescape(name: str) -> str:
    """systemd's unit_name_escape turns `-` into `\\x2d`; put characters back."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


def _container_at(parts: list[str], i: int) -> tuple[str, str | None, str | None] | None:
    """(container id, runtime, name) if part i names a container, else None."""
    part = parts[i]
    parent = parts[i - 1] if i else ""
    m = _SCOPE.match(part)
    if m:
        return m.group(2), _PREFIX_RUNTIME[m.group(1)], None
    m = _COLON.match(part)
    if m:
        return m.group(3), _PREFIX_RUNTIME[m.group(2)], None
    m = _CRIO_CGROUPFS.match(part)
    if m:
        return m.group(1), "cri-o", None
    m = _LIBPOD_CGROUPFS.match(part)
    if m:
        return m.group(1), "podman", None
    m = _LXC_PAYLOAD.match(part)
    if m:
        return m.group(1), "lxc", m.group(1)
    if parent in ("lxc", "lxc.payload") and not _UNIT.match(part) and not part.endswith(".slice"):
        return part, "lxc", part                         # LXC 3.0 `/lxc/<name>`, 3.1–3.2 `/lxc.payload/<name>`
    m = _NSPAWN_UNIT.match(part)
    if m:
        name = _unescape(m.group(1))
        return name, "systemd-nspawn", name
    m = _MACHINE.match(part)
    if m and parent == "machine.slice":
        name = _unescape(m.group(1))
        if name.startswith(("qemu-", "lxc-")):            # libvirt guests, not a container on this kernel
            return None
        return name, "systemd-nspawn", name
    m = _BARE.match(part)
    if m:
        if parent == "docker":
            runtime = "docker"
        elif _POD_CGROUPFS.match(parent) or _POD_SYSTEMD.match(parent) or parent in ("kubepods", "burstable",
                                                                                       "besteffort"):
            runtime = "cri"                               # containerd or CRI-O or cri-dockerd: metadata tells
        elif parent == "nerdctl":
            runtime = "nerdctl"
        elif parent in _CONTAINERD_NAMESPACES or (i >= 2 and parts[i - 2] == "containerd.service"):
            runtime = "containerd"
        elif parent == "libpod_parent" or _PODMAN_POD.match(parent):
            return None                                   # a podman pod's own cgroup, not a container
        else:
            runtime = "unknown"                           # e.g. --cgroup-parent=/foo: id known, runtime not
        return m.group(1), runtime, None
    return None


def _pod_left_of(parts: list[str], end: int) -> tuple[str, str] | None:
    """(pod uid, qos) from the nearest pod part left of index `end`."""
    for j in range(end - 1, -1, -1):
        m = _POD_SYSTEMD.match(parts[j])
        if m:
            return _uid(m.group(2)), m.group(1) or "guaranteed"
        m = _POD_CGROUPFS.match(parts[j])
        if m and any("kubepods" in p for p in parts[:j]):
            qos = parts[j - 1] if parts[j - 1] in ("besteffort", "burstable") else "guaranteed"
            return _uid(m.group(1)), qos
    return None


def _uid(raw: str) -> str:
    # the systemd driver escapes `-` as `_`; static pods' 32-hex UIDs have neither
    return raw.replace("_", "-") if len(raw) == 36 else raw


def _podman_pod_left_of(parts: list[str], end: int) -> str | None:
    for j in range(end - 1, -1, -1):
        m = _PODMAN_POD.match(parts[j])
        if m:
            return m.group(1)
        if j and parts[j - 1] == "libpod_parent" and _BARE.match(parts[j]):
            return parts[j]
    return None


_USER_MANAGER = re.compile(r"^user@(\d+)\.service$")


def _delegated_uid(parts: list[str]) -> str | None:
    """The user a cgroup subtree above a container was delegated to, if any."""
    for part in parts:
        m = _USER_MANAGER.match(part)
        if m:
            return m.group(1)
    return None


def classify(path: str) -> CgroupInfo:
    """Container, pod and unit named by one cgroup path (see the module rules)."""
    parts = [p for p in path.split("/") if p and p != ".."]
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        if _CONMON.match(part) or _LXC_MONITOR.match(part) or (part == "conmon" and i and
                                                                 parts[i - 1] == "libpod_parent"):
            # a container's monitor: in its pod, but not in the container
            pod = _pod_left_of(parts, i)
            return CgroupInfo(path=path, pod_uid=pod[0] if pod else None, pod_qos=pod[1] if pod else None)
        found = _container_at(parts, i)
        if found is None:
            continue
        cid, runtime, name = found
        colon = _COLON.match(part)
        # the colon form carries the pod slice inside the part itself
        pod = _pod_left_of([colon.group(1)], 1) if colon else None
        pod = pod or _pod_left_of(parts, i)
        return CgroupInfo(path=path, container_id=cid, runtime=runtime,
                          pod_uid=pod[0] if pod else None, pod_qos=pod[1] if pod else None,
                          container_name=name, podman_pod_id=_podman_pod_left_of(parts, i),
                          delegated_uid=_delegated_uid(parts[:i]))
    pod = _pod_left_of(parts, len(parts))
    if pod:                                               # the pod's own cgroup (e.g. a pause-less pod)
        return CgroupInfo(path=path, pod_uid=pod[0], pod_qos=pod[1])
    unit = next((p for p in reversed(parts) if _UNIT.match(p)), None)
    return CgroupInfo(path=path, systemd_unit=unit, podman_pod_id=_podman_pod_left_of(parts, len(parts)))


# v1 hierarchies in the order they are trusted: runc always joins name=systemd,
# and systemd fills it for every unit; controllers a unit does not use show "/".
_V1_ORDER = ("name=systemd", "pids", "memory", "cpu,cpuacct", "cpuacct,cpu", "cpu", "cpuacct", "devices",
             "freezer", "blkio")


def parse_proc_cgroup(text: str) -> tuple[str | None, dict[str, str]]:
    """(v2 path or None, {v1 controllers: path}) of a /proc/PID/cgroup text."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, sep, path = rest.partition(":")
        if not sep:
            continue
        if hid == "0" and controllers == "":
            v2 = path
        else:
            v1[controllers] = path
    return v2, v1


def _depth(path: str) -> int:
    return sum(1 for p in path.split("/") if p and p != "..")


def classify_proc(text: str) -> CgroupInfo | None:
    """The most telling reading of a whole /proc/PID/cgroup text.

    On a hybrid host the v2 line may name only what the process inherited
    (`/system.slice/containerd.service` when an old runc joined v1 only) or
    the outer container of a nested pair, so a line that names a container or
    pod wins over one that names a unit: the deepest such line (ties: the v2
    line first, then the v1 lines in `_V1_ORDER`, then any other v1 line). With no such line the unit of the
    v2 line (else of name=systemd) is the answer.
    """
    v2, v1 = parse_proc_cgroup(text)
    ordered = [v2] if v2 not in (None, "", "/") else []
    ordered += [v1[k] for k in _V1_ORDER if k in v1]
    ordered += [p for k, p in v1.items() if k not in _V1_ORDER]
    candidates = [p for p in ordered if p not in ("", "/")]
    best: CgroupInfo | None = None
    inner: CgroupInfo | None = None
    for path in candidates:
        info = classify(path)
        # a docker-in-docker pair on a hybrid host: the v2 line may stop at the
        # outer container while v1 lines go on to the inner one — deepest wins
        if info.container_id is not None and (inner is None or _depth(path) > _depth(inner.path)):
            inner = info
        if best is None or (info.telling and not best.telling):
            best = info
    if inner is not None:
        return inner
    if best is None and v2 is not None:
        return classify(v2)
    return best
