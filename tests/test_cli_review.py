"""Command-line behaviour that the plugin architecture must not change: help and
version always answer, flags beat defaults even where a default's plugin is
disabled, bcc's flag order, and plugins that do not match the hooks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import orjson
from fakedist import fake_dist
from tracer import run_cli, run_cli_reader_gone

ROOT = Path(__file__).resolve().parent.parent
BCC_HELP = ROOT / "tests" / "fixtures" / "bcc" / "help.txt"
RECORD = {"type": "state_change", "v": 1, "seq": 1, "time": "2026-11-27T08:00:00.000000000Z",
          "time_ns": 1795766400 * 10**9, "mono_ns": 10**9, "host": "h", "skaddr": "ffff1",
          "family": "ipv4", "laddr": "127.0.0.1", "lport": 40000, "raddr": "127.0.0.1", "rport": 80,
          "oldstate": "SYN_SENT", "newstate": "ESTABLISHED", "span_us": 5, "pid": 0, "tid": 0,
          "comm": "swapper/0", "cgroup_id": 0}


def test_help_and_version_answer_with_a_broken_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("x=\n")
    for flag in ("-h", "--version"):
        r = run_cli("--config", str(bad), flag)
        assert r.returncode == 0, r.stderr
        assert r.stdout and not r.stderr
    # without -h the same config is the usual one-line error
    r = run_cli("--config", str(bad), "--replay", os.devnull)
    assert r.returncode == 2 and b"malformed TOML" in r.stderr


def test_help_lists_bccs_flags_in_bccs_order():
    ours = run_cli("-h").stdout.decode()
    bcc = BCC_HELP.read_text()
    flags = ["-T", "-t", "-w", "-s", "-L", "-D", "-Y", "-4", "-6"]
    def order(text: str) -> list[str]:
        usage = text.split("\n\n")[0]
        return [f for f in re.findall(r"(?<![\w-])-[A-Za-z0-9](?![\w-])", usage) if f in flags]
    assert order(ours) == order(bcc) == flags


def test_a_flag_beats_a_default_whose_plugin_is_disabled(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\ndisable = ["bcc_table"]\n')
    r = run_cli("--config", str(cfg), "--replay", "-", "--sink", "jsonl", "--no-summary",
                input=orjson.dumps(RECORD) + b"\n")
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["newstate"] == "ESTABLISHED"
    # with no flag, the default sink's absence is named as the default it is
    r = run_cli("--config", str(cfg), "--replay", os.devnull)
    assert r.returncode == 2 and b"tcpstates.sinks: unknown sink 'text'" in r.stderr


def test_a_replay_works_where_the_kernel_plugin_is_disabled(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\ndisable = ["kernel"]\n')
    r = run_cli("--config", str(cfg), "--replay", "-", "--no-summary", input=orjson.dumps(RECORD) + b"\n")
    assert r.returncode == 0, r.stderr
    assert b"ESTABLISHED" in r.stdout


def test_process_filter_accepts_pid_0_the_idle_task(tmp_path):
    r = run_cli("--replay", "-", "--no-summary", "-o", 'chain=[{use="process", pid=[0]}]',
                input=orjson.dumps(RECORD) + b"\n")
    assert r.returncode == 0, r.stderr
    assert b"swapper/0" in r.stdout


def test_a_setting_of_a_disabled_plugin_says_so(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\ndisable = ["owner"]\n[tcpstates]\nowner = "on"\n')
    r = run_cli("--config", str(cfg), "--replay", os.devnull)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1
    assert "tcpstates.owner: no enabled plugin uses this setting" in err


def test_ebpf_into_a_closed_pipe_is_quiet():
    r = run_cli_reader_gone("--ebpf")
    assert r.returncode == 0 and r.stderr == b"", r.stderr


HOOK_WITH_A_WRONG_ARGUMENT = """
from tcpstates import Sink, hookimpl
class Odd(Sink):
    name = "odd"
    def write(self, batch): pass
@hookimpl
def tcpstates_register_sinks(registr):
    registr(Odd)
"""


def test_a_plugin_whose_hook_does_not_match_is_named_and_skipped(tmp_path):
    fake_dist(tmp_path, "tcpstates-odd", "0.2", "odd_plugin", HOOK_WITH_A_WRONG_ARGUMENT)
    env = {"PYTHONPATH": str(tmp_path)}
    r = run_cli("--replay", os.devnull, "--no-summary", env=env)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert err.count("\n") == 1 and "tcpstates-odd 0.2" in err and "registr" in err
    strict = run_cli("--replay", os.devnull, "--strict", env=env)
    assert strict.returncode == 2 and b"tcpstates-odd 0.2" in strict.stderr
    assert b"Traceback" not in strict.stderr and b"internal error" not in strict.stderr
    # disabling it by distribution name silences it
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\ndisable = ["tcpstates-odd"]\n')
    quiet = run_cli("--config", str(cfg), "--replay", os.devnull, "--no-summary", env=env)
    assert quiet.returncode == 0 and quiet.stderr == b"", quiet.stderr


RAISING_REGISTER_HOOK = """
from tcpstates import hookimpl
@hookimpl
def tcpstates_register_filters(register):
    raise RuntimeError("no filters today")
"""


def test_a_plugin_whose_register_hook_raises_is_named(tmp_path):
    fake_dist(tmp_path, "tcpstates-grumpy", "3.1", "grumpy_plugin", RAISING_REGISTER_HOOK)
    r = run_cli("--replay", os.devnull, env={"PYTHONPATH": str(tmp_path)})
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert "grumpy_plugin" in err and "tcpstates-grumpy 3.1" in err and "no filters today" in err
    assert "internal error" not in err
