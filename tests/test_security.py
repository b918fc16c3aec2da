"""Security as root: no imports from the working directory, no plugins others
could have written, dropping root once attached, and `tcpstates doctor`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from fakedist import fake_dist, sink_plugin
from tracer import one_line_error, run_cli, tcpstates_argv
from traffic import free_port, refused

def _plant(root: Path) -> None:
    fake_dist(root, "tcpstates-planted", "6.6", "planted_plugin", sink_plugin("planted"))


def test_plugins_are_never_picked_up_from_the_working_directory(tmp_path):
    _plant(tmp_path)
    here = subprocess.run(tcpstates_argv("plugins"), cwd=tmp_path, capture_output=True, text=True)
    assert here.returncode == 0
    assert "planted" not in here.stdout
    # the planted package is a working plugin: on the real path it would load
    installed = run_cli("plugins", env={"PYTHONPATH": str(tmp_path)})
    assert "planted (sink) from tcpstates-planted 6.6" in installed.stdout.decode()


@pytest.mark.root
def test_plugin_location_writable_by_others_is_refused_as_root(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    _plant(shared)
    shared.chmod(0o777)
    r = run_cli("--replay", os.devnull, env={"PYTHONPATH": str(shared)})
    err = r.stderr.decode()
    assert r.returncode == 2 and "writable by someone other than root" in err and err.count("\n") == 1
    ok = run_cli("--replay", os.devnull, "--allow-insecure-plugins", "--sink", "planted", "--no-summary",
                 env={"PYTHONPATH": str(shared)})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.kernel
def test_user_drops_root_after_attaching_and_keeps_tracing(tracer, tmp_path):
    tmp_path.chmod(0o755)
    port = free_port()
    t = tracer("-s", "--user", "nobody", "-D", str(port))
    status = Path(f"/proc/{t.proc.pid}/status").read_text()
    uid_line = next(l for l in status.splitlines() if l.startswith("Uid:"))
    assert uid_line.split()[1:] == ["65534"] * 4            # real, effective, saved, fs
    for _ in range(3):
        refused(port)
    rc, out_text, err = t.stop()
    assert rc == 0, err
    assert len(out_text.splitlines()) == 7
    assert "0 dropped, 0 kernel misses" in err


def test_user_that_does_not_exist(tmp_path):
    # asked before anything is opened: no table header, no empty output file
    out = tmp_path / "u.jsonl"
    r = run_cli("--user", "no-such-user-xyz", "--replay", os.devnull, "--sink", "text", "--sink", "jsonl",
                "-o", f"sinks.jsonl.path={out}")
    assert r.returncode == 2 and b"no such user" in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stdout == b"" and not out.exists()


@pytest.mark.root
def test_doctor_passes_here_and_fails_without_the_tracepoint(tmp_path):
    ok = run_cli("doctor")
    assert ok.returncode == 0, ok.stdout
    lines = ok.stdout.decode().splitlines()
    for name in ("kernel", "root", "tracefs", "tracepoint", "bpf", "ring buffer", "btf", "bcc",
                 "kernel headers", "journal socket", "systemd-python"):
        assert any(l[5:].startswith(name) for l in lines), name
    assert lines[-1] == "tracing can work"
    (tmp_path / "events").mkdir()
    bad = run_cli("doctor", env={"TCPSTATES_TRACEFS": str(tmp_path)})
    assert bad.returncode == 1
    out = bad.stdout.decode()
    assert "FAIL tracepoint" in out and out.splitlines()[-1].startswith("tracing cannot work")


@pytest.mark.root
def test_a_config_that_exists_is_not_called_missing_when_proc_is_not_mounted(tmp_path):
    """The config is checked through an O_PATH descriptor and reopened through
    /proc/self/fd: without /proc (here: a tmpfs over it, in a mount namespace
    of its own) that reopen fails with ENOENT, which must not be reported as
    "config file not found" — the file is there."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m not available here")
    tmp_path.chmod(0o755)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[tcpstates]\n")
    script = ('mount -t tmpfs none /proc && exec "$@"')
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                        *tcpstates_argv("--config", str(cfg), "--replay", "/dev/null")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "not found" not in r.stderr and "/proc" in r.stderr, r.stderr


def test_user_root_is_refused_before_anything_is_written(tmp_path):
    # the drop to uid 0 "succeeded" and was refused after the start: an empty
    # output file and a table header were left
    out = tmp_path / "u.jsonl"
    r = run_cli("--user", "root", "--replay", os.devnull, "--sink", "text", "--sink", "jsonl",
                "-o", f"sinks.jsonl.path={out}")
    one_line_error(r, "--user root: is root (uid 0)")
    assert r.stdout == b"" and not out.exists()


@pytest.mark.root
def test_user_without_root(as_nobody):
    """Not root: --user naming oneself is nothing to do; another account is
    refused before anything is written (setgroups() failed after the start:
    'internal error: PermissionError', exit 1, an empty output file).
    Run through the as_nobody copy of the tool: a clone under /root (0700)
    and its venv are out of nobody's reach."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="tcpstates-user-", dir="/tmp"))
    try:
        d.chmod(0o777)
        conf = d / "empty.toml"
        conf.write_text("")
        conf.chmod(0o644)

        def run(user: str, out: Path) -> subprocess.CompletedProcess:
            return as_nobody("--config", str(conf), "--replay", os.devnull, "--user", user,
                             "--sink", "jsonl", "-o", f"sinks.jsonl.path={out}", env={"HOME": str(d)})
        same = run("nobody", d / "same.jsonl")
        assert same.returncode == 0, same.stderr
        assert (d / "same.jsonl").stat().st_uid == 65534
        other = run("daemon", d / "other.jsonl")
        one_line_error(other, "only root can switch to another user")
        assert not (d / "other.jsonl").exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)
