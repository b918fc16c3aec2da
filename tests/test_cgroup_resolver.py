"""Bounded cost of resolving cgroup ids (issue 12, item 5): an id whose cgroup
is gone is remembered as unresolvable, so asking again — once per event of an
exited container's process — neither walks the cgroup tree nor asks the
kernel again. The cgroups are real (made and removed under the host's cgroup
v2 mount); the cost is read from the resolver's own counters (`walks`,
`handle_lookups`)."""

from __future__ import annotations

import os

import pytest
from cgroupfs import CgroupMaker, unique

from tcpstates.api import RunContext
from tcpstates.events import Event
from tcpstates.plugins.container.cgroups import CgroupIdResolver
from tcpstates.plugins.container.enricher import ContainerEnricher, ContainerOptions

pytestmark = pytest.mark.root
N = 1000


@pytest.fixture
def cgroups():
    maker = CgroupMaker()
    yield maker
    maker.cleanup()


def _gone_and_live(cgroups: CgroupMaker) -> tuple[int, int, str]:
    """(id of a removed docker cgroup, id of a live one made after it, its path)."""
    gone = cgroups.make(f"system.slice/docker-{unique()}.scope")
    live_rel = f"system.slice/docker-{unique()}.scope"
    live = cgroups.make(live_rel)
    gone_id, live_id = os.stat(gone).st_ino, os.stat(live).st_ino    # kernfs node id = cgroup id
    assert live_id > gone_id                                         # kernfs ids only grow
    gone.rmdir()
    return gone_id, live_id, "/" + live_rel


def test_a_gone_id_asks_the_kernel_once_however_often_it_is_looked_up(cgroups):
    gone_id, live_id, live_path = _gone_and_live(cgroups)
    r = CgroupIdResolver(rescan_interval=0)
    try:
        if r._open_by_handle is None:
            pytest.skip("open_by_handle_at on the cgroup mount is not available here (walk path below)")
        assert r.path(live_id) == live_path and r.handle_lookups == 1
        for _ in range(N):
            assert r.path(gone_id) is None
        assert r.handle_lookups == 2 and r.walks == 0, (r.handle_lookups, r.walks)
        assert r.path(live_id) == live_path and r.handle_lookups == 2      # cached too
    finally:
        r.close()


def test_without_handles_a_gone_id_costs_one_tree_walk_in_all(cgroups):
    """The fallback where handles do not work: the tree is walked, and a gone
    id costs one walk, not one per lookup — even with no rescan interval."""
    gone_id, live_id, live_path = _gone_and_live(cgroups)
    r = CgroupIdResolver(use_handles=False, rescan_interval=0)
    for _ in range(N):
        assert r.path(gone_id) is None
    assert r.walks == 1 and r.handle_lookups == 0, r.walks
    assert r.path(live_id) == live_path and r.walks == 1                 # found by that walk


def test_without_handles_an_id_above_every_walk_is_walked_for_at_most_once_per_interval(cgroups):
    """An id the last walk cannot rule out (above every id it saw, e.g. the
    newest cgroup, removed before it was ever looked up) is walked for again
    only after `rescan_interval`."""
    newest = cgroups.make(f"system.slice/docker-{unique()}.scope")
    newest_id = os.stat(newest).st_ino
    newest.rmdir()
    r = CgroupIdResolver(use_handles=False, rescan_interval=3600)
    beyond = newest_id + (1 << 40)          # no cgroup can have it yet
    for _ in range(N):
        assert r.path(beyond) is None
    assert r.walks == 1, r.walks


def test_the_enricher_resolves_a_gone_cgroup_once_for_all_its_events(cgroups):
    """N events of an exited container process whose cgroup is gone (the owner's
    id as the kernel captured it): one question to the kernel for all of them,
    no walk, and no container guessed."""
    gone_id, _, _ = _gone_and_live(cgroups)
    enricher = ContainerEnricher(ContainerOptions(hybrid="no", names=False, docker_socket=""), RunContext())
    events = [Event(ts_ns=10**9 + i, skaddr=i, span_ns=None, pid=1, tid=1, comm="x", family=2,
                    saddr="127.0.0.1", sport=1, daddr="127.0.0.1", dport=2, oldstate=1, newstate=4,
                    cgroup_id=0, extra={"owner_pid": 999_999_999, "owner_cgroup_id": gone_id})
              for i in range(N)]
    for start in range(0, N, 100):            # batches, as the pipeline hands them over
        enricher.enrich_batch(events[start:start + 100])
    res = enricher.resolver
    assert res.walks + res.handle_lookups == 1, (res.walks, res.handle_lookups)
    assert not any("container_id" in e.extra for e in events)
