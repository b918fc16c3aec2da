"""Container, runtime, pod and unit from real cgroup path shapes (v1, v2, hybrid,
systemd and cgroupfs drivers, nested), including the known false positives."""

from __future__ import annotations

import pytest

from tcpstates.plugins.container.cgroups import classify, proc_cgroup_path

A = "4f1e9a1c2b3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab"
B = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
UID = "5a4d7c2e-9b1f-4e3a-8c6d-0f1e2d3c4b5a"
UID_ = UID.replace("-", "_")

CASES = [
    # path, container_id, runtime, pod_uid, qos, systemd_unit
    (f"/docker/{A}", A, "docker", None, None, None),                                    # v1 / cgroupfs
    (f"/system.slice/docker-{A}.scope", A, "docker", None, None, None),                  # v2 systemd driver
    (f"/kubepods/burstable/pod{UID}/{A}", A, "cri", UID, "burstable", None),              # k8s v1 cgroupfs
    (f"/kubepods/pod{UID}/{A}", A, "cri", UID, "guaranteed", None),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{A}.scope",
     A, "containerd", UID, "besteffort", None),                                          # k8s v2 systemd
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{A}.scope", A, "containerd", UID, "guaranteed", None),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{A}.scope",
     A, "cri-o", UID, "burstable", None),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{A}.scope",
     None, None, UID, "burstable", None),                                                # conmon: not the container
    (f"/machine.slice/libpod-{A}.scope", A, "podman", None, None, None),
    (f"/machine.slice/libpod-{A}.scope/container", A, "podman", None, None, None),       # podman with init
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{A}.scope", A, "podman", None, None, None),  # rootless
    (f"/machine.slice/libpod-conmon-{A}.scope", None, None, None, None, None),          # podman's conmon
    (f"/system.slice/nerdctl-{A}.scope", A, "nerdctl", None, None, None),
    (f"/default/{A}", A, "containerd", None, None, None),                                # ctr / nerdctl cgroupfs
    (f"/system.slice/containerd.service/k8s.io/{A}", A, "containerd", None, None, None),
    ("/lxc/web1", "web1", "lxc", None, None, None),                                      # lxc v1
    ("/lxc.payload.web1", "web1", "lxc", None, None, None),                              # lxc v2
    ("/lxc.payload.web1/system.slice/sshd.service", "web1", "lxc", None, None, None),
    # nested: kind (v2, systemd inside) and minikube (cgroupfs inside): the innermost wins
    (f"/system.slice/docker-{B}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{A}.scope", A, "containerd", UID, "besteffort", None),
    (f"/docker/{B}/kubepods/besteffort/pod{UID}/{A}", A, "cri", UID, "besteffort", None),
    # not containers
    ("/system.slice/nginx.service", None, None, None, None, "nginx.service"),
    ("/user.slice/user-1000.slice/session-3.scope", None, None, None, None, "session-3.scope"),
    (f"/user.slice/user-1000.slice/user@1000.service/app.slice/vte-spawn-{UID}.scope",
     None, None, None, None, f"vte-spawn-{UID}.scope"),
    (f"/system.slice/var-lib-docker-containers-{A}-mounts-shm.mount", None, None, None, None, None),
    (f"/system.slice/run-docker-netns-{A[:12]}.mount", None, None, None, None, None),
    ("/", None, None, None, None, None),
]


@pytest.mark.parametrize("path,cid,runtime,pod,qos,unit", CASES, ids=[c[0][-60:] for c in CASES])
def test_classify(path, cid, runtime, pod, qos, unit):
    info = classify(path)
    assert (info.container_id, info.runtime, info.pod_uid, info.pod_qos, info.systemd_unit) == \
        (cid, runtime, pod, qos, unit)


def test_proc_cgroup_path_prefers_v2_then_named_systemd_v1(tmp_path):
    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "cgroup").write_text(
        "12:pids:/docker/abc\n1:name=systemd:/system.slice/docker-x.scope\n0::/system.slice/docker-y.scope\n")
    assert proc_cgroup_path(10, tmp_path) == "/system.slice/docker-y.scope"
    (tmp_path / "11").mkdir()
    (tmp_path / "11" / "cgroup").write_text("12:pids:/docker/abc\n1:name=systemd:/system.slice/sshd.service\n0::/\n")
    assert proc_cgroup_path(11, tmp_path) == "/system.slice/sshd.service"     # hybrid: v2 root, v1 tells
    assert proc_cgroup_path(999, tmp_path) is None                            # exited: not an error
