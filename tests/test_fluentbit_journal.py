"""The journal path into the real Fluent Bit: tcpstates' journal sink writes to a
private real journald, Fluent Bit's `systemd` input (examples/fluent-bit/journal.conf)
reads it. The first burst on a first deployment arrives whole (Read_From_Tail Off),
and a restarted Fluent Bit resumes from its DB cursor without duplicates."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from fbcase import needs_fluent_bit, trace
from fluent_receiver import ForwardReceiver
from fluentbit import forward_output, wait_until
from journald import PrivateJournald
from tracer import tcpstates_argv

pytestmark = [needs_fluent_bit, pytest.mark.root]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fluent-bit"


@pytest.fixture
def journald(tmp_path):
    j = PrivateJournald(tmp_path / "journald").start()
    yield j
    j.stop()


def _journal_config(tmp_path: Path, journald: PrivateJournald, receiver: ForwardReceiver) -> str:
    text = (EXAMPLES / "journal.conf").read_text()
    state = tmp_path / "var_lib_fluent-bit"
    state.mkdir(exist_ok=True)
    text = text.replace("/var/lib/fluent-bit", str(state))
    text = text.replace("    Name            systemd\n",
                        f"    Name            systemd\n    Path            {journald.journal_dir}\n")
    return re.sub(r"\[OUTPUT\].*", "", text, flags=re.S) + forward_output(receiver.address)


def _burst(tmp_path: Path, journald: PrivateJournald, start: int, n: int) -> None:
    src = trace(tmp_path / f"burst{start}.jsonl", n, start=start)
    r = subprocess.run(journald.argv(tcpstates_argv("--replay", str(src), "--sink", "journal")),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    journald.sync()


def test_journal_first_burst_and_restart_lose_nothing(tmp_path, fluent_bit, journald):
    receiver = ForwardReceiver()
    try:
        cfg = _journal_config(tmp_path, journald, receiver)
        fb = fluent_bit(cfg, name="fb1")          # first deployment: no tcpstates entry yet
        _burst(tmp_path, journald, 1, 2000)
        wait_until(lambda: len(receiver.records()) >= 2000, 30, "the first burst")
        fb.stop()
        _burst(tmp_path, journald, 2001, 1000)    # while Fluent Bit is down
        fb2 = fluent_bit(cfg, name="fb2")
        wait_until(lambda: len(receiver.records()) >= 3000, 30, "the second burst")
        fb2.stop()
        # the trace's span_us is its seq: every event once, none twice
        seqs = [int(r["TCP_SPAN_US"]) for r in receiver.records()]
        assert len(seqs) == 3000 and set(seqs) == set(range(1, 3001))
        for r in receiver.records():
            assert r["TCP_LOCAL_PORT"] == "22" and r["TCP_NEW_STATE"] == "FIN_WAIT1"
            assert r["TCP_EVENT_TIME"].startswith("2026-11-27T08:00:00.") and r["TCP_EVENT_TIME_USEC"]
    finally:
        receiver.stop()
