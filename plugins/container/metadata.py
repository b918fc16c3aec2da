"""Names from what the runtimes keep on the node — no API server.

* containerd (CRI, nerdctl, ctr): the OCI bundle
  `<containerd_root>/<namespace>/<id>/config.json`, annotations
  `io.kubernetes.cri.*` (and nerdctl's `nerdctl/name`).
* CRI-O and podman: `<storage root>/<driver>-containers/<id>/userdata/config.json`
  (CRI-O copies kubelet's `io.kubernetes.pod.*` labels there); podman's names
  and images are in that directory's `containers.json` /
  `volatile-containers.json` (containers/storage).
* Docker (and cri-dockerd): `<docker_root>/containers/<id>/config.v2.json`.

Every file is opened once and checked on that descriptor (a regular file,
bounded size) before it is read; every string is checked to be a string,
bounded, and control characters are escaped as \\xNN. What is not found is
remembered for `negative_ttl` seconds: a container's files are written
before its first process runs, so a miss is almost always final.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from typing import Any

from tcpstates.text import escape_name

MAX_BUNDLE = 4 << 20           # a config.json is a few KiB; refuse anything absurd
MAX_STORE = 64 << 20           # containers.json grows with the number of containers
MAX_NAME = 512

FIELDS = ("k8s_namespace", "k8s_pod", "k8s_container", "container_name", "container_image")


def clean(value: Any) -> str | None:
    """A name from outside: a non-empty bounded string, escaped as every name in
    an event is (escape_name: control and format characters as \\xNN, a
    backslash doubled)."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        return None
    return escape_name(value)


def read_json(path: str, limit: int = MAX_BUNDLE) -> Any:
    """JSON of a regular file no bigger than `limit`, checked on the descriptor read; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return json.loads(b"".join(chunks))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)


def docker_names(doc: Any) -> dict[str, str]:
    """container_name and container_image of a Docker container document: the
    engine's own `config.v2.json` and its API's `/containers/ID/json` have the
    same shape. What is missing or not a string is left out."""
    if not isinstance(doc, dict):
        return {}
    config = doc.get("Config")
    name = doc.get("Name")
    name = name[1:] if isinstance(name, str) and name.startswith("/") else name
    return _names(container_name=name, container_image=config.get("Image") if isinstance(config, dict) else None)


def _names(**values: Any) -> dict[str, str]:
    out = {}
    for key, value in values.items():
        v = clean(value)
        if v is not None:
            out[key] = v
    return out


def from_cri_annotations(ann: dict[str, Any]) -> dict[str, str]:
    """containerd CRI, CRI-O (kubelet labels copied in), nerdctl: names from OCI annotations."""
    get = ann.get
    sandbox = (get("io.kubernetes.cri.container-type") == "sandbox" or
               get("io.kubernetes.cri-o.ContainerType") == "sandbox")
    container = None if sandbox else (get("io.kubernetes.cri.container-name") or
                                      get("io.kubernetes.container.name"))
    image = (get("io.kubernetes.cri.podsandbox.image-name") if sandbox else get("io.kubernetes.cri.image-name")) \
        or get("io.kubernetes.cri-o.ImageName") or get("io.kubernetes.cri-o.Image")
    out = _names(k8s_namespace=get("io.kubernetes.cri.sandbox-namespace") or get("io.kubernetes.pod.namespace"),
                 k8s_pod=get("io.kubernetes.cri.sandbox-name") or get("io.kubernetes.pod.name"),
                 k8s_container=container, container_name=container or get("nerdctl/name"),
                 container_image=image)
    if sandbox and "k8s_pod" in out:
        out["k8s_container"] = "POD"            # kubelet's own name for the sandbox (pause) container
    return out


@dataclasses.dataclass
class MetadataRoots:
    containerd_root: str = "/run/containerd/io.containerd.runtime.v2.task"
    storage_roots: tuple[str, ...] = ("/run/containers/storage", "/var/lib/containers/storage")
    docker_root: str = "/var/lib/docker"


class RuntimeMetadata:
    """container id → {name fields} (+ "runtime" when the files tell it), cached."""

    def __init__(self, roots: MetadataRoots, *, limit: int = 16384, negative_ttl: float = 10.0) -> None:
        self.roots = roots
        self.limit = limit
        self.negative_ttl = negative_ttl
        self.cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._stores: dict[str, tuple[tuple[int, int, int], dict[str, dict[str, str]]]] = {}
        self.reads = 0

    def lookup(self, container_id: str, runtime: str | None) -> dict[str, str]:
        hit = self.cache.get(container_id)
        now = time.monotonic()
        if hit is not None and (hit[1] or now - hit[0] < self.negative_ttl):
            return hit[1]
        found = self._find(container_id, runtime)
        if len(self.cache) >= self.limit:
            self.cache.clear()
        self.cache[container_id] = (now, found)
        return found

    def _find(self, cid: str, runtime: str | None) -> dict[str, str]:
        order = {"docker": (self._docker,), "containerd": (self._containerd,), "nerdctl": (self._containerd,),
                 "cri-o": (self._storage,), "podman": (self._storage,)}.get(
            runtime or "", (self._containerd, self._storage, self._docker))
        for probe in order:
            found = probe(cid)
            if found:
                return found
        return {}

    # -- containerd --------------------------------------------------------------------
    def _containerd(self, cid: str) -> dict[str, str]:
        root = self.roots.containerd_root
        try:
            namespaces = os.listdir(root)
        except OSError:
            return {}
        for ns in namespaces:
            self.reads += 1
            spec = read_json(os.path.join(root, ns, cid, "config.json"))
            if isinstance(spec, dict):
                ann = spec.get("annotations")
                names = from_cri_annotations(ann) if isinstance(ann, dict) else {}
                names["runtime"] = "nerdctl" if "nerdctl/name" in (ann or {}) else "containerd"
                return names
        return {}

    # -- CRI-O and podman (containers/storage) -----------------------------------------
    def _storage(self, cid: str) -> dict[str, str]:
        for root in self.roots.storage_roots:
            try:
                dirs = [d for d in os.listdir(root) if d.endswith("-containers")]
            except OSError:
                continue
            for d in dirs:
                base = os.path.join(root, d)
                self.reads += 1
                spec = read_json(os.path.join(base, cid, "userdata", "config.json"))
                store = self._store(base).get(cid, {})
                if not isinstance(spec, dict) and not store:
                    continue
                ann = spec.get("annotations") if isinstance(spec, dict) else None
                ann = ann if isinstance(ann, dict) else {}
                names = from_cri_annotations(ann)
                manager = ann.get("io.container.manager")
                if manager == "cri-o" or "io.kubernetes.cri-o.ContainerType" in ann:
                    names["runtime"] = "cri-o"
                elif manager == "libpod" or store:
                    names["runtime"] = "podman"
                for key, value in store.items():
                    names.setdefault(key, value)
                return names
        return {}

    def _store(self, base: str) -> dict[str, dict[str, str]]:
        """containers.json + volatile-containers.json of one storage driver dir, re-read when they change."""
        out: dict[str, dict[str, str]] = {}
        for name in ("containers.json", "volatile-containers.json"):
            path = os.path.join(base, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._stores.get(path)
            if cached is None or cached[0] != key:
                cached = (key, self._parse_store(read_json(path, MAX_STORE)))
                self._stores[path] = cached
            out.update(cached[1])
        return out

    @staticmethod
    def _parse_store(entries: Any) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if not isinstance(entries, list):
            return out
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            meta: Any = entry.get("metadata")
            try:
                meta = json.loads(meta) if isinstance(meta, str) else {}
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            names = entry.get("names")
            first = names[0] if isinstance(names, list) and names else None
            out[entry["id"]] = _names(container_name=meta.get("name") or first,
                                      container_image=meta.get("image-name"))
        return out

    # -- Docker ------------------------------------------------------------------------
    def _docker(self, cid: str) -> dict[str, str]:
        self.reads += 1
        doc = read_json(os.path.join(self.roots.docker_root, "containers", cid, "config.v2.json"))
        if not isinstance(doc, dict):
            return {}
        raw_config = doc.get("Config")
        config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
        raw_labels = config.get("Labels")
        labels: dict[str, Any] = raw_labels if isinstance(raw_labels, dict) else {}
        names = docker_names(doc)
        if labels.get("io.kubernetes.pod.name"):        # cri-dockerd / dockershim
            kube = _names(k8s_namespace=labels.get("io.kubernetes.pod.namespace"),
                          k8s_pod=labels.get("io.kubernetes.pod.name"),
                          k8s_container=(labels.get("io.kubernetes.container.name")
                                         if labels.get("io.kubernetes.docker.type") != "podsandbox" else "POD"))
            names.update(kube)
        names["runtime"] = "docker"
        return names
