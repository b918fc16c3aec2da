"""Container attribution on the real kernel, per runtime family: the cgroups are
created under /sys/fs/cgroup exactly as the runtime creates them (names and
nesting from docs/containers.md), the runtime's metadata files are laid out
in tmp dirs exactly as the runtime writes them (the enricher's *_root options
point there), a process moves itself in, real loopback traffic is traced by
the real CLI. Every cgroup is removed afterwards, also when a test fails."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import orjson
import pytest
from cgroupfs import CgroupMaker, run_in, unique, v1_roots
from containerroots import K8S, SUID, UID, UID_, Roots
from traffic import free_port, parse_csv

pytestmark = pytest.mark.kernel

@pytest.fixture
def cgroups():
    maker = CgroupMaker()
    yield maker
    maker.cleanup()


def trace(tracer, tmp_path: Path, port: int, roots: Roots):
    out = tmp_path / "e.jsonl"
    t = tracer("--sink", "jsonl", "-D", str(port), "-o", f"sinks.jsonl.path={out}", "-o", roots.chain())
    return t, out


def records(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def _family(name: str, cid: str, roots: Roots) -> tuple[str, dict]:
    """(v2 cgroup path as the runtime creates it, the fields the events must carry)."""
    if name == "docker-systemd":
        roots.docker_ctr(cid)
        return f"system.slice/docker-{cid}.scope", {"container_runtime": "docker", "container_name": "shop-web-1",
                                                    "container_image": "nginx:1.27"}
    if name == "docker-cgroupfs":
        roots.docker_ctr(cid)
        return f"docker/{cid}", {"container_runtime": "docker", "container_name": "shop-web-1"}
    if name == "containerd-systemd":
        path = (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
                f"cri-containerd-{cid}.scope")
        roots.containerd_cri(cid, f"kubepods-burstable-pod{UID_}.slice:cri-containerd:{cid}")
        return path, {"container_runtime": "containerd", "pod_uid": UID, "pod_qos": "burstable", **K8S}
    if name == "containerd-colon":
        roots.containerd_cri(cid, f"kubepods-besteffort-pod{UID_}.slice:cri-containerd:{cid}")
        return f"kubepods-besteffort-pod{UID_}.slice:cri-containerd:{cid}", {
            "container_runtime": "containerd", "pod_uid": UID, "pod_qos": "besteffort", **K8S}
    if name == "containerd-cgroupfs":
        roots.containerd_cri(cid, f"/kubepods/besteffort/pod{UID}/{cid}")
        return f"kubepods/besteffort/pod{UID}/{cid}", {"container_runtime": "containerd", "pod_uid": UID,
                                                       "pod_qos": "besteffort", **K8S}
    if name == "static-pod":
        roots.containerd_cri(cid, "", pod="etcd-node1", ns="kube-system", name="etcd", uid=SUID)
        return (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SUID}.slice/"
                f"cri-containerd-{cid}.scope", {"pod_uid": SUID, "k8s_pod": "etcd-node1",
                                                "k8s_namespace": "kube-system"})
    if name == "crio-cgroupfs":
        roots.crio(cid, f"/kubepods/burstable/pod{UID}/crio-{cid}")
        return f"kubepods/burstable/pod{UID}/crio-{cid}", {
            "container_runtime": "cri-o", "pod_uid": UID, "pod_qos": "burstable", "k8s_namespace": "data",
            "k8s_pod": "cache-0", "k8s_container": "redis", "container_image": "docker.io/library/redis:7"}
    if name == "crio-systemd-crun":
        roots.crio(cid, f"kubepods-burstable-pod{UID_}.slice:crio:{cid}")
        return (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{cid}.scope/"
                "container", {"container_runtime": "cri-o", "k8s_pod": "cache-0"})
    if name == "podman-split":
        roots.podman(cid)
        return f"system.slice/web.service/libpod-payload-{cid}", {
            "container_runtime": "podman", "container_name": "web", "container_image": "docker.io/library/caddy:2"}
    if name == "podman-cgroupfs":
        roots.podman(cid, name="api")
        return f"libpod_parent/libpod-{cid}", {"container_runtime": "podman", "container_name": "api"}
    if name == "podman-rootless":
        # below user@1000.service: that user's word. The id is reported and marked,
        # the names in the runtime's files are never borrowed for it
        roots.podman(cid)
        return (f"user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{cid}.scope",
                {"container_runtime": "podman", "container_name": None, "container_delegated_uid": "1000"})
    if name == "docker-rootless":
        # dockerd-rootless.sh under the user's systemd: the same rule as podman's
        # (the root daemon's files on the node are never taken for it)
        roots.docker_ctr(cid)
        return (f"user.slice/user-1000.slice/user@1000.service/user.slice/docker-{cid}.scope",
                {"container_runtime": "docker", "container_name": None, "container_delegated_uid": "1000"})
    if name == "lxc":
        return "lxc.payload.web1", {"container_runtime": "lxc", "container_id": "web1", "container_name": "web1"}
    if name == "nspawn":
        return ("machine.slice/machine-my\\x2dct.scope/payload", {"container_runtime": "systemd-nspawn", "container_id": "my-ct",
                                                                   "container_name": "my-ct"})
    if name == "kind":
        roots.containerd_cri(cid, f"kubelet-kubepods-besteffort-pod{UID_}.slice:cri-containerd:{cid}")
        outer = unique()
        return (f"system.slice/docker-{outer}.scope/kubelet.slice/kubelet-kubepods.slice/"
                f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/"
                f"cri-containerd-{cid}.scope", {"container_runtime": "containerd", "pod_uid": UID, **K8S})
    raise AssertionError(name)


FAMILIES = ["docker-systemd", "docker-cgroupfs", "containerd-systemd", "containerd-colon", "containerd-cgroupfs",
            "static-pod", "crio-cgroupfs", "crio-systemd-crun", "podman-split", "podman-cgroupfs",
            "podman-rootless", "docker-rootless", "lxc", "nspawn", "kind"]


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_family_on_a_real_cgroup(family, tracer, tmp_path, cgroups):
    cid = unique()
    roots = Roots(tmp_path)
    rel, expected = _family(family, cid, roots)
    expected.setdefault("container_id", cid)
    path = cgroups.make(rel)
    port = free_port()
    t, out = trace(tracer, tmp_path, port, roots)
    run_in([path], port, count=2).wait(10)     # a short-lived process: exited before the lookup, often
    rc, _, err = t.stop()
    assert rc == 0, err
    recs = records(out)
    assert len(recs) == 4, recs
    for r in recs:
        got = {k: r.get(k) for k in expected}
        assert got == expected, (family, r)
        assert r["cgroup"] == "/" + rel


def test_hybrid_host_v1_container_while_v2_names_only_containerd_service(tracer, tmp_path, cgroups):
    """A real hybrid layout (this host mounts v1 hierarchies + v2 at /sys/fs/cgroup/unified):
    runc < 1.1 joined only the v1 hierarchies, so the v2 line names what the shim
    inherited. A second, short-lived process in the same v2 cgroup but in no v1
    container must not get the first one's container (the old by-cgroup cache gave it)."""
    if not v1_roots():
        pytest.skip("host has no cgroup v1 hierarchies: tests/test_cgroups.py covers hybrid /proc texts")
    cid = unique()
    roots = Roots(tmp_path)
    roots.docker_ctr(cid)
    shim = cgroups.make(f"tcps-{cid[:8]}.slice/containerd.service")
    v1 = cgroups.make_v1(f"docker/{cid}")
    port = free_port()
    t, out = trace(tracer, tmp_path, port, roots)
    inside = run_in([shim, *v1], port, count=2, stay=True)         # stays: /proc/PID must exist
    outsider = run_in([shim], port, count=1)                       # same v2 cgroup, no container
    outsider.wait(10)
    rc, _, err = t.stop()
    inside.stdin.close()
    inside.wait(10)
    assert rc == 0, err
    recs = records(out)
    mine = [r for r in recs if r["owner_pid"] == inside.pid]
    other = [r for r in recs if r["owner_pid"] == outsider.pid]
    assert len(mine) == 4 and len(other) == 2, recs
    assert all(r["container_id"] == cid and r["container_runtime"] == "docker" and
               r["container_name"] == "shop-web-1" for r in mine), mine
    assert all("container_id" not in r for r in other), other
    assert all(r.get("systemd_unit") == "containerd.service" for r in other), other


def test_exited_process_whose_cgroup_is_gone_stays_unknown(tracer, tmp_path, cgroups):
    """The tracer is stopped (SIGSTOP) while a container's process connects, exits
    and its cgroup is removed; the events are read afterwards. The id no longer
    resolves: no container fields (unknown, not a guess), and a live container's
    events in the same batch are still attributed."""
    gone_id, live_id = unique(), unique()
    roots = Roots(tmp_path)
    gone = cgroups.make(f"system.slice/docker-{gone_id}.scope")
    live = cgroups.make(f"system.slice/docker-{live_id}.scope")
    port = free_port()
    t, out = trace(tracer, tmp_path, port, roots)
    os.kill(t.proc.pid, signal.SIGSTOP)
    try:
        run_in([gone], port, count=2).wait(10)
        gone.rmdir()                                   # empty: the process exited
        run_in([live], port, count=1).wait(10)
    finally:
        os.kill(t.proc.pid, signal.SIGCONT)
    rc, _, err = t.stop()
    assert rc == 0, err
    assert not gone.exists()
    recs = records(out)
    assert len(recs) == 6, recs
    unknown = [r for r in recs if "container_id" not in r]
    known = [r for r in recs if "container_id" in r]
    assert len(unknown) == 4 and all(r["owner_pid"] for r in unknown)
    assert len(known) == 2 and all(r["container_id"] == live_id for r in known)


def test_owner_text_shows_the_pod_and_workload_filter_globs(tracer, tmp_path, cgroups):
    cid, other_id = unique(), unique()
    roots = Roots(tmp_path)
    _rel, _ = _family("containerd-systemd", cid, roots)
    path = cgroups.make(_rel)
    other = cgroups.make(f"system.slice/docker-{other_id}.scope")
    roots.docker_ctr(other_id, name="/db", image="postgres:16")
    port = free_port()
    chain = roots.chain()[:-2] + '}, {use="workload", namespace=["sh*"], pod=["web-*"], image=["*nginx:1.2?"]}]'
    t = tracer("-s", "--owner", "-D", str(port), "-o", chain)
    run_in([path], port, count=2).wait(10)
    run_in([other], port, count=2).wait(10)
    rc, out, err = t.stop()
    assert rc == 0, err
    rows = parse_csv(out)
    assert len(rows) == 4, out
    assert {r["WORKLOAD"] for r in rows} == {"shop/web-7d9f8c6b5-x2k4q"}
