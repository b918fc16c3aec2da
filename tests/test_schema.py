"""docs/event.schema.json against real output: every field the built-in stages
write is defined there, precisely typed.

The schema leaves `state_change` and `connection` open (a third-party enricher
adds its own fields); the tests here close them (`unevaluatedProperties:
false`) so that a field the owner or container enricher writes and the schema
lacks fails. The real records come from the real CLI on the real kernel, with
the owner and container enrichers on, both event kinds, from a process in a
real Kubernetes-style cgroup with the runtime's metadata files in tmp."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import orjson
import pytest
from cgroupfs import CgroupMaker, unique
from containerroots import K8S, UID, UID_, Roots
from traffic import free_port, wait_port_settled

from tcpstates.plugins.container.layouts import CgroupInfo
from tcpstates.plugins.container.metadata import FIELDS as NAME_FIELDS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "event.schema.json").read_text())


def closed(schema: dict) -> dict:
    """The schema with state_change and connection closed to unknown keys."""
    out = copy.deepcopy(schema)
    for kind in ("state_change", "connection"):
        out["$defs"][kind]["unevaluatedProperties"] = False
    return out


STRICT = closed(SCHEMA)
VALIDATOR = jsonschema.Draft202012Validator(STRICT)


def _sample(**kw) -> dict:
    rec = {"type": "state_change", "v": 1, "seq": 1, "time": "2026-11-27T08:00:00.000000000Z",
           "time_ns": 1795766400 * 10**9, "mono_ns": 10**9, "host": "h", "skaddr": "ffff1",
           "family": "ipv4", "laddr": "10.0.0.1", "lport": 22, "raddr": "10.0.0.2", "rport": 5000,
           "oldstate": "ESTABLISHED", "newstate": "FIN_WAIT1", "span_us": 1500, "pid": 1, "tid": 1,
           "comm": "sshd", "cgroup_id": 0}
    rec.update(kw)
    return rec


def _valid(rec: dict) -> bool:
    return VALIDATOR.is_valid(rec)


def test_the_schema_is_a_valid_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(STRICT)


def test_closed_schema_rejects_an_unknown_key_and_a_mistyped_owner():
    # the closing works (allOf'd definitions count as evaluated, an unknown key does not)
    assert _valid(_sample(owner_pid=7, owner_comm="nginx", owner_start=12, owner_cgroup_id=1,
                          owner_source="io", container_id="a" * 64, k8s_pod="web-0"))
    assert not _valid(_sample(owner_pidd=7))
    # the published schema stays open to other enrichers' fields
    assert jsonschema.Draft202012Validator(SCHEMA).is_valid(_sample(owner_pidd=7))
    # documented shapes (docs/events.md, Owner fields)
    assert _valid(_sample(owner_pid=None, owner_comm=None, owner_source="unknown"))
    assert _valid(_sample(owner_pid=None, owner_comm=None, owner_source="shared", owner_candidates=[3, 4]))
    assert _valid(_sample(owner_pid=3, owner_comm="x", owner_start=5, owner_source="listener"))
    assert _valid(_sample(owner_pid=3, owner_comm="x", owner_start=None, owner_cgroup_id=9,
                          owner_source="syscall"))
    assert not _valid(_sample(owner_pid=None, owner_comm=None, owner_source="io"))        # io names one
    assert not _valid(_sample(owner_pid=3, owner_comm="x", owner_source="unknown"))       # unknown names none
    assert not _valid(_sample(owner_pid=None, owner_comm=None, owner_source="shared"))    # candidates missing
    assert not _valid(_sample(owner_pid=3, owner_comm="x", owner_start=5, owner_source="proc",
                              owner_candidates=[3, 4]))                                    # shared only
    assert not _valid(_sample(owner_pid=3, owner_comm="x", owner_start=5, owner_source="guess"))
    assert not _valid(_sample(owner_pid="3", owner_comm="x", owner_start=5, owner_source="proc"))
    assert not _valid(_sample(owner_pid=3, owner_comm="x", owner_start=5, owner_source="proc",
                              owner_cgroup_id=4))                                          # kernel sources only
    assert not _valid(_sample(owner_pid=3))                                                # the three go together
    # container fields: strings where known, never null
    assert not _valid(_sample(k8s_namespace=None))
    assert not _valid(_sample(container_runtime="rkt"))
    conn = {"type": "connection", "start_time": "2026-11-27T08:00:00.000000000Z", "start_time_ns": 1,
            "start_mono_ns": 1, "duration_us": 5, "complete": True, "closed": True, "ending": "normal",
            "error": None, "first_state": "CLOSE", "last_state": "FIN_WAIT2", "states_us": {"SYN_SENT": 5}}
    base = {k: v for k, v in _sample().items() if k not in ("oldstate", "newstate", "span_us")}
    assert _valid({**base, **conn, "owner_pid": 3, "owner_comm": "x", "owner_start": 1, "owner_cgroup_id": 2,
                   "owner_source": "syscall", "k8s_namespace": "shop", "container_image": "nginx"})
    assert not _valid({**base, **conn, "k8s_namespaces": "shop"})
    assert _valid({**base, **conn, "ending": "timeout", "error": "ETIMEDOUT"})
    assert not _valid({**base, **conn, "ending": "timedout"})
    assert not _valid({**base, **conn, "error": "econnrefused"})
    assert not _valid({k: v for k, v in {**base, **conn}.items() if k != "error"})     # always present


def _doc_table_values(heading: str) -> list[str]:
    """The backticked names in the first cells of the first table after `heading`
    in docs/events.md."""
    text = (ROOT / "docs" / "events.md").read_text()
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:            # after the header and its rule
        if not line.startswith("|"):
            break
        rows.append(line)
    return [v for row in rows for v in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])]


def test_schema_names_exactly_the_documented_owner_and_container_fields():
    owner = SCHEMA["$defs"]["owner"]["properties"]
    assert sorted(owner) == sorted(_doc_table_values("### Owner fields (`owner` enricher)"))
    assert owner["owner_source"]["enum"] == _doc_table_values("`owner_source`:")
    container = set(SCHEMA["$defs"]["container"]["properties"])
    documented = set(_doc_table_values("The `container` enricher (docs/containers.md) adds"))
    assert container == documented
    # and what the enricher can write: every CgroupInfo field and every name
    info = CgroupInfo(path="/x", container_id="a", runtime="docker", pod_uid="u", pod_qos="burstable",
                      systemd_unit="u.service", container_name="n", podman_pod_id="p", delegated_uid="1")
    assert set(info.fields()) | set(NAME_FIELDS) <= container
    for kind in ("state_change", "connection"):
        refs = [s.get("$ref") for s in SCHEMA["$defs"][kind]["allOf"]]
        assert refs == ["#/$defs/common", "#/$defs/owner", "#/$defs/container"], kind


# -- real output ------------------------------------------------------------------------
# Runs in a Kubernetes-style cgroup and makes one of each owner case (docs/events.md):
# before tracing, a listener shared with a forked child ("shared") and two connections;
# after "go": a refused connect ("syscall"), connections queued on a one-holder listener
# ("listener"), accepted ("accept"), one queued on the shared listener, and the two
# pre-existing ones closed by their clients: one unused since tracing began (its server
# side is known from /proc: "proc"), one first seen sending and receiving ("io").
WORKLOAD = r"""
import os, socket, sys, time
procs, refused, single, shared, pre = sys.argv[1], *map(int, sys.argv[2:6])
open(procs, "w").write("0")

def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    return s

shared_l = listener(shared)
r, w = os.pipe()
child = os.fork()
if child == 0:                     # holds the shared listener (only) until the parent is done
    os.close(w)
    os.read(r, 1)
    os._exit(0)
os.close(r)
pre_l = listener(pre)
pre_c, pre_s, used_c, used_s = [], [], [], []
for clients, servers in ((pre_c, pre_s), (used_c, used_s)):
    clients.append(socket.create_connection(("127.0.0.1", pre)))
    servers.append(pre_l.accept()[0])
print("ready", flush=True)
sys.stdin.readline()

c = socket.socket()
try:
    c.connect(("127.0.0.1", refused))
except ConnectionRefusedError:
    pass
c.close()
one = listener(single)
for use in (True, False):
    c = socket.create_connection(("127.0.0.1", single))
    s, _ = one.accept()
    if use:
        c.sendall(b"x")
        s.recv(1)
        s.sendall(b"y")
        c.recv(1)
    c.close()
    while use and s.recv(1):        # the FIN is in when recv returns b""
        pass
    time.sleep(0.05)                # without I/O: let the FIN arrive before the close
    s.close()
c = socket.create_connection(("127.0.0.1", shared))
s, _ = shared_l.accept()
c.close()
time.sleep(0.05)
s.close()
used_c[0].sendall(b"x")          # first seen in use (send/recv): "io" on both sides
used_s[0].recv(1)
for c, s in ((pre_c[0], pre_s[0]), (used_c[0], used_s[0])):
    c.close()
    time.sleep(0.05)
    s.close()
print("done", flush=True)
sys.stdin.readline()
os.close(w)
os.waitpid(child, 0)
"""


@pytest.fixture
def cgroups():
    maker = CgroupMaker()
    yield maker
    maker.cleanup()


def _real_records(tracer, tmp_path: Path, cgroups: CgroupMaker, *mode: str) -> tuple[list[dict], set[int], str]:
    """Every record of one traced run of WORKLOAD in a containerd pod's cgroup
    (the ports it used, the container id)."""
    cid = unique()
    roots = Roots(tmp_path)
    roots.containerd_cri(cid, f"kubepods-burstable-pod{UID_}.slice:cri-containerd:{cid}")
    cg = cgroups.make(f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
                      f"cri-containerd-{cid}.scope")
    ports = [free_port() for _ in range(4)]
    p = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(cg / "cgroup.procs"), *map(str, ports)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        out = tmp_path / "e.jsonl"
        t = tracer(*mode, "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}", "-o", roots.chain())
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "done"
        for port in ports:
            assert not wait_port_settled(port), f"port {port} never settled"
        rc, _, err = t.stop()
        assert rc == 0, err
    finally:
        p.stdin.close()
        p.wait(10)
    return [orjson.loads(line) for line in out.read_bytes().splitlines()], set(ports), cid


def _check(recs: list[dict], ports: set[int], cid: str, kind: str) -> list[dict]:
    for r in recs:                       # every record, other traffic of the host too
        errors = sorted(VALIDATOR.iter_errors(r), key=str)
        assert not errors, (r, [e.message for e in errors])
    ours = [r for r in recs if r["type"] == kind and {r["lport"], r["rport"]} & ports]
    assert ours
    expected = {"container_id": cid, "container_runtime": "containerd", "pod_uid": UID,
                "pod_qos": "burstable", **K8S}
    for r in ours:
        if r["owner_pid"] is None:       # shared or unknown: no owner, so no container either
            assert "container_id" not in r, r
        else:
            assert {k: r.get(k) for k in expected} == expected, r
    return ours


@pytest.mark.kernel
def test_real_state_changes_with_owner_and_container_fit_the_closed_schema(tracer, tmp_path, cgroups):
    recs, ports, cid = _real_records(tracer, tmp_path, cgroups)
    ours = _check(recs, ports, cid, "state_change")
    sources = {r["owner_source"] for r in ours}
    # each owner shape the schema describes occurred, so each was checked against it
    assert {"syscall", "accept", "io", "listener", "shared", "proc"} <= sources, sources
    assert any(r.get("owner_candidates") for r in ours)


@pytest.mark.kernel
def test_real_connection_records_with_owner_and_container_fit_the_closed_schema(tracer, tmp_path, cgroups):
    recs, ports, cid = _real_records(tracer, tmp_path, cgroups, "--connections")
    ours = _check(recs, ports, cid, "connection")
    # refused, two served, the shared one, the pre-existing one: client and server sides
    assert len(ours) >= 8, ours
    assert all("owner_source" in r for r in ours)
    assert any(r["owner_pid"] is not None and "owner_cgroup_id" in r for r in ours)
