"""Container runtimes' metadata files, laid out in tmp dirs exactly as each
runtime writes them (the container enricher's *_root options point there),
and the names they give. Shared by the real-cgroup tests."""

from __future__ import annotations

import json
from pathlib import Path

UID = "1f2e3d4c-5b6a-4789-8abc-def012345678"
UID_ = UID.replace("-", "_")
SUID = "0f3a1b2c4d5e6f708192a3b4c5d6e7f8"

K8S = {"k8s_namespace": "shop", "k8s_pod": "web-7d9f8c6b5-x2k4q", "k8s_container": "nginx",
       "container_name": "nginx", "container_image": "docker.io/library/nginx:1.27"}


def write_json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


class Roots:
    """Metadata roots in tmp, laid out as the runtimes lay them out."""

    def __init__(self, tmp: Path) -> None:
        self.containerd = tmp / "run-containerd" / "io.containerd.runtime.v2.task"
        self.storage = tmp / "run-containers-storage"
        self.docker = tmp / "var-lib-docker"
        for d in (self.containerd, self.storage, self.docker):
            d.mkdir(parents=True)

    def chain(self) -> str:
        return (f'chain=[{{use="container", containerd_root="{self.containerd}", '
                f'storage_roots=["{self.storage}"], docker_root="{self.docker}", docker_socket=""}}]')

    def containerd_cri(self, cid: str, cgroups_path: str, *, ns="shop", pod="web-7d9f8c6b5-x2k4q", name="nginx",
                       image="docker.io/library/nginx:1.27", uid=UID) -> None:
        write_json(self.containerd / "k8s.io" / cid / "config.json", {
            "ociVersion": "1.2.1", "annotations": {
                "io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": name,
                "io.kubernetes.cri.image-name": image, "io.kubernetes.cri.sandbox-id": "e" * 64,
                "io.kubernetes.cri.sandbox-name": pod, "io.kubernetes.cri.sandbox-namespace": ns,
                "io.kubernetes.cri.sandbox-uid": uid},
            "linux": {"cgroupsPath": cgroups_path}})

    def crio(self, cid: str, cgroups_path: str) -> None:
        write_json(self.storage / "overlay-containers" / cid / "userdata" / "config.json", {
            "ociVersion": "1.2.1", "annotations": {
                "io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.cri-o.ContainerID": cid,
                "io.kubernetes.cri-o.SandboxID": "e" * 64,
                "io.kubernetes.cri-o.Name": f"k8s_redis_cache-0_data_{UID}_0",
                "io.kubernetes.cri-o.ImageName": "docker.io/library/redis:7",
                "io.kubernetes.container.name": "redis", "io.kubernetes.pod.name": "cache-0",
                "io.kubernetes.pod.namespace": "data", "io.kubernetes.pod.uid": UID,
                "io.container.manager": "cri-o"},
            "linux": {"cgroupsPath": cgroups_path}})

    def podman(self, cid: str, name: str = "web") -> None:
        meta = {"image-name": "docker.io/library/caddy:2", "image-id": "c" * 64, "name": name,
                "created-at": 1767225600}
        write_json(self.storage / "overlay-containers" / "containers.json", [
            {"id": "f" * 64, "names": ["other"], "image": "c" * 64, "layer": "d" * 64,
             "metadata": json.dumps({"name": "other"}), "created": "2026-01-01T00:00:00Z"},
            {"id": cid, "names": [name], "image": "c" * 64, "layer": "d" * 64, "metadata": json.dumps(meta),
             "created": "2026-01-01T00:00:00Z"}])
        write_json(self.storage / "overlay-containers" / cid / "userdata" / "config.json",
                   {"ociVersion": "1.2.1", "annotations": {"io.container.manager": "libpod"}})

    def docker_ctr(self, cid: str, name: str = "/shop-web-1", image: str = "nginx:1.27") -> None:
        write_json(self.docker / "containers" / cid / "config.v2.json", {
            "ID": cid, "Name": name, "Driver": "overlay2", "Image": "sha256:" + "b" * 64,
            "State": {"Running": True, "Pid": 4242},
            "Config": {"Hostname": cid[:12], "Image": image, "Labels": {"com.docker.compose.project": "shop"}}})
