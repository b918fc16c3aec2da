"""Review2 finding 1: as root, everything an entry point's import may run is
checked, not only the entry module's own file chain: submodules it imports,
the bytecode in __pycache__ Python prefers over the source, links inside the
package. Real files owned by uid 65534 (os.chown), the real CLI in a subprocess."""

from __future__ import annotations

import marshal
import os
import py_compile
from pathlib import Path

import pytest
from fakedist import fake_dist, sink_plugin
from tracer import one_line_error, run_cli

NOBODY = 65534




def _evil_pyc(source: Path, marker: Path) -> Path:
    """A nobody-owned .pyc with the source's own 16-byte header, so Python uses it."""
    pyc = Path(py_compile.compile(str(source), doraise=True))
    header = pyc.read_bytes()[:16]
    code = compile(source.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n", str(source), "exec")
    pyc.write_bytes(header + marshal.dumps(code))
    os.chown(pyc, NOBODY, NOBODY)
    return pyc


def _site(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    site = tmp_path / "site"
    site.mkdir()
    fake_dist(site, "tcpstates-evil", "1.0", "evilsink", sink_plugin("evilsink"))
    return site


def _refused_then_allowed(site: Path, marker: Path, needle: str) -> None:
    env = {"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    r = run_cli("--replay", os.devnull, "--sink", "evilsink", env=env)
    err = one_line_error(r, needle)
    assert "--allow-insecure-plugins" in err
    assert not marker.exists()                      # nothing of it ran
    ok = run_cli("--replay", os.devnull, "--sink", "evilsink", "--allow-insecure-plugins",
                 "--no-summary", env=env)
    assert ok.returncode == 0, ok.stderr
    assert marker.exists()                          # the override really loads it


@pytest.mark.root
def test_nobody_owned_bytecode_in_the_plugins_pycache_is_refused(tmp_path):
    site = _site(tmp_path)
    marker = tmp_path / "PWNED"
    pyc = _evil_pyc(site / "evilsink" / "__init__.py", marker)
    _refused_then_allowed(site, marker, str(pyc))


@pytest.mark.root
def test_submodule_writable_by_others_is_refused(tmp_path):
    site = _site(tmp_path)
    marker = tmp_path / "PWNED2"
    with open(site / "evilsink" / "__init__.py", "a") as f:
        f.write("from . import helper\n")
    helper = site / "evilsink" / "helper.py"
    helper.write_text(f"open({str(marker)!r}, 'w').close()\n")
    os.chown(helper, NOBODY, NOBODY)
    helper.chmod(0o666)
    _refused_then_allowed(site, marker, f"{helper} could have been written by someone other than root")


@pytest.mark.root
def test_root_link_inside_the_package_to_a_nobody_file_is_refused(tmp_path):
    site = _site(tmp_path)
    marker = tmp_path / "PWNED3"
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chown(outside, NOBODY, NOBODY)
    (outside / "helper.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (site / "evilsink" / "helper.py").symlink_to(outside / "helper.py")
    with open(site / "evilsink" / "__init__.py", "a") as f:
        f.write("from . import helper\n")
    _refused_then_allowed(site, marker, "a symbolic link to")


@pytest.mark.root
def test_single_module_plugin_with_nobody_bytecode_is_refused(tmp_path):
    tmp_path.chmod(0o755)
    site = tmp_path / "site"
    site.mkdir()
    (site / "evilmod.py").write_text(sink_plugin("evilsink"))
    info = site / "evilmod-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evilmod\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[tcpstates]\nevilmod = evilmod\n")
    marker = tmp_path / "PWNED4"
    pyc = _evil_pyc(site / "evilmod.py", marker)
    _refused_then_allowed(site, marker, str(pyc))


@pytest.mark.root
def test_trusted_plugin_tree_with_root_bytecode_loads(tmp_path):
    site = _site(tmp_path)
    (site / "evilsink" / "helper.py").write_text("X = 1\n")
    py_compile.compile(str(site / "evilsink" / "__init__.py"), doraise=True)
    r = run_cli("--replay", os.devnull, "--sink", "evilsink", "--no-summary",
                env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
