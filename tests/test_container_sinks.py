"""Kubernetes and container names through the journal and the forward sink
(docs/events.md: `TCP_K8S_NAMESPACE`, `TCP_K8S_POD`, ... in the journal, the
same keys as the JSON record through Fluent Bit).

Real throughout: a process in a real containerd pod cgroup (systemd driver)
makes refused connects, traced by the real CLI; containerd's OCI bundle
(config.json) is laid out in tmp as containerd writes it, its annotations
carrying names a node's files could hold — control characters, a backslash,
'=', non-ASCII — which the enricher escapes once (\\xNN, \\\\); a private real
journald, and the real Fluent Bit in front of our forward receiver. Each
destination must hold the names exactly as the JSON Lines sink of the same run
wrote them."""

from __future__ import annotations

import orjson
import pytest
from cgroupfs import CgroupMaker, run_in, unique
from containerroots import UID, UID_, Roots
from fbcase import needs_fluent_bit
from fluent_receiver import ForwardReceiver
from fluentbit import forward_output, wait_until
from journald import PrivateJournald
from summary import parse_summary
from traffic import free_port

pytestmark = pytest.mark.kernel

NAMES = {"ns": "shop\x7f=1", "pod": "web-7d\n9\x1b[31m=x\\y", "name": "nginx-ü",
         "image": "reg.local:5000/a/nginx:1.27"}
# as the enricher writes them: control characters as \xNN, a backslash doubled
ESCAPED = {"k8s_namespace": "shop\\x7f=1", "k8s_pod": "web-7d\\x0a9\\x1b[31m=x\\\\y",
           "k8s_container": "nginx-ü", "container_name": "nginx-ü",
           "container_image": "reg.local:5000/a/nginx:1.27"}
COUNT = 2              # refused connects: 2 events each


@pytest.fixture
def cgroups():
    maker = CgroupMaker()
    yield maker
    maker.cleanup()


@pytest.fixture
def pod(tmp_path, cgroups):
    """(the pod container's cgroup, the metadata roots, its container id)."""
    cid = unique()
    roots = Roots(tmp_path)
    roots.containerd_cri(cid, f"kubepods-burstable-pod{UID_}.slice:cri-containerd:{cid}", ns=NAMES["ns"],
                         pod=NAMES["pod"], name=NAMES["name"], image=NAMES["image"])
    path = cgroups.make(f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
                        f"cri-containerd-{cid}.scope")
    return path, roots, cid


def _jsonl(out: str, cid: str) -> dict[tuple[int, str, str, int], dict]:
    """The JSON Lines records of the run, checked for the names, by (local port,
    old state, new state, µs of the time: what a journal entry has)."""
    recs = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    assert len(recs) == 2 * COUNT, recs
    for r in recs:
        assert {k: r.get(k) for k in ESCAPED} == ESCAPED, r
        assert r["container_id"] == cid and r["pod_uid"] == UID and r["container_runtime"] == "containerd"
    by_key = {(r["lport"], r["oldstate"], r["newstate"], r["time_ns"] // 1000): r for r in recs}
    assert len(by_key) == len(recs)
    return by_key


@pytest.fixture
def journald(tmp_path):
    j = PrivateJournald(tmp_path / "journald").start()
    yield j
    j.stop()


def test_kubernetes_names_reach_the_journal_intact_and_escaped(tracer, journald, pod):
    path, roots, cid = pod
    port = free_port()
    t = tracer("--sink", "jsonl", "--sink", "journal", "-D", str(port), "-o", roots.chain(),
               wrap=journald.argv)
    run_in([path], port, count=COUNT).wait(10)
    rc, out, err = t.stop()
    assert rc == 0, err
    assert parse_summary(err).written == {"jsonl": 2 * COUNT, "journal": 2 * COUNT}, err
    recs = _jsonl(out, cid)
    journald.sync()
    entries = journald.read("SYSLOG_IDENTIFIER=tcpstates")
    assert len(entries) == 2 * COUNT, entries
    fields = {"TCP_" + k.upper(): k for k in (*ESCAPED, "container_id", "container_runtime", "pod_uid",
                                               "pod_qos", "cgroup", "owner_comm")}
    for e in entries:
        r = recs[(int(e["TCP_LOCAL_PORT"]), e["TCP_OLD_STATE"], e["TCP_NEW_STATE"], int(e["TCP_EVENT_TIME_USEC"]))]
        assert {f: e.get(f) for f in fields} == {f: r[k] for f, k in fields.items()}, e
        # journalctl -o json gives a field with a raw control character as a byte
        # array, never a string: these are strings, escaped once
        assert e["TCP_K8S_POD"] == ESCAPED["k8s_pod"] and e["TCP_K8S_NAMESPACE"] == ESCAPED["k8s_namespace"]


@pytest.fixture
def receiver():
    rx = ForwardReceiver()
    yield rx
    rx.stop()


@needs_fluent_bit
def test_kubernetes_names_reach_fluent_bit_intact_and_escaped(tracer, fluent_bit, receiver, pod):
    path, roots, cid = pod
    port, fb_port = free_port(), free_port()
    fb = fluent_bit(f"[INPUT]\n    Name forward\n    Listen 127.0.0.1\n    Port {fb_port}\n"
                    + forward_output(receiver.address), wait_for=("127.0.0.1", fb_port))
    t = tracer("--sink", "jsonl", "--sink", "forward", "-D", str(port), "-o", roots.chain(),
               "-o", f"sinks.forward.address=127.0.0.1:{fb_port}", "-o", "sinks.forward.exit_timeout=30")
    run_in([path], port, count=COUNT).wait(10)
    rc, out, err = t.stop()
    assert rc == 0, err
    assert f"forward: {2 * COUNT} queued, {2 * COUNT} acknowledged, 0 lost" in err, err
    recs = _jsonl(out, cid)
    wait_until(lambda: len(receiver.records()) >= 2 * COUNT, 30, f"{2 * COUNT} records out of Fluent Bit")
    fb.stop()
    got = [r for _, _, r in receiver.entries]
    assert len(got) == 2 * COUNT
    for r in got:
        # field for field (names, values and types) what the JSON Lines sink wrote
        assert r == recs[(r["lport"], r["oldstate"], r["newstate"], r["time_ns"] // 1000)], r
        assert {k: r[k] for k in ESCAPED} == ESCAPED
