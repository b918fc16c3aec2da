"""The forward sink against hostile or broken input: non-finite and huge numbers,
bad addresses (refused at config time, exit 2, one line), a receiver flooding
replies (bounded read, reported, reconnect), and the overflow `lost` record
delivered even when no event follows."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from fbcase import trace
from fluent_receiver import ForwardReceiver
from tracer import run_cli, tcpstates_argv
from traffic import free_port


@pytest.mark.parametrize("key", ["ack_timeout", "exit_timeout", "retry_min", "retry_max"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308", "-1"])
def test_non_finite_or_huge_timeouts_refused(tmp_path, key, value):
    r = run_cli("--replay", str(trace(tmp_path / "t.jsonl", 1)), "--sink", "forward",
                "-o", f"sinks.forward.{key}={value}")
    assert r.returncode == 2, r
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and f"sinks.forward.{key}" in lines[0], lines
    assert "Traceback" not in r.stderr.decode()


@pytest.mark.parametrize("address", ["nohost", "h:0", "h:99999", "unix:relative", "::1:24224", "[zz]:1",
                                     "bad host:24224", "a\\x1bb:24224", "unix:///" + "x" * 200,
                                     "-h:24224", "h:+80"])
def test_invalid_addresses_refused_at_config_time(tmp_path, address):
    r = run_cli("--replay", str(trace(tmp_path / "t.jsonl", 1)), "--sink", "forward",
                "-o", f"sinks.forward.address=\"{address}\"")
    assert r.returncode == 2, r
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and "sinks.forward" in lines[0] and "address" in lines[0], lines
    assert "\x1b" not in lines[0]


@pytest.mark.parametrize("opts,msg", [
    (("username=alice", "password=x"), "needs shared_key"),
    (("tls_ca_file=/etc/hostname",), "set tls = true"),
    (("tls=true", "tls_ca_file=/nonexistent/ca.pem"), "tls_ca_file: cannot open /nonexistent/ca.pem"),
    (("tls=true", "tls_ca_file=/etc/hostname"), "tls_ca_file: /etc/hostname does not hold usable CA"),
    (("tls_server_name=fluent.example",), "set tls = true"),
    (("tls=true", "tls_server_name=\"bad name\""), "tls_server_name: 'bad name': neither a host name nor"),
    (("tls=true", "tls_server_name=\"fluent.example\\n\""), "tls_server_name: contains the control character"),
    (("tls=true", "tls_server_name=\"-x.example\""), "tls_server_name: '-x.example': neither"),
    (("tls=true", "tls_verify=false", "tls_ca_file=/etc/hostname"),
     "tls_ca_file: has no effect with tls_verify = false"),
])
def test_inconsistent_auth_and_tls_options_refused(tmp_path, opts, msg):
    args = ["--replay", str(trace(tmp_path / "t.jsonl", 1)), "--sink", "forward"]
    for o in opts:
        args += ["-o", f"sinks.forward.{o}"]
    r = run_cli(*args)
    assert r.returncode == 2, r
    assert msg in r.stderr.decode() and len(r.stderr.decode().splitlines()) == 1


def _tls_refusal(tmp_path, *opts: str) -> str:
    args = ["--replay", str(trace(tmp_path / "t.jsonl", 1)), "--sink", "forward",
            "-o", "sinks.forward.address=127.0.0.1:9", "-o", "sinks.forward.tls=true"]
    for o in opts:
        args += ["-o", f"sinks.forward.{o}"]
    r = run_cli(*args, timeout=20)
    assert r.returncode == 2, r
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_tls_files_that_are_not_regular_files_are_refused_not_waited_on(tmp_path):
    # a FIFO nobody writes hung the start for ever (ssl opened it by path and read)
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    for key in ("tls_ca_file", "tls_cert_file"):
        err = _tls_refusal(tmp_path, f"{key}={fifo}")
        assert f"sinks.forward.{key}" in err and "not a regular file" in err, err


def test_tls_files_openssl_cannot_use_are_named(tmp_path):
    # OpenSSL saw only /proc/self/fd/N: "TLS set-up failed: [SSL] PEM lib" named no file
    bad = tmp_path / "bad.pem"
    bad.write_text("not PEM\n")
    bad.chmod(0o600)
    err = _tls_refusal(tmp_path, f"tls_ca_file={bad}")
    assert f"sinks.forward.tls_ca_file: {bad} does not hold usable CA certificates" in err, err
    err = _tls_refusal(tmp_path, f"tls_cert_file={bad}")
    assert f"sinks.forward.tls_cert_file: {bad} does not hold a usable certificate" in err, err


@pytest.mark.root
def test_tls_files_others_could_change_are_refused_as_root(tmp_path):
    import pwd
    nobody = pwd.getpwnam("nobody").pw_uid
    ca = tmp_path / "ca.pem"
    ca.write_text("not read\n")
    os.chown(ca, nobody, -1)          # another user's CA would vouch for any receiver
    err = _tls_refusal(tmp_path, f"tls_ca_file={ca}")
    assert "refusing to read" in err and f"owner uid {nobody}" in err, err
    os.chown(ca, 0, -1)
    ca.chmod(0o666)
    assert "writable by someone other than root" in _tls_refusal(tmp_path, f"tls_ca_file={ca}")
    # a link planted in a directory anyone may change, to a root-owned file
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    good = tmp_path / "good.pem"
    good.write_text("x\n")
    (shared / "ca.pem").symlink_to(good)
    assert "refusing to read" in _tls_refusal(tmp_path, f"tls_ca_file={shared / 'ca.pem'}")
    # a private key every user can read
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x\n")
    key.write_text("x\n")
    key.chmod(0o644)
    err = _tls_refusal(tmp_path, f"tls_cert_file={cert}", f"tls_key_file={key}")
    assert "tls_key_file" in err and "readable by every user" in err, err


class Flooder:
    """A 'receiver' answering every connection with up to 100 MB of junk."""

    def __init__(self, total: int = 100 * 1024 * 1024) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.total = total
        self.sent = 0
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        junk = b"A" * 65536
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            conn.settimeout(1)
            with conn:
                sent = 0
                try:                           # a 4 GB bin that never ends
                    conn.sendall(b"\xc6\xff\xff\xff\xff")
                except OSError:
                    continue
                while sent < self.total and not self.stopped.is_set():
                    try:
                        sent += conn.send(junk)
                    except OSError:
                        break
                self.sent += sent

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


def test_receiver_flooding_replies_is_bounded_reported_and_reconnected(tmp_path):
    rx = Flooder()
    try:
        start = time.monotonic()
        r = run_cli("--replay", str(trace(tmp_path / "t.jsonl", 100)), "--sink", "forward",
                    "-o", f"sinks.forward.address={rx.address}", "-o", "sinks.forward.retry_min=0.05",
                    "-o", "sinks.forward.retry_max=0.1", "-o", "sinks.forward.exit_timeout=2", timeout=60)
        took = time.monotonic() - start
    finally:
        rx.stop()
    err = r.stderr.decode()
    assert r.returncode == 1 and "every sink failed" in err, err     # nothing was acknowledged
    assert "not reading further" in err or "reply exceeds" in err, err
    assert rx.connections >= 2              # the thread survived and reconnected
    assert "100 events not acknowledged" in err and "0 acknowledged, 100 lost" in err
    assert took < 20
    assert rx.sent < rx.connections * 8 * 1024 * 1024    # we stopped reading; nothing near 100 MB each


def test_overflow_lost_record_is_delivered_without_a_following_event(tmp_path):
    """Receiver down while 500 events come in with room for 100: once it is up,
    the 100 and then the `lost` record (400) arrive, although no event follows."""
    port = free_port()
    import subprocess
    err_path = tmp_path / "err"
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen(tcpstates_argv("--replay", str(trace(tmp_path / "t.jsonl", 500)), "--sink", "forward",
                                               "-o", f"sinks.forward.address=127.0.0.1:{port}",
                                               "-o", "sinks.forward.buffer_events=100",
                                               "-o", "sinks.forward.chunk_events=50",
                                               "-o", "sinks.forward.retry_min=0.05", "-o", "sinks.forward.retry_max=0.1",
                                               "-o", "sinks.forward.exit_timeout=15"),
                                stderr=err_file)
    # the point of the test: the receiver is absent while events arrive; it
    # starts once the sink has said it cannot reach it
    deadline = time.monotonic() + 20
    while b"retrying with backoff" not in err_path.read_bytes():
        assert time.monotonic() < deadline and proc.poll() is None, err_path.read_bytes()
        time.sleep(0.02)
    rx = ForwardReceiver(port=port)
    try:
        proc.wait(timeout=30)
    finally:
        rx.stop()
    err = err_path.read_bytes()
    assert proc.returncode == 0, err
    recs = rx.records()
    events = [r for r in recs if r["type"] == "state_change"]
    lost = [r for r in recs if r["type"] == "lost"]
    assert [r["seq"] for r in events] == list(range(1, 101))
    assert len(lost) == 1 and lost[0]["kind"] == "forward_overflow" and lost[0]["count"] == 400, lost
    assert b"forward: 100 queued, 100 acknowledged, 400 lost" in err


def test_tls_without_verification_is_said_at_start(tmp_path):
    r = run_cli("--replay", str(trace(tmp_path / "t.jsonl", 1)), "--sink", "forward",
                "-o", "sinks.forward.address=127.0.0.1:9", "-o", "sinks.forward.tls=true",
                "-o", "sinks.forward.tls_verify=false", "-o", "sinks.forward.exit_timeout=0.5", timeout=30)
    err = r.stderr.decode()
    assert "Traceback" not in err, err
    assert "forward sink: tls_verify = false: the certificate of 127.0.0.1:9 is not verified" in err, err


def _planted_socket(path, owner: int) -> socket.socket:
    """A listening unix socket at `path` that belongs to uid `owner` (as one
    another user created): nothing is accepted, what connects stays queued."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    listener.setblocking(False)
    os.chown(path, owner, owner)
    return listener


def _received(listener: socket.socket) -> bytes:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return b""                       # nobody ever connected
    conn.settimeout(5)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    return data


NOBODY = 65534


@pytest.mark.root
@pytest.mark.parametrize("where", ["in a shared sticky directory", "in another user's directory there"])
def test_a_unix_socket_another_user_planted_gets_no_event(tmp_path, where):
    """As root, `address = "unix:///tmp/fluent.sock"` sent every event to whoever
    had created that socket first (a FIFO output owned by another user was
    already refused for the same reason)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)                 # as /tmp
    place = shared
    if where != "in a shared sticky directory":
        place = shared / "fluent"
        place.mkdir()
        os.chown(place, NOBODY, NOBODY)  # made by that user, first
    sock = place / "fluent.sock"
    listener = _planted_socket(sock, NOBODY)
    try:
        r = run_cli("--replay", str(trace(tmp_path / "in.jsonl", 5)), "--sink", "forward",
                    "-o", f"sinks.forward.address=unix://{sock}", "-o", "sinks.forward.ack=false")
        err = r.stderr.decode()
        assert r.returncode == 2 and err.count("\n") == 1, err
        assert "refusing to send events as root" in err and "Traceback" not in err, err
        assert _received(listener) == b""
    finally:
        listener.close()


@pytest.mark.root
def test_a_receiver_socket_in_its_own_run_directory_is_used(tmp_path):
    """Not every receiver runs as root (fluentd as td-agent): its socket in the
    run directory root made for it (/run/td-agent, owned by that user) is fine."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    own = run / "receiver"
    own.mkdir(mode=0o755)
    os.chown(own, NOBODY, NOBODY)
    sock = own / "fluent.sock"
    listener = _planted_socket(sock, NOBODY)
    try:
        r = run_cli("--replay", str(trace(tmp_path / "in.jsonl", 5)), "--sink", "forward",
                    "-o", f"sinks.forward.address=unix://{sock}", "-o", "sinks.forward.ack=false")
        err = r.stderr.decode()
        assert r.returncode == 0 and "written: forward 5" in err, err
        assert _received(listener).count(b"state_change") == 5
    finally:
        listener.close()
