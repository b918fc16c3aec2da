"""The journal path into the real Fluent Bit: tcpstates' journal sink writes to a
private real journald, Fluent Bit's `systemd` input (examples/fluent-bit/journal.conf)
reads it. The first burst on a first deployment arrives whole (Read_From_Tail Off),
and a Fluent Bit stopped or killed while holding undelivered entries loses none
(storage.type filesystem) and resumes from its DB cursor."""

from __future__ import annotations

import re
import signal
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_journal_first_burst_and_restart_lose_nothing(tmp_path, fluent_bit, journald, sig):
    """First deployment: the first burst arrives whole. Then Fluent Bit goes down
    holding entries it has read (its cursor moved past them) but not delivered —
    its output's receiver never acks — and 1,000 more are written meanwhile:
    journal.conf's `storage.type filesystem` keeps the held ones (memory
    buffering lost 680-1,971 of 21,000 to a SIGKILL), the DB cursor the rest."""
    receiver, stuck = ForwardReceiver(), ForwardReceiver(ack=False)
    try:
        fb = fluent_bit(_journal_config(tmp_path, journald, receiver), name="fb1")   # no tcpstates entry yet
        _burst(tmp_path, journald, 1, 2000)
        wait_until(lambda: len(receiver.records()) >= 2000, 30, "the first burst")
        fb.stop()
        fb2 = fluent_bit(_journal_config(tmp_path, journald, stuck), name="fb2")
        _burst(tmp_path, journald, 2001, 2000)
        wait_until(lambda: len(stuck.records()) >= 1000, 30, "Fluent Bit to read and try to ship")
        stuck.stop()      # its output now retries (a graceful stop cannot finish a wait for an ack)
        fb2.stop(sig)
        _burst(tmp_path, journald, 4001, 1000)    # while Fluent Bit is down
        fb3 = fluent_bit(_journal_config(tmp_path, journald, receiver), name="fb3")
        wait_until(lambda: len({r["TCP_SPAN_US"] for r in receiver.records()}) >= 5000, 30, "all entries",
                   fail=False)
        fb3.stop()
        # the trace's span_us is its seq: every event at least once, once after SIGTERM
        seqs = [int(r["TCP_SPAN_US"]) for r in receiver.records()]
        assert set(seqs) == set(range(1, 5001)), f"{5000 - len(set(seqs))} entries lost"
        if sig == signal.SIGTERM:
            assert len(seqs) == 5000, f"{len(seqs) - 5000} duplicates"
        for r in receiver.records():
            assert r["TCP_LOCAL_PORT"] == "22" and r["TCP_NEW_STATE"] == "FIN_WAIT1"
            assert r["TCP_EVENT_TIME"].startswith("2026-11-27T08:00:00.") and r["TCP_EVENT_TIME_USEC"]
        print(f"journal restart {sig.name}: received {len(seqs)}, lost 0, duplicates {len(seqs) - 5000}")
    finally:
        receiver.stop()
        stuck.stop()
