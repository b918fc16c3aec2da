"""Every cgroup layout of docs/containers.md, one test per row (row ids match
the table), plus /proc/PID/cgroup texts exactly as v1, v2 and hybrid hosts
print them. The hybrid texts are written out here: this host's cgroup mounts
cannot be changed from a test; tests/test_containers.py also creates real v1
cgroups where the host has v1 hierarchies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tcpstates.plugins.container.cgroups import proc_cgroup_path, read_process
from tcpstates.plugins.container.layouts import classify, classify_proc

A = "4f1e9a1c2b3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789ab"
B = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
P = "9" * 64                                         # a podman pod id
UID = "5a4d7c2e-9b1f-4e3a-8c6d-0f1e2d3c4b5a"
UID_ = UID.replace("-", "_")
SUID = "0f3a1b2c4d5e6f708192a3b4c5d6e7f8"              # static pod: 32 hex, no dashes
KP = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
USER = "/user.slice/user-1000.slice/user@1000.service/user.slice"

# row id: (path, container_id, runtime, pod_uid, qos, systemd_unit, container_name)
ROWS = {
    "D1": (f"/docker/{A}", A, "docker", None, None, None, None),
    "D3": (f"/system.slice/docker-{A}.scope", A, "docker", None, None, None, None),
    "D6": (f"{USER}/docker-{A}.scope", A, "docker", None, None, None, None),
    "D7": (f"/foo/{A}", A, "unknown", None, None, None, None),
    "C1": (f"{KP}{UID_}.slice/cri-containerd-{A}.scope", A, "containerd", UID, "burstable", None, None),
    "C2": (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{A}.scope", A, "containerd", UID,
           "guaranteed", None, None),
    "C3": (f"/kubepods/besteffort/pod{UID}/{A}", A, "cri", UID, "besteffort", None, None),
    "C3g": (f"/kubepods/pod{UID}/{A}", A, "cri", UID, "guaranteed", None, None),
    "C6": (f"{KP}{SUID}.slice/cri-containerd-{A}.scope", A, "containerd", SUID, "burstable", None, None),
    "C6c": (f"/kubepods/burstable/pod{SUID}/{A}", A, "cri", SUID, "burstable", None, None),
    "C8": (f"/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{A}", A, "containerd", UID, "besteffort",
           None, None),
    "C8o": (f"/kubepods-pod{UID_}.slice:crio:{A}", A, "cri-o", UID, "guaranteed", None, None),
    "N1": (f"/system.slice/nerdctl-{A}.scope", A, "nerdctl", None, None, None, None),
    "N2": (f"/default/{A}", A, "containerd", None, None, None, None),
    "N3": (f"/system.slice/containerd.service/k8s.io/{A}", A, "containerd", None, None, None, None),
    "O1": (f"{KP}{UID_}.slice/crio-{A}.scope", A, "cri-o", UID, "burstable", None, None),
    "O1c": (f"{KP}{UID_}.slice/crio-{A}.scope/container", A, "cri-o", UID, "burstable", None, None),
    "O2": (f"{KP}{UID_}.slice/crio-conmon-{A}.scope", None, None, UID, "burstable", None, None),
    "O3": (f"/kubepods/burstable/pod{UID}/crio-{A}", A, "cri-o", UID, "burstable", None, None),
    "O3m": (f"/kubepods/burstable/pod{UID}/crio-conmon-{A}", None, None, UID, "burstable", None, None),
    "O4": (f"/crio/crio-{A}", A, "cri-o", None, None, None, None),
    "P1": (f"/machine.slice/libpod-{A}.scope", A, "podman", None, None, None, None),
    "P1c": (f"/machine.slice/libpod-{A}.scope/container", A, "podman", None, None, None, None),
    "P2": (f"/machine.slice/libpod-conmon-{A}.scope", None, None, None, None, None, None),
    "P3": (f"/libpod_parent/libpod-{A}", A, "podman", None, None, None, None),
    "P3m": ("/libpod_parent/conmon", None, None, None, None, None, None),
    "P4": (f"{USER}/libpod-{A}.scope", A, "podman", None, None, None, None),
    "P5": (f"/machine.slice/machine-libpod_pod_{P}.slice/libpod-{A}.scope", A, "podman", None, None, None, None),
    "P6": (f"{USER}/user-libpod_pod_{P}.slice/libpod-{A}.scope", A, "podman", None, None, None, None),
    "P7": (f"/libpod_parent/{P}/libpod-{A}", A, "podman", None, None, None, None),
    "P8": (f"/system.slice/web.service/libpod-payload-{A}", A, "podman", None, None, None, None),
    "P8r": ("/system.slice/web.service/runtime", None, None, None, None, "web.service", None),
    "L1": ("/lxc.payload.web1", "web1", "lxc", None, None, None, "web1"),
    "L1s": ("/lxc.payload.web1/system.slice/nginx.service", "web1", "lxc", None, None, None, "web1"),
    "L2": ("/lxc.monitor.web1", None, None, None, None, None, None),
    "L3": ("/lxc.payload.myproj_web1", "myproj_web1", "lxc", None, None, None, "myproj_web1"),
    "L4": ("/lxc/web1", "web1", "lxc", None, None, None, "web1"),
    "L5": ("/lxc.payload/web1", "web1", "lxc", None, None, None, "web1"),
    "S1": ("/machine.slice/machine-my\\x2dct.scope/payload/system.slice/sshd.service", "my-ct", "systemd-nspawn",
           None, None, None, "my-ct"),
    "S2": ("/machine.slice/systemd-nspawn@my-ct.service/payload/init.scope", "my-ct", "systemd-nspawn",
           None, None, None, "my-ct"),
    "S3": ("/machine.slice/machine-qemu\\x2d1\\x2dvm.scope", None, None, None, None,
           "machine-qemu\\x2d1\\x2dvm.scope", None),
    "K1": (f"/system.slice/docker-{B}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
           f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{A}.scope", A, "containerd", UID,
           "besteffort", None, None),
    "K2": (f"/system.slice/docker-{B}.scope/system.slice/containerd.service", B, "docker", None, None, None, None),
    "K3": (f"/docker/{B}/kubelet/kubepods/burstable/pod{UID}/{A}", A, "cri", UID, "burstable", None, None),
    "K4": (f"/docker/{B}/docker/{A}", A, "docker", None, None, None, None),         # docker-in-docker
    "X1": (f"/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{A}.scope", A, "containerd", UID,
           "besteffort", None, None),
    "Q1": (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice", None, None, UID,
           "besteffort", None, None),
    "H1": ("/system.slice/nginx.service", None, None, None, None, "nginx.service", None),
    "H1s": ("/user.slice/user-1000.slice/session-3.scope", None, None, None, None, "session-3.scope", None),
    "H1v": (f"/user.slice/user-1000.slice/user@1000.service/app.slice/vte-spawn-{UID}.scope",
            None, None, None, None, f"vte-spawn-{UID}.scope", None),
    "H2": ("/system.slice/containerd.service", None, None, None, None, "containerd.service", None),
    "H3": (f"/system.slice/var-lib-docker-containers-{A}-mounts-shm.mount", None, None, None, None, None, None),
    "H3n": (f"/system.slice/run-docker-netns-{A[:12]}.mount", None, None, None, None, None, None),
    "H4": ("/", None, None, None, None, None, None),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_layout_row(row):
    path, cid, runtime, pod, qos, unit, name = ROWS[row]
    info = classify(path)
    assert (info.container_id, info.runtime, info.pod_uid, info.pod_qos, info.systemd_unit, info.container_name) \
        == (cid, runtime, pod, qos, unit, name)


def test_podman_pod_id_is_kept():
    assert classify(ROWS["P5"][0]).podman_pod_id == P
    assert classify(ROWS["P7"][0]).podman_pod_id == P


def test_docs_table_has_a_test_row_for_every_row():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "containers.md").read_text()
    documented = set(re.findall(r"^\| ([A-Z]\d+[a-z]?) \|", doc, re.M))
    assert documented == set(ROWS) | set(PROC_ROWS), documented ^ (set(ROWS) | set(PROC_ROWS))


# /proc/PID/cgroup texts as the hosts print them (v1 and hybrid: written out, see the module docstring)
V1_ALL = "".join(f"{n}:{c}:%s\n" for n, c in ((12, "pids"), (11, "memory"), (10, "cpu,cpuacct"),
                                               (4, "devices"), (1, "name=systemd")))
PROC_ROWS = {
    # D2: docker cgroupfs on v1
    "D2": (V1_ALL % ((f"/docker/{A}",) * 5), A, "docker"),
    # D4: docker systemd on hybrid: runc >= 1.1 joins the unified tree too
    "D4": (V1_ALL % ((f"/system.slice/docker-{A}.scope",) * 5) + f"0::/system.slice/docker-{A}.scope\n", A, "docker"),
    # D5: hybrid, runc < 1.1: the v2 line names only what containerd's shim inherited
    "D5": (V1_ALL % ((f"/docker/{A}",) * 5) + "0::/system.slice/containerd.service\n", A, "docker"),
    # C4: containerd cgroupfs on v1, pod
    "C4": (V1_ALL % ((f"/kubepods/burstable/pod{UID}/{A}",) * 5), A, "cri"),
    # C5: systemd driver on hybrid, v2 line at the root (a v1-only join)
    "C5": (V1_ALL % ((f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
                      f"cri-containerd-{A}.scope",) * 5) + "0::/\n", A, "containerd"),
    # K5: hybrid docker-in-docker: v2 names the outer container, v1 the inner one -> innermost
    "K5": (V1_ALL % ((f"/docker/{B}/docker/{A}",) * 5) + f"0::/docker/{B}\n", A, "docker"),
    # H5: a v1 systemd host's sshd: controllers it does not use show "/"
    "H5": ("12:pids:/system.slice/sshd.service\n11:memory:/\n10:cpu,cpuacct:/\n4:devices:/\n"
           "1:name=systemd:/system.slice/sshd.service\n0::/\n", None, None),
    # V2: a pure v2 host
    "V2": (f"0::/system.slice/docker-{A}.scope\n", A, "docker"),
}


@pytest.mark.parametrize("row", list(PROC_ROWS))
def test_proc_text_row(row):
    text, cid, runtime = PROC_ROWS[row]
    info = classify_proc(text)
    assert (info.container_id, info.runtime) == (cid, runtime)


def test_hybrid_host_unit_when_no_line_names_a_container():
    info = classify_proc(PROC_ROWS["H5"][0])
    assert info.systemd_unit == "sshd.service" and info.container_id is None


def test_read_process_of_self_and_of_a_gone_pid(tmp_path):
    import os
    p = read_process(os.getpid())
    assert p is not None and p.start_ticks > 0 and "0::" in p.text or ":" in p.text
    assert read_process(2**22 + 7) is None                                  # above pid_max: gone
    assert proc_cgroup_path(2**22 + 7) is None
    # a stat whose comm holds ") (" is parsed after the LAST ')'
    d = tmp_path / "42"
    d.mkdir()
    (d / "stat").write_text("42 (a) (b) S " + " ".join(["1"] * 18) + " 777 " + " ".join(["0"] * 30) + "\n")
    (d / "cgroup").write_text(PROC_ROWS["D5"][0])
    got = read_process(42, tmp_path)
    assert got is not None and got.start_ticks == 777
    assert proc_cgroup_path(42, tmp_path) == f"/docker/{A}"


def test_a_container_in_a_users_delegated_subtree_is_marked_as_that_users_word():
    """Any logged-in user can create `docker-<64hex>.scope` below user@UID.service:
    the id is reported, marked as delegated to that user, never looked up in the
    rootful runtimes' files, and the workload filter ignores it unless asked."""
    from tcpstates.plugins.container.layouts import classify_proc
    from tcpstates.testing import make_event, run_pipeline
    cid = "a" * 64
    info = classify_proc(f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{cid}.scope\n")
    assert info is not None and info.container_id == cid and info.delegated_uid == "1000"
    assert info.fields()["container_delegated_uid"] == "1000"
    rootful = classify_proc(f"0::/system.slice/docker-{cid}.scope\n")
    assert rootful is not None and rootful.delegated_uid is None
    spoof = make_event(extra={"container_id": cid, "container_runtime": "docker",
                              "container_delegated_uid": "1000"})
    real = make_event(extra={"container_id": cid, "container_runtime": "docker"})
    conf = '[[chain]]\nuse = "workload"\ncontainer_id = ["%s"]\n' % cid[:12]
    # run_pipeline inserts owner/container before workload; their extras on preset
    # events stay as given (no live process), so the filter judges what we set
    kept = run_pipeline(conf, [spoof, real], entry_points=False).events
    assert [("container_delegated_uid" in e.extra) for e in kept] == [False]
    kept = run_pipeline(conf + "delegated = true\n", [spoof, real], entry_points=False).events
    assert len(kept) == 2
