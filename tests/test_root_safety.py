"""Issue 14: safe to run as root. Each test reproduces one attack or fault
through the real CLI (a subprocess), as an unprivileged user would mount it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from tracer import one_line_error, run_cli, tcpstates_argv

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


def _record(**kw) -> bytes:
    rec = {"type": "state_change", "v": 1, "seq": 1, "time": "t", "time_ns": 1795766400 * 10**9,
           "mono_ns": 10**9, "host": "h", "skaddr": "ff", "family": "ipv4", "laddr": "10.0.0.1",
           "lport": 1, "raddr": "10.0.0.2", "rport": 2, "oldstate": "LISTEN", "newstate": "CLOSE",
           "span_us": 5, "pid": 1, "tid": 1, "comm": "x", "cgroup_id": 0}
    rec.update(kw)
    return orjson.dumps(rec) + b"\n"




# -- 1, 5: strings from outside are escaped at every text boundary -------------------------
HOSTILE_NAME = "a\nFAKE\x1b[31m\u202e"


@pytest.mark.parametrize("flags", [["-s"], ["-w"], ["--owner"], ["-s", "--owner"], ["-w", "--owner"]])
def test_hostile_names_and_addresses_cannot_forge_lines_or_escapes(tmp_path, flags):
    trace = tmp_path / "t.jsonl"
    # (hostile addresses cannot get this far: a replayed address must parse as one,
    # tests/test_stop_and_faults.py::test_replayed_addresses_must_be_addresses)
    trace.write_bytes(_record(comm=HOSTILE_NAME, owner_pid=7, owner_comm=HOSTILE_NAME,
                              owner_source="syscall", container_name='x,"y\r\n'))
    r = run_cli("--replay", str(trace), *flags, "--no-summary")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert len(out.splitlines()) == 2                     # header + one row: no forged line
    assert "a\\x0aFAKE" in out
    if "-s" in flags:
        import csv
        rows = list(csv.reader(out.splitlines()))
        assert len({len(row) for row in rows}) == 1        # every row has the header's columns


@pytest.mark.parametrize("flags", [[], ["-w"], ["--owner"], ["-w", "--owner"]])
def test_a_text_column_is_cut_between_escapes_never_inside_one(tmp_path, flags):
    """bcc's %-10.10s cut after escaping left "\\x1b\\x" — half an escape that
    reads as other text. A column is cut before an escape that does not fit."""
    import re
    trace = tmp_path / "t.jsonl"
    name = "ab" + "\x1b" * 9 + "tail"       # "ab": no column width is a whole number of escapes
    trace.write_bytes(_record(comm=name, owner_pid=7, owner_comm=name, owner_source="syscall",
                              container_name="a" + "\x01" * 40))
    r = run_cli("--replay", str(trace), *flags, "--no-summary")
    assert r.returncode == 0, r.stderr
    row = r.stdout.decode().splitlines()[1]
    assert "\\x1b" in row and re.search(r"\\x(?![0-9a-f]{2})", row) is None, row
    header = r.stdout.decode().splitlines()[0]
    # the columns still line up with the header
    assert row.index("10.0.0.1") == header.index("LADDR"), (header, row)


@pytest.mark.parametrize("flags", [[], ["-w"], ["--owner"], ["-w", "--owner"]])
@pytest.mark.parametrize("name", ["ab" + "\\x1b" * 9 + "tail", "abcdefghi\\\\tail", "abcdefghijklmno\\\\"])
def test_an_already_escaped_name_is_cut_between_escapes_too(tmp_path, flags, name):
    """A kernel command name is escaped where it is decoded (and a JSON Lines file
    replayed carries that form): the 10/16-character cut must not split its
    escapes either — not `\\x1b` into `\\x`, not a doubled backslash in half."""
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(_record(comm=name, owner_pid=7, owner_comm=name, owner_source="syscall"))
    r = run_cli("--replay", str(trace), *flags, "--no-summary")
    assert r.returncode == 0, r.stderr
    row = r.stdout.decode().splitlines()[1]
    for cell in row.split():
        assert re.search(r"\\x(?![0-9a-f]{2})", cell) is None, row
        assert (len(cell) - len(cell.rstrip("\\"))) % 2 == 0, row   # no half of a doubled backslash


def test_state_numbers_print_whole_not_modulo_256(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(_record(oldstate="300", newstate="1"))
    r = run_cli("--replay", str(trace), "-s", "--no-summary")
    assert r.returncode == 0, r.stderr
    assert ",300,ESTABLISHED," in r.stdout.decode()


def test_error_messages_escape_control_characters_in_paths(tmp_path):
    r = run_cli("--config", str(tmp_path / "x\x1b[2J\ny"), "--replay", os.devnull)
    err = one_line_error(r, "config file not found")
    assert "\x1b" not in err and "x\\x1b[2J\\x0ay" in err


def test_warnings_escape_control_characters(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(_record(family="\x1b[31mipx\n") + _record())
    r = run_cli("--replay", str(trace), "-s", "--no-summary")
    assert r.returncode == 0
    err = r.stderr.decode()
    assert "\x1b" not in err and err.count("\n") == 1 and "skipped record" in err


# -- 2: plugin locations ---------------------------------------------------------------------
def _plant_nested(root: Path) -> Path:
    pkg = root / "deeppkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text(textwrap.dedent("""
        from tcpstates.api import Sink
        from tcpstates.hookspecs import hookimpl
        class Deep(Sink):
            name = "deep"
            def write(self, batch): pass
        @hookimpl
        def tcpstates_register_sinks(register):
            register(Deep)
        """))
    info = root / "deep_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deep-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[tcpstates]\ndeep = deeppkg.sub.mod\n")
    return pkg


@pytest.mark.root
@pytest.mark.parametrize("weak", ["sub_dir", "module", "sub_init", "entry_points"])
def test_plugin_files_writable_by_others_anywhere_are_refused(tmp_path, weak):
    site = tmp_path / "site"
    site.mkdir()
    tmp_path.chmod(0o755)
    pkg = _plant_nested(site)
    target = {"sub_dir": pkg / "sub", "module": pkg / "sub" / "mod.py",
              "sub_init": pkg / "sub" / "__init__.py",
              "entry_points": site / "deep_dist-1.0.dist-info" / "entry_points.txt"}[weak]
    target.chmod(0o777 if target.is_dir() else 0o666)
    marker = tmp_path / "imported"
    (pkg / "sub" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    if weak == "sub_init":
        target.chmod(0o666)
    r = run_cli("--replay", os.devnull, "--sink", "deep", env={"PYTHONPATH": str(site)})
    one_line_error(r, "writable by someone other than root")
    assert not marker.exists()                     # nothing of it was imported
    ok = run_cli("--replay", os.devnull, "--sink", "deep", "--allow-insecure-plugins", "--no-summary",
                 env={"PYTHONPATH": str(site)})
    assert ok.returncode == 0, ok.stderr


# -- 3: config symlinks, FIFOs, devices, size, depth --------------------------------------------
@pytest.mark.root
def test_config_symlink_in_a_world_writable_directory_is_refused(tmp_path):
    tmp_path.chmod(0o755)
    good = tmp_path / "good.toml"
    good.write_text("[sinks.text]\nwide = true\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "c.toml").symlink_to(good)
    one_line_error(run_cli("--config", str(shared / "c.toml"), "--replay", os.devnull),
                    "could be replaced by someone other than root")
    # a link that belongs to another user, in a sticky directory, likewise
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "c.toml").symlink_to(good)
    os.lchown(sticky / "c.toml", NOBODY, NOBODY)
    one_line_error(run_cli("--config", str(sticky / "c.toml"), "--replay", os.devnull),
                    "could be replaced by someone other than root")
    # a root-owned link in a root-owned directory is followed
    (tmp_path / "link.toml").symlink_to(good)
    ok = run_cli("--config", str(tmp_path / "link.toml"), "--replay", os.devnull, "--no-summary")
    assert ok.returncode == 0 and ok.stdout.startswith(b"SKADDR           C-PID C-COMM           IP")


@pytest.mark.root
def test_config_owned_by_another_user_is_refused(tmp_path):
    tmp_path.chmod(0o755)
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    os.chown(cfg, NOBODY, NOBODY)
    one_line_error(run_cli("--config", str(cfg), "--replay", os.devnull), "owner uid 65534")


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)
    return path


def _loop(tmp_path: Path) -> Path:
    (tmp_path / "a.toml").symlink_to(tmp_path / "b.toml")
    (tmp_path / "b.toml").symlink_to(tmp_path / "a.toml")
    return tmp_path / "a.toml"


def _big(tmp_path: Path) -> Path:
    path = tmp_path / "big.toml"
    path.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    return path


def _deep(tmp_path: Path) -> Path:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "\n")
    return path


@pytest.mark.parametrize("make,needle", [
    (_fifo, "not a regular file"), (lambda p: Path("/dev/zero"), "not a regular file"),
    (_loop, "symbolic links"), (_big, "larger than"), (_deep, "nested too deeply"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, make, needle):
    one_line_error(run_cli("--config", str(make(tmp_path)), "--replay", os.devnull, timeout=20), needle)


# -- 4: python -m never imports from the working directory ---------------------------------------
def test_python_m_ignores_modules_in_the_working_directory(tmp_path):
    marker = tmp_path / "pwned"
    for mod in ("argparse", "tomllib", "dataclasses"):
        (tmp_path / f"{mod}.py").write_text(f"open({str(marker)!r}, 'a').write({mod!r})\n"
                                            "raise SystemExit(99)\n")
    r = subprocess.run(tcpstates_argv("--replay", os.devnull, "--no-summary"), cwd=tmp_path,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert r.stdout.startswith(b"SKADDR")


PLANTED = "open({marker!r}, 'a').write({what!r})\nraise SystemExit(99)\n"


def _plant(where: Path, marker: Path) -> None:
    """What another user could leave in a directory where root starts tcpstates:
    a `tcpstates` package of their own and modules the real one imports."""
    pkg = where / "tcpstates"
    pkg.mkdir()
    for name in ("__init__", "__main__", "cli"):
        (pkg / f"{name}.py").write_text(PLANTED.format(marker=str(marker), what=f"tcpstates/{name}"))
    for mod in ("argparse", "tomllib", "pluggy", "orjson"):
        (where / f"{mod}.py").write_text(PLANTED.format(marker=str(marker), what=mod))


def test_the_script_and_python_P_ignore_a_tcpstates_package_in_the_working_directory(tmp_path):
    """docs/security.md: as root, start the installed script or `python -P -m`.
    Plain `python -m` runs the planted package (Python imports it before any of
    our code): checked too, so that the plant is known to work and the doc's
    warning stays true."""
    marker = tmp_path / "pwned"
    _plant(tmp_path, marker)
    script = Path(sys.executable).with_name("tcpstates")
    assert script.is_file(), f"no console script next to {sys.executable}: pip install the project"
    for argv in ([str(script)], [sys.executable, "-P", "-m", "tcpstates"]):
        r = subprocess.run([*argv, "--replay", os.devnull, "--no-summary"], cwd=tmp_path,
                           capture_output=True, timeout=60)
        assert r.returncode == 0 and not marker.exists(), (argv, r.returncode, r.stderr,
                                                          marker.exists() and marker.read_text())
        assert r.stdout.startswith(b"SKADDR"), (argv, r.stdout)
    plain = subprocess.run([sys.executable, "-m", "tcpstates", "--replay", os.devnull], cwd=tmp_path,
                           capture_output=True, timeout=60)
    assert plain.returncode == 99 and marker.read_text() == "tcpstates/__init__", plain.stderr


def test_the_shipped_launchers_start_the_script():
    """run.sh, the systemd unit and the container image start the installed
    script, never `python -m tcpstates` (which would look in the working directory)."""
    launchers = {"run.sh": 'bin/tcpstates" "$@"', "contrib/tcpstates.service": "ExecStart=/opt/tcpstates/bin/tcpstates ",
                 "deploy/kubernetes/Containerfile": 'ENTRYPOINT ["/opt/tcpstates/bin/tcpstates"]'}
    for path, needle in launchers.items():
        text = (ROOT / path).read_text()
        assert needle in text, (path, needle)
    for path in [ROOT / "run.sh", ROOT / "test.sh", *ROOT.glob("scripts/*"), *ROOT.glob("contrib/*"),
                 *ROOT.glob("deploy/**/*"), *ROOT.glob("bench/*.py")]:
        if path.is_file():
            text = path.read_text(errors="replace")
            # `-m tcpstates` only after -P
            assert not re.search(r'(?<!-P )-m tcpstates|(?<!"-P", )"-m", "tcpstates"', text), path


# -- numbers and text from outside ------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["-L", "\u0668\u0660"], "-L"), (["-D", "\u0668\u0660"], "-D"), (["-L", "８0"], "-L"),
    (["-o", 'sinks.jsonl.path="/tmp/a\\u0000b"', "--sink", "jsonl"], "control character \\x00"),
    (["-o", 'sources.replay.path="a\\u0000b"'], "control character \\x00"),
    (["-o", 'sinks.text.path="/tmp/a\\u001b[2Jb"'], "control character \\x1b"),
    (["-o", "a=" + "[" * 5000], "nested too deeply"),
])
def test_hostile_command_line_values(args, needle):
    one_line_error(run_cli(*args, *([] if "--replay" in args else ["--replay", os.devnull])), needle)


@pytest.mark.root
def test_unreadable_home_is_aone_line_error(tmp_path, as_nobody):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    home.chmod(0o700)                               # root's: nobody cannot look inside
    tmp_path.chmod(0o755)
    r = as_nobody("--replay", os.devnull, env={"HOME": str(home)})
    one_line_error(r, "cannot look for a config file here")


@pytest.mark.root
def test_doctor_as_non_root_reports_instead_of_crashing(as_nobody):
    r = as_nobody("doctor")
    err = r.stderr.decode()
    assert "Traceback" not in err and "internal error" not in err, err
    assert r.returncode == 1 and "FAIL root" in r.stdout.decode()


def _connect_as(name: bytes, port: int) -> None:
    """A real process that renames itself with prctl(PR_SET_NAME) and connects to port."""
    code = textwrap.dedent(f"""
        import ctypes, socket
        ctypes.CDLL(None).prctl(15, {name!r}, 0, 0, 0)
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", {port}))
        except OSError:
            pass
        """)
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.kernel
def test_owner_names_set_with_prctl_are_escaped_in_text(tracer, tmp_path):
    """A real process renames itself with prctl(PR_SET_NAME) and connects."""
    from traffic import free_port
    port = free_port()
    t = tracer("--owner", "-D", str(port))
    _connect_as(b"a\nFAKE\x1b[31m", port)
    rc, out, err = t.stop()
    assert rc == 0, err
    assert "\x1b" not in out and "FAKE" in out
    assert not any(line.startswith("FAKE") for line in out.splitlines())   # no forged line


@pytest.mark.kernel
def test_a_name_that_spells_an_escape_never_looks_like_the_name_it_spells(tracer, tmp_path):
    """Escaping is one-to-one: one real process names itself with the printable
    characters `a\\x0aB`, another with a real newline (`a`, LF, `B`). Each
    connects; both rows (C-COMM and the owner's O-COMM) must tell them apart."""
    from traffic import free_port
    port = free_port()
    t = tracer("-w", "--owner", "-D", str(port))
    for name in (rb"a\x0aB", b"a\nB"):
        _connect_as(name, port)
    rc, out, err = t.stop()
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    comms = {row[2] for row in rows}                       # C-COMM
    assert "a\\\\x0aB" in comms, out                        # the literal name, backslash doubled
    assert "a\\x0aB" in comms, out                           # the newline, escaped
    assert len(rows) == 4, out                  # 2 refused connects, 2 changes each: no forged row
    owners = [line for line in out.splitlines() if "a\\\\x0aB" in line]
    assert any(line.count("a\\\\x0aB") == 2 for line in owners), out   # O-COMM too


# -- audit of issue 14: the same class at the remaining text boundaries ------------------------
HOSTILE_PLUGIN = '''
import dataclasses
from tcpstates.api import Sink
from tcpstates.doctor import Check
from tcpstates.hookspecs import hookimpl
from tcpstates.options import option


@dataclasses.dataclass
class Opts:
    path: str = option("-", "help\\x1b[2Jclear\\nFORGED help line", choices=["-", "c\\nd"])


class Evilsink(Sink):
    description = "evil\\x1b[31m description\\nFORGED description line"
    name = "evilsink"
    Options = Opts

    def write(self, batch):
        pass


@hookimpl
def tcpstates_register_sinks(register):
    register(Evilsink)


@hookimpl
def tcpstates_doctor_checks(register):
    register(Check("evil\\x1b[31m", False, lambda: (False, "detail\\x1b]0;title\\x07\\nFORGED doctor line")))
'''


def _hostile_dist(tmp_path: Path) -> dict:
    from fakedist import fake_dist
    tmp_path.chmod(0o755)
    site = tmp_path / "site"
    fake_dist(site, "tcpstates-evil", "1.0", "evilsink", HOSTILE_PLUGIN)
    meta = next(site.glob("*.dist-info")) / "METADATA"
    meta.write_text("Metadata-Version: 2.1\nName: tcpstates-evil\x1b[31m\nVersion: 1.0\x1b[0m\n")
    return {"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}


def test_plugins_listing_escapes_what_distributions_say(tmp_path):
    """`tcpstates plugins`: a distribution's name, version, description and
    option help reach the terminal escaped, one line per item."""
    r = run_cli("plugins", env=_hostile_dist(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out
    assert not any(line.startswith("FORGED") for line in out.splitlines())
    assert "evil\\x1b[31m description\\x0aFORGED" in out and "tcpstates-evil\\x1b[31m" in out
    assert "help\\x1b[2Jclear\\x0aFORGED help line" in out


@pytest.mark.kernel      # doctor's own checks look at BPF
def test_doctor_escapes_check_details(tmp_path):
    r = run_cli("doctor", env=_hostile_dist(tmp_path))
    out = r.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out, out
    assert not any(line.startswith("FORGED") for line in out.splitlines()), out
    assert "detail\\x1b]0;title\\x07\\x0aFORGED doctor line" in out


@pytest.mark.parametrize("option,char", [("sinks.text.path", "\\u009b"), ("sinks.jsonl.path", "\\u0085"),
                                         ("sinks.journal.identifier", "\\u202e"),
                                         ("sinks.forward.tag", "\\u2028")])
def test_c1_controls_and_bidi_overrides_in_options_are_refused(option, char):
    """Not only C0 and DEL: a C1 control (\\x9b is CSI to an 8-bit terminal), a
    bidi override or a line separator would reach file names and journal lines."""
    sink = option.split(".")[1]
    r = run_cli("--replay", os.devnull, "--sink", sink, "-o", f'{option}="a{char}b"')
    one_line_error(r, f"{option}: contains the control character {char}")


@pytest.mark.root         # a private journald: a mount namespace
def test_journal_message_escapes_process_names(tmp_path):
    """MESSAGE is the line `journalctl -o cat` and syslog forwarding print:
    a process name cannot forge a journal line or send escape sequences; the
    COMM field keeps the raw name."""
    from journald import PrivateJournald

    from tcpstates.plugins.journal.sink import MESSAGE_ID_STATE_CHANGE
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(_record(comm=HOSTILE_NAME))
    j = PrivateJournald(tmp_path / "journald").start()
    try:
        r = subprocess.run(j.argv(tcpstates_argv("--replay", str(trace), "--sink", "journal")),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert b"written: journal 1;" in r.stderr, r.stderr
        j.sync()
        out = subprocess.run(["journalctl", "-D", str(j.journal_dir), "--no-pager", "-a", "-o", "cat",
                              "SYSLOG_IDENTIFIER=tcpstates", "MESSAGE_ID=" + MESSAGE_ID_STATE_CHANGE],
                             capture_output=True, timeout=30).stdout.decode()
    finally:
        j.stop()
    assert out.startswith("a\\x0aFAKE\\x1b[31m\\u202e 10.0.0.1 1 → 10.0.0.2 2 LISTEN → CLOSE"), out
    assert "\x1b" not in out and "\u202e" not in out and out.count("\n") == 1, out
