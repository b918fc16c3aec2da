"""Bad input: one line on stderr, exit status 2, never a traceback."""

from __future__ import annotations

import os
import stat

import pytest
from tracer import run_cli

BAD_ARGS = [
    (["-L", "abc"], "-L"),
    (["-L", "0"], "out of range"),
    (["-L", "70000"], "out of range"),
    (["-L", ""], "empty"),
    (["-L", "80,,81"], "empty entry"),
    (["-D", "-5"], "-D"),
    (["-D", "80-"], "-D"),
    (["-4", "-6"], "not allowed with"),
    (["--sink", "nosuch"], "unknown sink 'nosuch'"),
    (["--sink", ""], "empty"),
    (["--sink", "text", "--sink", "text"], "twice"),
    (["--config", "/nonexistent/tcpstates.toml"], "not found"),
    (["--config", ""], "empty path"),
    (["--bogus"], "unrecognized arguments"),
    (["-o", "novalue"], "KEY=VALUE"),
    (["-o", "sinks.text.wide=3"], "sinks.text.wide: expected true or false"),
    (["-o", "sinks.text.colour=true"], "sinks.text.colour: unknown option"),
    (["-o", "sources.kernel.buffer_pages=3"], "power of two"),
    (["-o", "tcpstates.sinks=\"text\""], "tcpstates.sinks: expected a list"),
    (["--replay", "/nonexistent.jsonl"], "not found"),
    (["--replay", ""], "empty path"),
    (["plugins", "--nope"], "unrecognized"),
]


def _assert_one_line_error(result, needle: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("tcpstates: error: "), err
    assert needle in err, err
    assert result.stdout == b""


@pytest.mark.parametrize("args,needle", BAD_ARGS, ids=[" ".join(a) or "empty" for a, _ in BAD_ARGS])
def test_bad_command_line(args, needle):
    _assert_one_line_error(run_cli(*args), needle)


BAD_CONFIGS = [
    ("[tcpstates\n", "malformed TOML"),
    ("colour = 1\n", "colour: unknown section"),
    ("[sinks.text]\nwide = \"yes\"\n", "sinks.text.wide: expected true or false, got a string"),
    ("[sinks.audit]\ntype = \"nosuch\"\n", "sinks.audit.type: unknown sink 'nosuch'"),
    ("[sinks.text]\non_error = \"explode\"\n", "sinks.text.on_error: expected one of"),
    ("[[chain]]\nuse = \"nosuch\"\n", "chain[0].use: unknown filter or enricher 'nosuch'"),
    ("[[chain]]\nmin_ms = 5\n", "chain[0].use: missing"),
    ("[[chain]]\nuse = \"duration\"\nmin_ms = \"slow\"\n", "chain[0].min_ms: expected a number"),
    ("[[chain]]\nuse = \"state\"\ntransitions = [\"SYN_SENT-CLOSE\"]\n", "not OLD->NEW"),
    ("[[chain]]\nuse = \"address\"\nlocal = [\"300.1.1.1/8\"]\n", "not an address or CIDR"),
    ("[[chain]]\nuse = \"ports\"\nlocal = [\"9-2\"]\n", "backwards"),
    ("[sources.kernel]\nmax_sockets = 1\n", "sources.kernel.max_sockets"),
    ("[sources.nosuch]\n", "sources.nosuch: unknown source"),
    ("[tcpstates]\nsinks = []\n", "no sinks"),
    ("[plugins]\ndisable = \"x\"\n", "plugins.disable: expected a list"),
    ("chain = 3\n", "chain: expected an array"),
]


@pytest.mark.parametrize("text,needle", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_bad_config_file(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    _assert_one_line_error(run_cli("--config", str(path), "--replay", os.devnull), needle)


def test_config_that_is_a_directory(tmp_path):
    _assert_one_line_error(run_cli("--config", str(tmp_path)), "is a directory")


def test_config_not_utf8(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe[x]\n")
    _assert_one_line_error(run_cli("--config", str(path)), "not valid UTF-8")


@pytest.mark.root
def test_config_refusal_names_the_directory_others_can_change(tmp_path):
    import pwd
    tmp_path.chmod(0o755)
    outer = tmp_path / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    os.chown(outer, pwd.getpwnam("nobody").pw_uid, -1)   # nobody may swap inner
    (inner / "c.toml").write_text("")
    r = run_cli("--config", str(inner / "c.toml"), "--replay", os.devnull)
    _assert_one_line_error(r, "directory inner is in directory outer, which someone other than root can change")


@pytest.mark.root
def test_config_writable_by_others_is_refused_as_root(tmp_path):
    assert os.geteuid() == 0
    path = tmp_path / "open.toml"
    path.write_text("[sinks.text]\nwide = true\n")
    path.chmod(0o666)
    _assert_one_line_error(run_cli("--config", str(path), "--replay", os.devnull),
                           "writable by someone other than root")
    ok = run_cli("--config", str(path), "--allow-insecure-config", "--replay", os.devnull, "--no-summary")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(b"SKADDR           C-PID C-COMM           IP LADDR")


def test_unreadable_config_as_non_root(tmp_path):
    if os.geteuid() == 0:
        # root reads anything; prove the message with a file that vanished instead
        _assert_one_line_error(run_cli("--config", str(tmp_path / "gone.toml")), "not found")
        return
    path = tmp_path / "secret.toml"
    path.write_text("")
    path.chmod(0)
    _assert_one_line_error(run_cli("--config", str(path)), "permission denied")


def test_not_root_is_a_clear_environment_error(request):
    if os.geteuid() != 0:
        result = run_cli()
    else:
        # run the real CLI as nobody (uid 65534), as an unprivileged user would
        result = request.getfixturevalue("as_nobody")()
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert err.count("\n") == 1 and "needs root" in err and "sudo" in err


def test_help_matches_bcc_flags():
    result = run_cli("-h")
    assert result.returncode == 0
    out = result.stdout.decode()
    for flag in ("-T, --time", "-t, --timestamp", "-w, --wide", "-s, --csv", "-L LOCALPORT, --localport",
                 "-D REMOTEPORT, --remoteport", "-Y, --journal", "-4, --ipv4", "-6, --ipv6"):
        assert flag in out
    assert "./tcpstates -stT      # csv output, with times & timestamps" in out


def test_repository_files_are_readable_by_setup():
    # the set-up scripts must stay executable in a fresh clone
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ("run.sh", "test.sh", "scripts/setup.sh", ".ci/run"):
        mode = os.stat(os.path.join(root, script)).st_mode
        assert mode & stat.S_IXUSR, script


def test_plugins_listing_into_a_closed_pipe_is_quiet():
    """`tcpstates plugins | head -1`: the reader leaves; no traceback, no 'internal error'."""
    from tracer import run_cli_reader_gone
    r = run_cli_reader_gone("plugins")
    assert r.returncode == 0 and r.stderr == b"", r.stderr


def test_chain_index_takes_ascii_digits_only(tmp_path):
    """`-o chain.N.key=` addresses [[chain]] entry N; "٠" is a digit to
    str.isdigit() and 0 to int(), and must not reach entry 0."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[chain]]\nuse = "duration"\nmin_ms = 1.0\n')
    _assert_one_line_error(run_cli("--config", str(cfg), "--replay", os.devnull, "-o", "chain.\u0660.min_ms=5"),
                           "not an existing index")


def test_chain_index_of_thousands_of_digits_is_a_usage_error(tmp_path):
    """Review 10: int() refuses a string of more than 4,300 digits with a
    ValueError, which reached the user as 'internal error' (exit 1)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[chain]]\nuse = "duration"\nmin_ms = 1.0\n')
    _assert_one_line_error(run_cli("--config", str(cfg), "--replay", os.devnull,
                                   "-o", f"chain.{'9' * 5000}.min_ms=5"), "not an existing index")
