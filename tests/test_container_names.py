"""Names from runtime metadata files (laid out as each runtime writes them),
their validation, the workload filter's globs, and identity-keyed caching."""

from __future__ import annotations

import json
import os

from tcpstates.api import RunContext
from tcpstates.plugins.container.enricher import ContainerEnricher, ContainerOptions
from tcpstates.plugins.container.metadata import MetadataRoots, RuntimeMetadata, clean
from tcpstates.plugins.container.workload import WorkloadFilter, WorkloadOptions
from tcpstates.testing import make_event

CID = "ab" * 32


def _roots(tmp_path):
    return MetadataRoots(str(tmp_path / "ctd"), (str(tmp_path / "st"),), str(tmp_path / "docker"))


def test_clean_escapes_and_bounds():
    assert clean("web\x1b[31m") == "web\\x1b[31m"
    assert clean("a\\b") == "a\\\\b"
    assert clean(42) is None and clean("") is None and clean("x" * 513) is None
    assert clean({"a": 1}) is None


def test_names_the_docker_engine_gives_are_escaped_bounded_and_checked():
    """The engine's JSON is outside input like the runtimes' files: names escaped
    one-to-one, what is missing or not a string left out, never a crash."""
    from tcpstates.plugins.container.metadata import docker_names as _names
    assert _names({"Name": "/web\x1b[31m", "Config": {"Image": "a\\b"}}) == \
        {"container_name": "web\\x1b[31m", "container_image": "a\\\\b"}
    assert _names({"Name": "/web\\x1b[31m"}) == {"container_name": "web\\\\x1b[31m"}
    assert _names({"Name": 7, "Config": ["Image"]}) == {}
    assert _names(["not", "an", "object"]) == {} and _names(None) == {}
    assert _names({"Name": "/" + "x" * 600}) == {}


def test_names_taken_from_a_cgroup_path_are_escaped_one_to_one():
    """An LXC container's name is its cgroup directory's, which a user with a
    delegated subtree chooses: a real ESC and the four characters `\\x1b` must
    give different names; the path itself stays as the kernel gives it."""
    from tcpstates.plugins.container.layouts import classify
    esc, spelled = classify("/lxc.payload.x\x1by").fields(), classify("/lxc.payload.x\\x1by").fields()
    assert esc["container_name"] == "x\\x1by" and spelled["container_name"] == "x\\\\x1by"
    assert esc["cgroup"] == "/lxc.payload.x\x1by"


def test_docker_file_symlink_and_oversize_are_refused(tmp_path):
    d = tmp_path / "docker" / "containers" / CID
    d.mkdir(parents=True)
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"Name": "/x", "Config": {"Image": "i"}}))
    os.symlink(target, d / "config.v2.json")
    meta = RuntimeMetadata(_roots(tmp_path))
    assert meta.lookup(CID, "docker") == {}                        # not followed
    (d / "config.v2.json").unlink()
    (d / "config.v2.json").write_text(" " * (5 << 20))              # absurd size
    assert RuntimeMetadata(_roots(tmp_path)).lookup(CID, "docker") == {}


def test_cri_dockerd_labels_give_kubernetes_names(tmp_path):
    d = tmp_path / "docker" / "containers" / CID
    d.mkdir(parents=True)
    (d / "config.v2.json").write_text(json.dumps({
        "Name": f"/k8s_app_api-0_prod_{'1' * 32}_0", "Config": {"Image": "api:3", "Labels": {
            "io.kubernetes.pod.name": "api-0", "io.kubernetes.pod.namespace": "prod",
            "io.kubernetes.container.name": "app", "io.kubernetes.docker.type": "container"}}}))
    got = RuntimeMetadata(_roots(tmp_path)).lookup(CID, None)
    assert (got["k8s_namespace"], got["k8s_pod"], got["k8s_container"], got["runtime"]) == \
        ("prod", "api-0", "app", "docker")


def test_containerd_sandbox_is_pod_with_pause_image(tmp_path):
    d = tmp_path / "ctd" / "k8s.io" / CID
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-name": "web-1",
        "io.kubernetes.cri.sandbox-namespace": "shop", "io.kubernetes.cri.podsandbox.image-name": "pause:3.10"}}))
    got = RuntimeMetadata(_roots(tmp_path)).lookup(CID, None)
    assert got == {"k8s_namespace": "shop", "k8s_pod": "web-1", "k8s_container": "POD",
                   "container_image": "pause:3.10", "runtime": "containerd"}


def test_bad_json_and_wrong_types_stay_unknown(tmp_path):
    d = tmp_path / "ctd" / "k8s.io" / CID
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"annotations": {"io.kubernetes.cri.sandbox-name": ["x"], '
                                   '"io.kubernetes.cri.sandbox-namespace": 7}}')
    assert RuntimeMetadata(_roots(tmp_path)).lookup(CID, "containerd") == {"runtime": "containerd"}
    (d / "config.json").write_text("{not json")
    assert RuntimeMetadata(_roots(tmp_path)).lookup(CID, "containerd") == {}


def _event(**extra):
    return make_event(extra=extra)


def test_workload_globs_and_unknown_never_matches():
    f = WorkloadFilter(WorkloadOptions(namespace=["prod-*"], image=["*nginx:1.2?"]), RunContext())
    assert f.keep(_event(k8s_namespace="prod-eu", container_image="docker.io/library/nginx:1.27"))
    assert not f.keep(_event(k8s_namespace="dev", container_image="docker.io/library/nginx:1.27"))
    assert not f.keep(_event(k8s_namespace="prod-eu"))                  # image unknown
    c = WorkloadFilter(WorkloadOptions(container=["web"]), RunContext())
    assert c.keep(_event(container_name="web")) and not c.keep(_event())
    x = WorkloadFilter(WorkloadOptions(pod=["web-*"], exclude=True), RunContext())
    assert not x.keep(_event(k8s_pod="web-1")) and x.keep(_event(k8s_pod="db-0"))


def test_pid_reused_after_the_event_gets_nothing(tmp_path):
    """The owner's PID now belongs to a process that started after the event: the
    identity check (start time) refuses it, on a host where /proc must be read."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("1:name=systemd:/\n0::/\n")            # hybrid
    (proc / "77").mkdir()
    ticks = 10**9                                                                 # far in the future
    (proc / "77" / "stat").write_text("77 (new) S " + " ".join(["1"] * 18) + f" {ticks} 0\n")
    (proc / "77" / "cgroup").write_text(f"1:name=systemd:/docker/{CID}\n0::/\n")
    e = ContainerEnricher(ContainerOptions(proc=str(proc), docker_socket="", names=False), RunContext())
    ev = make_event(pid=1, ts_ns=10**9, extra={"owner_pid": 77, "owner_cgroup_id": 0})
    e.enrich(ev)
    assert "container_id" not in ev.extra
    # the same PID with a start time before the event is that process
    (proc / "77" / "stat").write_text("77 (old) S " + " ".join(["1"] * 18) + " 1 0\n")
    ev = make_event(pid=1, ts_ns=10**12, extra={"owner_pid": 77, "owner_cgroup_id": 0})
    e.enrich(ev)
    assert ev.extra["container_id"] == CID
