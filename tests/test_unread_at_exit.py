"""The exit drain is bounded in time (1.5 s): records still in the kernel's
buffers when it runs out are lost, and must be said to be — in the exit
summary and as a `lost` record of kind `unread_at_exit` that the published
schema accepts (it once did not: the schema knew five kinds, the code wrote six).

A slow sink holds the pipeline back (a third-party plugin, installed-looking
on PYTHONPATH, that takes 0.2 s per batch); everything else is real: the
tracepoint, loopback connections, the CLI in a subprocess, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import jsonschema
import orjson
import pytest
from fakedist import fake_dist
from summary import parse_summary
from traffic import client_closes_first, free_port

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs" / "event.schema.json").read_text())

SLOW_SINK = """
import time
from tcpstates import Sink, hookimpl
class Slow(Sink):
    name = "slow"
    def write(self, batch):
        time.sleep(0.2)
@hookimpl
def tcpstates_register_sinks(register):
    register(Slow)
"""

CONNECTIONS = 200


@pytest.mark.kernel
def test_records_left_when_the_exit_drain_runs_out_are_reported_in_schema(tracer, tmp_path):
    fake_dist(tmp_path / "site", "tcpstates-slow", "1.0", "slow_plugin", SLOW_SINK)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(tmp_path / "site")) if p)}
    port = free_port()
    t = tracer("--sink", "jsonl", "--sink", "slow", "-o", "tcpstates.owner=off",
               "-o", "sources.kernel.batch_size=16", env=env)
    client_closes_first(port, CONNECTIONS)
    # 2,002 changes at 16 a batch and 0.2 s a batch: far more than the
    # drain's 1.5 s can take
    t0 = time.monotonic()
    rc, out, err = t.stop(signal.SIGTERM)
    assert time.monotonic() - t0 < 5, err
    assert rc == 0, err
    m = re.search(r", (\d+) unread at exit", err)
    assert m and int(m.group(1)) > 0, err
    unread = int(m.group(1))
    records = [orjson.loads(line) for line in out.splitlines()]
    lost = [r for r in records if r["type"] == "lost" and r["kind"] == "unread_at_exit"]
    assert len(lost) == 1 and lost[0]["count"] == lost[0]["total"] == unread, lost
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert validator.is_valid(lost[0]), list(validator.iter_errors(lost[0]))
    # every change of the load printed or counted lost (the unread ones are
    # any port's; the load is nearly all of them)
    ours = sum(1 for r in records if r["type"] == "state_change" and port in (r["lport"], r["rport"]))
    s = parse_summary(err)
    assert ours + s.reported_losses + unread >= 2 + 10 * CONNECTIONS, (ours, unread, err)
    assert ours < 2 + 10 * CONNECTIONS
