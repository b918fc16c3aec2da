"""The floor plan holds: core/ is the platform, plugins/ the stages, no cycles.

The import contract lives in pyproject.toml ([tool.tcpstates.imports]); the
checker is tests/helpers/importcontract.py. The second test shows that the
checker does fail: it copies the tree, plants one violation of each rule,
and expects each to be reported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from importcontract import check

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contract_holds():
    assert check(ROOT) == []


def test_the_import_contract_catches_each_kind_of_violation(tmp_path):
    for item in ("core", "plugins", "pyproject.toml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    # core importing a plugin, hidden in a function
    (tmp_path / "core" / "badcore.py").write_text(
        "def f():\n    from tcpstates.plugins.kernel import probe\n    return probe\n")
    # a plugin importing another plugin and a core internal
    (tmp_path / "plugins" / "jsonl" / "bad.py").write_text(
        "from tcpstates.plugins.forward import sink\nfrom tcpstates.pipeline import Pipeline\n")
    # a cycle through function-local imports, one hidden behind a fake TYPE_CHECKING
    (tmp_path / "core" / "cyc_a.py").write_text("def f():\n    import tcpstates.cyc_b\n")
    (tmp_path / "core" / "cyc_b.py").write_text("TYPE_CHECKING = True\nif TYPE_CHECKING:\n"
                                                "    import tcpstates.cyc_a\n")
    # imports by name, and through an attribute chain
    (tmp_path / "core" / "byname.py").write_text(
        "import importlib\nimport tcpstates\n"
        "def f():\n    importlib.import_module('tcpstates.plugins.owner.enricher')\n"
        "    __import__('tcpstates.plugins.container')\n")
    (tmp_path / "plugins" / "summary" / "attr.py").write_text(
        "import tcpstates\ndef f():\n    return tcpstates.registry.make_plugin_manager\n")
    (tmp_path / "plugins" / "__init__.py").write_text(
        (ROOT / "plugins" / "__init__.py").read_text() + "from tcpstates.pipeline import Pipeline\n")
    problems = "\n".join(check(tmp_path))
    assert "core module tcpstates.byname imports plugin module tcpstates.plugins.owner.enricher" in problems
    assert "core module tcpstates.byname imports plugin module tcpstates.plugins.container" in problems
    assert "plugin tcpstates.plugins.summary imports tcpstates.registry" in problems
    assert "the default-plugin list imports tcpstates.pipeline" in problems
    assert "core module tcpstates.badcore imports plugin module tcpstates.plugins.kernel.probe" in problems
    assert "plugin tcpstates.plugins.jsonl imports another plugin's tcpstates.plugins.forward.sink" in problems
    assert "plugin tcpstates.plugins.jsonl imports tcpstates.pipeline, which is not in the plugin API" in problems
    assert "import cycle: tcpstates.cyc_a -> tcpstates.cyc_b" in problems
    assert len(check(tmp_path)) == 8, problems


def test_the_testing_aid_changes_nothing_process_wide():
    """GC tuning and signal handlers belong to the CLI entry point: a plugin
    author's test process that calls run_pipeline keeps its own."""
    import gc
    import signal

    from tcpstates.testing import make_event, run_pipeline
    before = (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled(),
              {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)})
    events = [make_event(sport=1000 + i, dport=80, oldstate="CLOSE", newstate="SYN_SENT") for i in range(50)]
    result = run_pipeline('[[chain]]\nuse = "ports"\nremote = [80]\n', events, entry_points=False)
    assert len(result.events) == 50
    after = (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled(),
             {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)})
    assert after == before
