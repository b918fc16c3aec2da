"""The plugin platform: entry points, the example package end to end, failure
isolation, duplicates, disabling, hook docs and hook-call order."""

from __future__ import annotations

import inspect
import os
import socket
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from fakedist import fake_dist, sink_plugin
from tracer import one_line_error, run_cli

from tcpstates import hookspecs
from tcpstates.api import Filter, Sink
from tcpstates.errors import StageError
from tcpstates.hookspecs import hookimpl
from tcpstates.testing import make_event, run_pipeline

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tcpstates-services"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def example_installed():
    """pip-installs examples/tcpstates-services into this environment (as a user would)."""
    before = _pip("show", "tcpstates-services").returncode == 0
    r = _pip("install", "--no-build-isolation", "--no-deps", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    yield
    if not before:
        _pip("uninstall", "-y", "tcpstates-services")


def test_example_is_listed_with_distribution_and_options(example_installed):
    r = run_cli("plugins", "--json")
    assert r.returncode == 0, r.stderr
    rows = {(p["kind"], p["name"]): p for p in orjson.loads(r.stdout)}
    svc = rows[("enricher", "services")]
    assert (svc["distribution"], svc["version"]) == ("tcpstates-services", "1.0.0")
    assert "services database" in svc["description"]
    assert {"name": "unknown", "type": "a string", "default": "",
            "help": 'value for ports without a name ("" leaves the field out)'} in svc["options"]
    assert rows[("sink", "service_counts")]["distribution"] == "tcpstates-services"
    assert rows[("filter", "slow_handshake")]["distribution"] == "tcpstates-services"
    assert rows[("sink", "text")]["distribution"] == "tcpstates"
    for kind in ("source", "filter", "sink"):
        assert any(k == kind for k, _ in rows)
    text = run_cli("plugins").stdout.decode()
    assert "services (enricher) from tcpstates-services 1.0.0:" in text
    assert '    min_ms = 100.0  (a number) [0..1000000000.0] keep SYN_SENT->ESTABLISHED slower than this' in text
    # the schema's bounds and choices are shown
    proto = next(o for o in svc["options"] if o["name"] == "protocol")
    assert proto["choices"] == ["tcp", "udp", "sctp"]


def test_the_examples_own_tests_pass(example_installed):
    """examples/tcpstates-services/tests, as its README tells a plugin author to
    run them (pytest's testpaths cover only tests/: run here, so ./test.sh runs them)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(EXAMPLE / "tests")], capture_output=True, text=True, timeout=300, cwd=EXAMPLE,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    collected = len(re.findall(r"^def test_", (EXAMPLE / "tests" / "test_services.py").read_text(), re.M))
    assert re.search(rf"(?<!\d){collected} passed", r.stdout), r.stdout[-2000:]


REPLAY_RECORD = {"type": "state_change", "v": 1, "seq": 1, "time": "2026-11-27T08:00:00.000000000Z",
                 "time_ns": 1795766400 * 10**9, "mono_ns": 10**9, "host": "h", "skaddr": "ffff1",
                 "family": "ipv6", "laddr": "::1", "lport": 50000, "raddr": "::1", "rport": 443,
                 "oldstate": "SYN_SENT", "newstate": "ESTABLISHED", "span_us": 12, "pid": 1, "tid": 1,
                 "comm": "curl", "cgroup_id": 0}


def test_third_party_sink_adds_its_own_flag(example_installed, tmp_path):
    """examples/tcpstates-services' --service-counts: a flag from a third-party
    package, shown in -h, folded in by its own configure hook, through the real CLI."""
    assert b"--service-counts FILE" in run_cli("-h").stdout
    out = tmp_path / "counts.txt"
    r = run_cli("--replay", "-", "--service-counts", str(out), "--no-summary",
                input=orjson.dumps(REPLAY_RECORD) + b"\n")
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "1 https\n"
    assert b"ESTABLISHED" in r.stdout, "the default text sink keeps running beside it"


def test_a_third_party_sink_is_never_taken_for_a_structured_builtin(example_installed):
    """Only sinks that declare `structured = True` (jsonl, journal, forward) turn the
    owner enricher on by themselves; a third-party sink does not."""
    from tcpstates.api import Warner
    from tcpstates.cli import build_parser, configure
    from tcpstates.registry import make_plugin_manager

    registry = make_plugin_manager(warner=Warner())
    def chain(*argv: str) -> list[str]:
        args = build_parser(registry).parse_args(list(argv))
        return [s.name for s in configure(args, {}, registry).chain]
    assert chain("--sink", "service_counts") == []
    assert chain("--sink", "service_counts", "--sink", "jsonl") == ["owner"]
    assert chain("--sink", "service_counts", "--owner") == ["owner", "container"]   # WORKLOAD column
    assert chain("--sink", "jsonl", "--replay", "x.jsonl") == [], "a replay keeps its recorded owners"


def test_example_configured_from_toml_changes_replayed_output(example_installed, tmp_path):
    cfg = tmp_path / "tcpstates.toml"
    cfg.write_text('[tcpstates]\nsinks = ["jsonl"]\n[[chain]]\nuse = "services"\nunknown = "-"\n')
    rec = {"type": "state_change", "v": 1, "seq": 1, "time": "2026-11-27T08:00:00.000000000Z",
           "time_ns": 1795766400 * 10**9, "mono_ns": 10**9, "host": "h", "skaddr": "ffff1",
           "family": "ipv6", "laddr": "::1", "lport": 50000, "raddr": "::1", "rport": 443,
           "oldstate": "SYN_SENT", "newstate": "ESTABLISHED", "span_us": 12, "pid": 1, "tid": 1,
           "comm": "curl", "cgroup_id": 0}
    r = run_cli("--config", str(cfg), "--replay", "-", "--no-summary", input=orjson.dumps(rec) + b"\n")
    assert r.returncode == 0, r.stderr
    out = orjson.loads(r.stdout)
    assert (out["lservice"], out["rservice"]) == ("-", "https")


def _named_port() -> tuple[int, str]:
    for port in (13, 17, 19, 37, 79, 113, 119):
        try:
            name = socket.getservbyport(port, "tcp")
        except OSError:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port, name
    pytest.fail("no free port with a name in /etc/services (install netbase)")


@pytest.mark.kernel
def test_example_enriches_real_kernel_events(example_installed, tracer, tmp_path):
    from traffic import session
    port, name = _named_port()
    out = tmp_path / "e.jsonl"
    t = tracer("--sink", "jsonl", "-L", str(port), "-o", f"sinks.jsonl.path={out}",
               "-o", 'chain=[{use="services"}]')
    session(socket.AF_INET, port, hold=0.01, server_delay=0.0)
    rc, _, err = t.stop()
    assert rc == 0, err
    recs = [orjson.loads(l) for l in out.read_bytes().splitlines()]
    assert len(recs) == 7 and all(r["lservice"] == name for r in recs)


def test_example_package_own_tests_pass(example_installed):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(EXAMPLE / "tests")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 passed" in r.stdout


SINK_PLUGIN = sink_plugin("dup")


def test_plugin_failing_to_import_is_a_warning_and_others_still_load(tmp_path):
    fake_dist(tmp_path, "tcpstates-broken", "0.3", "broken_plugin", "raise RuntimeError('boom at import')\n")
    fake_dist(tmp_path, "tcpstates-good", "2.0", "good_plugin", SINK_PLUGIN)
    env = {"PYTHONPATH": str(tmp_path)}
    r = run_cli("plugins", env=env)
    assert r.returncode == 0
    err = r.stderr.decode()
    assert "tcpstates-broken 0.3" in err and "boom at import" in err and err.count("\n") == 1
    assert "dup (sink) from tcpstates-good 2.0" in r.stdout.decode()
    strict = run_cli("--replay", os.devnull, "--strict", env=env)
    assert strict.returncode == 2 and b"tcpstates-broken 0.3" in strict.stderr
    assert b"Traceback" not in strict.stderr


def test_duplicate_stage_names_name_both_distributions(tmp_path):
    fake_dist(tmp_path, "tcpstates-one", "1.0", "dup_one", SINK_PLUGIN)
    fake_dist(tmp_path, "tcpstates-two", "2.5", "dup_two", SINK_PLUGIN)
    r = run_cli("--replay", os.devnull, env={"PYTHONPATH": str(tmp_path)})
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1
    assert "sink 'dup' is provided by both" in err
    assert "tcpstates-one 1.0" in err and "tcpstates-two 2.5" in err
    # disabling one distribution resolves it
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\ndisable = ["tcpstates-two"]\n')
    ok = run_cli("--config", str(cfg), "--replay", os.devnull, "--sink", "dup", "--no-summary",
                 env={"PYTHONPATH": str(tmp_path)})
    assert ok.returncode == 0, ok.stderr


MISSPELLED = """
from tcpstates.hookspecs import hookimpl
@hookimpl
def tcpstates_register_snik(register):
    pass
"""


def test_a_misspelled_hook_is_one_line_naming_the_plugin_and_the_hook(tmp_path):
    """An installed plugin with `tcpstates_register_snik`: pluggy would only say
    "unknown hook" with the module's repr; the run refuses to start and names
    the plugin, its distribution and the hook."""
    fake_dist(tmp_path, "tcpstates-snik", "1.2", "snik_plugin", MISSPELLED)
    err = one_line_error(run_cli("--replay", os.devnull, env={"PYTHONPATH": str(tmp_path)}),
                         "tcpstates_register_snik")
    assert "plugin 'snik_plugin' (tcpstates-snik 1.2) implements a hook tcpstates does not have" in err
    assert "<module" not in err, err           # the hook's name, not pluggy's repr of the module


class _Misspelled:
    @hookimpl
    def tcpstates_register_snik(self, register):
        pass


class _RaisingRegister:
    @hookimpl
    def tcpstates_register_sinks(self, register):
        raise RuntimeError("boom")


@pytest.mark.parametrize("plugin,needle", [
    (_Misspelled(), "implements a hook tcpstates does not have: tcpstates_register_snik"),
    (_RaisingRegister(), "failed in tcpstates_register_sinks: RuntimeError: boom"),
])
def test_an_in_process_plugin_is_named_as_one_not_as_tcpstates(plugin, needle):
    """A plugin object handed to the registry (run_pipeline's `plugins`, an
    embedder's) has no distribution: it is named by its class and said to be
    in-process, never "(tcpstates 0.1.0)" as if it were built in."""
    from tcpstates.errors import UsageError
    from tcpstates.registry import make_plugin_manager
    with pytest.raises(UsageError) as exc:
        make_plugin_manager(entry_points=False, extra_plugins=[plugin])
    name = f"{type(plugin).__module__}.{type(plugin).__qualname__}"
    assert str(exc.value).startswith(f"plugin {name!r} (registered in-process) "), exc.value
    assert needle in str(exc.value) and "tcpstates 0.1" not in str(exc.value)


SPY_SINK = """
import dataclasses, json
from tcpstates import Sink, hookimpl, option
@dataclasses.dataclass
class SpyOptions:
    path: str = option("", "where to write the options it was given")
    time: bool = option(False, "same name as the table's -T option")
    timestamp: bool = option(False, "same name as the table's -t option")
    wide: bool = option(False, "same name as the table's -w option")
    owner: bool = option(False, "same name as the table's --owner option")
class SpySink(Sink):
    name = "spy"
    Options = SpyOptions
    def write(self, batch): pass
    def close(self):
        with open(self.options.path, "w") as f:
            json.dump(dataclasses.asdict(self.options), f)
@hookimpl
def tcpstates_register_sinks(register):
    register(SpySink)
"""


def test_table_flags_never_change_a_third_party_sinks_options_of_the_same_name(tmp_path):
    """-T -t -w --owner belong to the text and CSV tables: a third-party sink with
    options called time, timestamp, wide and owner keeps what it was configured
    with, while the table beside it gets all four."""
    fake_dist(tmp_path, "tcpstates-spy", "1.0", "spy_plugin", SPY_SINK)
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(orjson.dumps(REPLAY_RECORD) + b"\n")
    spy = tmp_path / "spy.json"
    r = run_cli("--replay", str(trace), "--sink", "text", "--sink", "spy", "-o", f"sinks.spy.path={spy}",
                "-T", "-t", "-w", "--owner", "--no-summary", env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert orjson.loads(spy.read_bytes()) == {"path": str(spy), "time": False, "timestamp": False,
                                              "wide": False, "owner": False}
    header = r.stdout.decode().splitlines()[0].split()    # the table took every flag
    assert header[:2] == ["TIME", "TIME(s)"] and "O-PID" in header and "IP" in header, header


def test_disabling_a_builtin(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[plugins]\ndisable = ["journal"]\n')
    # the journal plugin owns -Y: disabled, the flag is gone with it
    r = run_cli("--config", str(cfg), "--replay", os.devnull, "-Y")
    assert r.returncode == 2 and b"unrecognized arguments: -Y" in r.stderr
    r = run_cli("--config", str(cfg), "--replay", os.devnull, "--sink", "journal")
    assert r.returncode == 2 and b"unknown sink 'journal'" in r.stderr
    listing = run_cli("plugins", "--config", str(cfg)).stdout.decode()
    assert "journal (sink)" not in listing and "text (sink)" in listing


def test_every_hookspec_is_documented_with_its_real_signature():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    specs = [f for name, f in vars(hookspecs).items() if name.startswith("tcpstates_")]
    assert len(specs) == 9
    for f in specs:
        sig = str(inspect.signature(f)).replace("'", "")
        assert f"def {f.__name__}{sig}" in doc, f"{f.__name__}{sig} not in docs/plugins.md"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def tcpstates_register_sources(self, register):
        self.calls.append("register_sources")

    @hookimpl
    def tcpstates_register_filters(self, register):
        self.calls.append("register_filters")

    @hookimpl
    def tcpstates_register_enrichers(self, register):
        self.calls.append("register_enrichers")

    @hookimpl
    def tcpstates_register_sinks(self, register):
        self.calls.append("register_sinks")

    @hookimpl
    def tcpstates_pipeline_started(self, pipeline):
        self.calls.append("started:" + ",".join(pipeline.sinks[0].sink.calls))

    @hookimpl
    def tcpstates_pipeline_stopped(self, pipeline, summary):
        self.calls.append(f"stopped:{summary['events']}:" + ",".join(pipeline.sinks[0].sink.calls))


def test_hook_call_order_of_a_full_run():
    rec = Recorder()
    run_pipeline("", [make_event(), make_event()], plugins=[rec], entry_points=False)
    assert rec.calls == ["register_sources", "register_filters", "register_enrichers",
                         "register_sinks", "started:open",
                         "stopped:2:open,write,flush,flush,close"]


class Flaky(Filter):
    name = "flaky"

    def keep(self, event):
        if event.sport == 666:
            raise ValueError("cursed port")
        return True


class Broken(Sink):
    name = "broken"

    def write(self, batch):
        raise OSError(28, "No space left on device")


class _Plug:
    @hookimpl
    def tcpstates_register_filters(self, register):
        register(Flaky)

    @hookimpl
    def tcpstates_register_sinks(self, register):
        register(Broken)


EVENTS = [make_event(sport=1), make_event(sport=666), make_event(sport=2)]


@pytest.mark.parametrize("policy,kept", [("skip", [1, 666, 2]), ("drop", [1, 2])])
def test_filter_on_error_policies(policy, kept):
    r = run_pipeline(f'[[chain]]\nuse = "flaky"\non_error = "{policy}"\n', EVENTS,
                     plugins=[_Plug()], entry_points=False)
    assert [e.sport for e in r.events] == kept
    assert r.summary["errors"] == {"chain[0]": 1}


def test_filter_fail_policy_and_strict_end_the_run():
    with pytest.raises(StageError, match="cursed port"):
        run_pipeline('[[chain]]\nuse = "flaky"\non_error = "fail"\n', EVENTS, plugins=[_Plug()],
                     entry_points=False)
    with pytest.raises(StageError):
        run_pipeline('[[chain]]\nuse = "flaky"\n', EVENTS, plugins=[_Plug()], entry_points=False,
                     strict=True)


def test_one_failing_sink_never_stops_the_others():
    r = run_pipeline('[tcpstates]\nsinks = ["broken", "memory"]\n', EVENTS, plugins=[_Plug()],
                     entry_points=False, batch_size=1)
    assert len(r.events) == 3
    assert r.summary["errors"] == {"sinks.broken": 3}
    assert r.summary["written"] == {"broken": 0, "memory": 3}
    r2 = run_pipeline('[tcpstates]\nsinks = ["broken", "memory"]\n[sinks.broken]\non_error = "disable"\n',
                      EVENTS, plugins=[_Plug()], entry_points=False, batch_size=1)
    assert r2.summary["errors"] == {"sinks.broken": 1} and len(r2.events) == 3
