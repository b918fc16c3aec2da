"""Packaging and operations files: the wheel, the man page, bash completion,
the systemd unit (systemd-analyze verify), the Kubernetes manifests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tcpstates.cli import build_parser as _build_parser
from tcpstates.registry import make_plugin_manager

ROOT = Path(__file__).resolve().parent.parent


def build_parser():
    """The full command line: the core's flags and every built-in plugin's."""
    return _build_parser(make_plugin_manager(entry_points=False))


def test_wheel_holds_one_tcpstates_package_with_the_bpf_sources(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("tcpstates-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("tcpstates/__init__.py", "tcpstates/cli.py", "tcpstates/plugins/bcc_table/sinks.py",
                   "tcpstates/plugins/kernel/ringbuf.py",
                   "tcpstates/bpf/tcpstates.bpf.c", "tcpstates/bpf/tcpstates.h", "tcpstates/testing.py"):
        assert needed in names, needed
    assert any(n.endswith("licenses/LICENSES/GPL-2.0-only.txt") or n.endswith("/GPL-2.0-only.txt")
               for n in names), "the BPF C's GPL text ships with it"
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"core", "plugins", "bpf", "tests"}, tops
    # every C speed-up setup.py names is built (a compiler is here; they are optional elsewhere)
    built = {n.split(".")[0] for n in names if n.endswith(".so")}
    for c_file in re.findall(r'"(plugins/[^"]+\.c)"', (ROOT / "setup.py").read_text()):
        assert "tcpstates/" + c_file[:-2] in built, c_file
    assert len(built) >= 5, built
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tcpstates = tcpstates.cli:main" in zipfile.ZipFile(wheel).read(ep).decode()


def test_man_page_covers_every_option():
    man = (ROOT / "docs" / "tcpstates.8").read_text().replace("\\-", "-")
    for action in build_parser()._actions:
        if action.help == "==SUPPRESS==":
            continue
        for opt in action.option_strings:
            assert opt in man, f"{opt} missing from docs/tcpstates.8"
    for sub in ("tcpstates plugins", "tcpstates doctor"):
        assert sub in man


def test_bash_completion_completes_options_subcommands_and_sinks():
    script = ROOT / "contrib" / "tcpstates.bash-completion"
    bindir = os.path.dirname(sys.executable)
    def complete(*words: str) -> list[str]:
        cmd = (f"source {script}; COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}; "
               f"_tcpstates; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                             env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
        return out.stdout.split()
    assert "--summary" in complete("tcpstates", "--su")
    assert complete("tcpstates", "do") == ["doctor"]
    assert {"jsonl", "journal"} <= set(complete("tcpstates", "--sink", "j"))
    for action in build_parser()._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and action.help != "==SUPPRESS==":
                assert opt in complete("tcpstates", opt), opt


@pytest.mark.root
def test_systemd_unit_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze missing: apt-get install systemd (./test.sh installs it)")
    unit = (ROOT / "contrib" / "tcpstates.service").read_text()
    exe = os.path.join(os.path.dirname(sys.executable), "tcpstates")
    # verify checks that ExecStart exists: point it at this checkout's installed tool
    (tmp_path / "tcpstates.service").write_text(unit.replace("/opt/tcpstates/bin/tcpstates", exe))
    # --man=no: whether man pages are installed is not the unit's business
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "tcpstates.service")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    assert "Type=notify" in unit and "ProtectSystem=strict" in unit and "CapabilityBoundingSet=" in unit
    # journald must not drop what the journal sink counted as written (an unknown key fails above)
    assert "\nLogRateLimitIntervalSec=0\n" in unit


def test_service_config_is_valid(tmp_path):
    from tracer import run_cli
    cfg = (ROOT / "contrib" / "tcpstates.toml").read_text().replace("/var/log/tcpstates", str(tmp_path))
    (tmp_path / "c.toml").write_text(cfg)
    r = run_cli("--config", str(tmp_path / "c.toml"), "--replay", os.devnull, "--sink", "events",
                "--no-summary")
    assert r.returncode == 0, r.stderr


def test_kubernetes_configmap_holds_a_valid_config(tmp_path):
    from tracer import run_cli
    text = (ROOT / "deploy" / "kubernetes" / "daemonset.yaml").read_text()
    block = re.search(r"tcpstates\.toml: \|\n((?:    .*\n)+)", text).group(1)
    toml = "\n".join(l[4:] for l in block.splitlines()).replace(
        "unix:///var/run/fluent-bit/forward.sock", f"unix://{tmp_path}/fb.sock").replace("0.0.0.0:9464", "127.0.0.1:0")
    (tmp_path / "c.toml").write_text(toml)
    r = run_cli("--config", str(tmp_path / "c.toml"), "--replay", os.devnull, "--no-summary",
                "-o", "sinks.fluent.exit_timeout=0.1")
    assert r.returncode == 0, r.stderr


def _c_sources() -> list[Path]:
    """Every C source and header in the tree (the benchmarks' too), wherever it
    lies: not a fixed list of directories, so a new one cannot slip past."""
    out = []
    for top, dirs, files in os.walk(ROOT):
        # not the virtualenv's, git's or a build's copies
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "dist", "__pycache__")]
        out.extend(Path(top) / f for f in files if f.endswith((".c", ".h")))
    return sorted(out)


def test_every_c_source_says_its_license():
    """The BPF C (bpf/, any *.bpf.c or *.bpf.h) is loaded as GPL and offered as
    GPL-2.0-only OR Apache-2.0; the C extensions and the benchmarks' other C are
    Apache-2.0 like the Python: each file says which."""
    sources = _c_sources()
    assert {"bench/tpcheck.bpf.c", "bench/iocost.c", "core/event_slots.h", "bpf/tcpstates.h"} <= \
        {str(p.relative_to(ROOT)) for p in sources}, sources
    for path in sources:
        first = path.read_text().splitlines()[0]
        bpf = path.parent.name == "bpf" or ".bpf." in path.name
        want = "GPL-2.0-only OR Apache-2.0" if bpf else "Apache-2.0"
        assert first == f"/* SPDX-License-Identifier: {want} */", (path, first)
