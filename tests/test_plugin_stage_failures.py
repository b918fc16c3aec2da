"""Third-party stages that break in ways the hooks' checks did not reach
(issue 11 #3, issue 14: "a plugin that raises is named", "one failing sink
never kills others"): a constructor that raises, a name or Options the
listing cannot show, a sink that calls sys.exit(). Each was an "internal
error" (or a silent exit) naming no plugin. Real CLI in a subprocess, each
plugin an installed-looking distribution on PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import subprocess

import orjson
import pytest
from fakedist import fake_dist
from replayrec import replay_record, wait_for
from tracer import one_line_error, run_cli, tcpstates_argv

HEAD = """
import dataclasses, pathlib, sys
from tcpstates import Filter, Sink, hookimpl, option
"""

RAISING_CONSTRUCTORS = HEAD + """
class Touchy(Sink):
    name = "touchy"
    def __init__(self, options, context):
        super().__init__(options, context)
        raise RuntimeError("no config file for touchy")
    def write(self, batch): pass
class Picky(Filter):
    name = "picky"
    def __init__(self, options, context):
        super().__init__(options, context)
        raise KeyError("picky")
    def keep(self, event): return True
@hookimpl
def tcpstates_register_sinks(register):
    register(Touchy)
@hookimpl
def tcpstates_register_filters(register):
    register(Picky)
"""


def _env(tmp_path, dist, module, source):
    fake_dist(tmp_path / "site", dist, "2.0", module, source)
    # (after any PYTHONPATH already set: a run against another tcpstates tree)
    return {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(tmp_path / "site")) if p)}


def _trace(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(replay_record(i) for i in range(1, 6)))
    return path


@pytest.mark.parametrize("how", ["sink", "filter"])
def test_a_stage_whose_constructor_raises_is_named(tmp_path, how):
    env = _env(tmp_path, "tcpstates-touchy", "touchy_plugin", RAISING_CONSTRUCTORS)
    if how == "sink":
        args = ["--sink", "touchy", "--sink", "text"]
        needle = "failed to create sink sinks.touchy (touchy): RuntimeError: no config file for touchy"
    else:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[[chain]]\nuse = "picky"\n')
        args = ["--config", str(cfg)]
        needle = "failed to create filter chain[0] (picky): KeyError: 'picky'"
    r = run_cli("--replay", str(_trace(tmp_path)), *args, env=env)
    err = one_line_error(r, needle)
    assert "plugin 'touchy_plugin' (tcpstates-touchy 2.0)" in err, err
    assert r.stdout == b""      # nothing half-started: the run did not begin


NAMED = HEAD + """
class Odd(Sink):
    name = {name!r}
    def write(self, batch): pass
@hookimpl
def tcpstates_register_sinks(register):
    register(Odd)
"""


@pytest.mark.parametrize("name", [5, "two words", "red\x1b[31m", "line\nbreak"])
def test_a_stage_name_that_is_not_a_plain_word_is_refused_with_the_plugin_named(tmp_path, name):
    env = _env(tmp_path, "tcpstates-odd", "odd_plugin", NAMED.format(name=name))
    for args in (["plugins"], ["--replay", str(_trace(tmp_path))]):
        err = one_line_error(run_cli(*args, env=env), "plugin 'odd_plugin' (tcpstates-odd)")
        assert "is not a plain word" in err and "\x1b" not in err, err


UNREADABLE_OPTIONS = HEAD + """
@dataclasses.dataclass
class Opts:
    level: "NoSuchType" = option(1, "a level")
class Broken(Sink):
    name = "broken"
    Options = Opts
    def write(self, batch): pass
@hookimpl
def tcpstates_register_sinks(register):
    register(Broken)
"""


def test_options_that_cannot_be_read_are_named_not_an_internal_error(tmp_path):
    env = _env(tmp_path, "tcpstates-broken", "broken_plugin", UNREADABLE_OPTIONS)
    for args in (["plugins"], ["plugins", "--json"], ["--replay", str(_trace(tmp_path))]):
        err = one_line_error(run_cli(*args, env=env), "plugin 'broken_plugin' (tcpstates-broken)")
        assert "sink 'broken' whose Options cannot be read (NameError" in err, err


ODD_DEFAULTS = HEAD + """
@dataclasses.dataclass
class Opts:
    where: pathlib.Path = option(pathlib.Path("/var/lib/x"), "a directory")
    raw: bytes = option(b"\\x00", "bytes")
    ports: frozenset = option(frozenset({{80}}), "a set")
    by_state: dict = dataclasses.field(default_factory=lambda: {{1: "ESTABLISHED"}}, metadata={{"help": "map"}})
class Defaults(Sink):
    name = "defaults"
    Options = Opts
    def write(self, batch): pass
@hookimpl
def tcpstates_register_sinks(register):
    register(Defaults)
"""


def test_plugins_lists_options_whose_defaults_json_cannot_hold(tmp_path):
    """One plugin's Path or set default made `tcpstates plugins` an internal
    error: the listing an operator runs to find the broken plugin."""
    env = _env(tmp_path, "tcpstates-defaults", "defaults_plugin", ODD_DEFAULTS.format())
    r = run_cli("plugins", env=env)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert 'where = "/var/lib/x"' in out and 'by_state = {"1":"ESTABLISHED"}' in out, out
    assert "text (sink) from tcpstates" in out          # the others are still listed
    j = run_cli("plugins", "--json", env=env)
    assert j.returncode == 0, j.stderr
    rows = {row["name"]: row for row in orjson.loads(j.stdout)}
    assert {o["name"]: o["default"] for o in rows["defaults"]["options"]}["ports"] == "frozenset({80})"


EXITING_SINK = HEAD + """
class Quitter(Sink):
    name = "quitter"
    def {method}(self, *args):
        sys.exit(3)
    def write(self, batch):
        if {method!r} == "write":
            sys.exit(3)
@hookimpl
def tcpstates_register_sinks(register):
    register(Quitter)
"""


@pytest.mark.parametrize("method", ["open", "write", "close"])
def test_a_sink_that_calls_sys_exit_costs_only_itself(tmp_path, method):
    """sys.exit() in a sink ended the whole run: no summary, the other sinks cut
    off, the exit status the plugin's (3; 0 from write)."""
    env = _env(tmp_path, "tcpstates-quitter", "quitter_plugin", EXITING_SINK.format(method=method))
    out = tmp_path / "e.jsonl"
    r = run_cli("--replay", str(_trace(tmp_path)), "--sink", "quitter", "--sink", "jsonl",
                "-o", f"sinks.jsonl.path={out}", env=env)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "sink quitter (quitter) failed" in err and "SystemExit: 3" in err, err
    summary = err.strip().splitlines()[-1]
    assert "5 events seen" in summary and "jsonl 5" in summary, err
    assert out.read_bytes().count(b'"type":"state_change"') == 5


BLOCKING_SINK = HEAD + """
import os, select
class Stuck(Sink):
    name = "stuck"
    def write(self, batch):
        open(os.environ["STUCK_MARK"], "w").close()   # the test's readiness signal
        select.select([], [], [])      # a call without a timeout that never returns
@hookimpl
def tcpstates_register_sinks(register):
    register(Stuck)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_ends_a_run_a_stage_keeps_blocked(tmp_path, sig):
    """Every wait of tcpstates' own ends at the first SIGTERM; a third-party
    sink blocked in a call without a timeout kept the run alive through any
    number of them (only SIGKILL ended it). The second one now ends it at once,
    with one line naming the stage."""
    mark = tmp_path / "in-write"
    env = {**_env(tmp_path, "tcpstates-stuck", "stuck_plugin", BLOCKING_SINK), "STUCK_MARK": str(mark)}
    proc = subprocess.Popen(tcpstates_argv("--replay", str(_trace(tmp_path)), "--sink", "stuck"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **env})
    try:
        wait_for(mark.exists, "the sink's write started")
        proc.send_signal(sig)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1)                 # the first one cannot end it: the stage holds the run
        proc.send_signal(sig)
        rc = proc.wait(2)
        err = proc.stderr.read().decode()
        assert rc == 128 + sig, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"stopped at once by a second {signal.Signals(sig).name} while the stuck stage was " \
               "blocked in write()" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


PARTIAL_SINK = HEAD + """
from tcpstates import mark_written
class Partial(Sink):
    name = "partial"
    def write(self, batch):
        with open(pathlib.Path({out!r}), "ab") as f:
            for i, e in enumerate(batch):
                if i == 3:
                    raise mark_written(OSError(28, "No space left on device"), i)
                f.write(b"%d\\n" % e.sport)
@hookimpl
def tcpstates_register_sinks(register):
    register(Partial)
"""


@pytest.mark.parametrize("marked", [True, False])
def test_a_third_party_sink_that_fails_part_way_is_counted_as_its_file_holds(tmp_path, marked):
    """The public `mark_written` (docs/plugins.md): a sink that wrote 3 of a batch of
    5 and then failed is summarised as 3 written and 2 lost — what its file holds;
    without the mark, the whole batch counts as lost."""
    out = tmp_path / "partial.out"
    source = PARTIAL_SINK.format(out=str(out))
    if not marked:
        source = source.replace("raise mark_written(OSError(28, \"No space left on device\"), i)",
                                "raise OSError(28, \"No space left on device\")")
    env = _env(tmp_path, "tcpstates-partial", "partial_plugin", source)
    good = tmp_path / "good.jsonl"
    r = run_cli("--replay", str(_trace(tmp_path)), "--sink", "partial", "--sink", "jsonl",
                "-o", f"sinks.jsonl.path={good}", env=env)
    err = r.stderr.decode()
    assert r.returncode == 0, err                       # another sink works: not every sink failed
    held = len(out.read_bytes().splitlines())
    assert held == 3, out.read_bytes()
    summary = err.strip().splitlines()[-1]
    assert f"written: partial {3 if marked else 0}, jsonl 5" in summary, err
    assert f"not written: partial {2 if marked else 5}" in summary, err
    assert "No space left on device" in err, err


def test_mark_written_takes_only_counts_within_the_batch_and_never_replaces_the_error():
    import dataclasses as dc

    from tcpstates.errors import mark_written, written_before

    @dc.dataclass(frozen=True)
    class Frozen(Exception):
        why: str

    frozen = Frozen("no attributes here")
    assert mark_written(frozen, 3) is frozen and written_before(frozen, 5) == 0   # the sink's own error
    for n, expected in ((3, 3), (5, 5), (6, 0), (-1, 0), (True, 0), (2.0, 0)):
        assert written_before(mark_written(OSError(), n), 5) == expected, n
    assert written_before(OSError(), 5) == 0
