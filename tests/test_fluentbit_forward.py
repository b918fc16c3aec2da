"""`--sink forward` into the real Fluent Bit's `forward` input: every event, by seq,
with tag and nanosecond EventTime, over TCP, IPv6 and a unix socket, in Forward
and PackedForward mode; across Fluent Bit restarts (SIGTERM and SIGKILL, with
`storage.type filesystem`); with the shared_key handshake, user auth and TLS;
with a receiver that rejects oversized chunks. Fluent Bit ships on to our
Python receiver through its own `forward` output."""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import msgpack
import pytest
from fbcase import check_exact, needs_fluent_bit, trace
from fluent_receiver import ForwardReceiver
from fluentbit import forward_output, free_port, wait_until
from tracer import run_cli, tcpstates_argv

pytestmark = needs_fluent_bit


@pytest.fixture
def receiver():
    rx = ForwardReceiver()
    yield rx
    rx.stop()


def forward_input(listen: str = "127.0.0.1", port: int = 0, unix_path: str = "", extra: str = "") -> str:
    where = f"    Unix_Path {unix_path}\n" if unix_path else f"    Listen {listen}\n    Port {port}\n"
    return f"[INPUT]\n    Name forward\n{where}{extra}"


def ship(*opts: str, n: int, tmp_path: Path, timeout: float = 60):
    # a replay ends as soon as it is read: the delivery happens within exit_timeout,
    # whose default (1 s) bounds a stop, not a bulk upload
    if not any(o.startswith("exit_timeout=") for o in opts):
        opts = (*opts, "exit_timeout=30")
    args = ["--replay", str(trace(tmp_path / "trace.jsonl", n)), "--sink", "forward"]
    for o in opts:
        args += ["-o", f"sinks.forward.{o}"]
    return run_cli(*args, timeout=timeout)


@pytest.mark.parametrize("transport,mode", [("tcp", "forward"), ("tcp6", "packed"), ("unix", "forward")])
def test_every_event_arrives_through_real_fluent_bit(tmp_path, fluent_bit, receiver, transport, mode):
    port = free_port()
    if transport == "unix":
        sock = str(tmp_path / "fb.sock")
        cfg, address, wait = forward_input(unix_path=sock), f"unix://{sock}", sock
    elif transport == "tcp6":
        cfg, address, wait = forward_input("::1", port), f"[::1]:{port}", None
    else:
        cfg, address, wait = forward_input(port=port), f"127.0.0.1:{port}", ("127.0.0.1", port)
    fb = fluent_bit(cfg + forward_output(receiver.address), wait_for=wait)
    if transport == "tcp6":
        wait_until(lambda: _accepts6(port), 10, "Fluent Bit on [::1]")
    n = 20_000
    r = ship(f"address={address}", f"mode={mode}", n=n, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"written: forward {n};" in r.stderr.decode()
    assert f"forward: {n} queued, {n} acknowledged, 0 lost" in r.stderr.decode()
    wait_until(lambda: len(receiver.records()) >= n, 30, f"{n} records out of Fluent Bit")
    fb.stop()
    figures = check_exact(receiver.entries, n)
    assert figures == {"received": n, "lost": 0, "duplicates": 0}


def _accepts6(port: int) -> bool:
    with socket.socket(socket.AF_INET6) as s:
        s.settimeout(0.5)
        return s.connect_ex(("::1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_fluent_bit_restart_mid_stream_loses_nothing(tmp_path, fluent_bit, receiver, sig):
    """forward.conf's set-up (storage.type filesystem): what Fluent Bit acked survives
    even SIGKILL; what it did not ack is resent by tcpstates (at least once)."""
    port = free_port()
    storage = tmp_path / "storage"
    cfg = (f"[SERVICE]\n    storage.path {storage}\n"
           + forward_input(port=port, extra="    storage.type filesystem\n")
           + forward_output(receiver.address))
    fb = fluent_bit(cfg, name="fb1", wait_for=("127.0.0.1", port))
    half, n = 5000, 10_000
    trace(tmp_path / "trace.jsonl", n)
    lines = (tmp_path / "trace.jsonl").read_bytes().splitlines(keepends=True)
    proc = subprocess.Popen(tcpstates_argv("--replay", "-", "--sink", "forward",
                                           "-o", "sources.replay.batch_size=500",
                                           "-o", f"sinks.forward.address=127.0.0.1:{port}",
                                           "-o", "sinks.forward.retry_min=0.05", "-o", "sinks.forward.retry_max=0.5",
                                           "-o", "sinks.forward.ack_timeout=2", "-o", "sinks.forward.exit_timeout=30"),
                            stdin=subprocess.PIPE, stderr=open(tmp_path / "stderr", "wb"))
    try:
        proc.stdin.write(b"".join(lines[:half]))
        proc.stdin.flush()
        # Fluent Bit has received (and acked) part of the stream when it goes down
        wait_until(lambda: _input_records(fb) >= 1000, 20, "Fluent Bit to take in the first events")
        fb.stop(sig)
        fb2 = fluent_bit(cfg, name="fb2", wait_for=("127.0.0.1", port))
        proc.stdin.write(b"".join(lines[half:]))
        proc.stdin.close()
        proc.wait(60)
        err = (tmp_path / "stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    wait_until(lambda: len({r["seq"] for r in receiver.records()}) >= n, 30, "all events out of Fluent Bit")
    fb2.stop()
    figures = check_exact(receiver.entries, n, allow_duplicates=True)
    assert figures["lost"] == 0
    print(f"restart with {sig.name}: {figures}")


def _input_records(fb) -> int:
    try:
        return sum(v.get("records", 0) for v in fb.metrics()["input"].values())
    except OSError:
        return 0


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A test CA, a server certificate for localhost/127.0.0.1, one (same CA) only for
    fluent.example.internal, and a client certificate."""
    d = tmp_path_factory.mktemp("certs")

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=d, check=True, capture_output=True, timeout=60)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=tcpstates-test-ca")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key",
        "-out", "other-ca.crt", "-days", "2", "-subj", "/CN=someone-else")
    for name, usage, san in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                             ("elsewhere", "serverAuth", "DNS:fluent.example.internal"),
                             ("client", "clientAuth", "DNS:tcpstates-client")):
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                       f"keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return d


AUTH = "    Shared_Key s3cret\n    Self_Hostname fb-server\n    Security.Users alice wonderland\n"


def test_shared_key_handshake_with_user(tmp_path, fluent_bit, receiver):
    port = free_port()
    fluent_bit(forward_input(port=port, extra=AUTH) + forward_output(receiver.address),
               wait_for=("127.0.0.1", port))
    n = 3000
    r = ship(f"address=127.0.0.1:{port}", "shared_key=s3cret", "username=alice", "password=wonderland",
             n=n, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{n} acknowledged, 0 lost" in r.stderr.decode()
    wait_until(lambda: len(receiver.records()) >= n, 30, "records")
    check_exact(receiver.entries, n)


def test_self_hostname_passes_real_fluent_bits_handshake(tmp_path, fluent_bit, receiver):
    """Fluent Bit checks the PING's digest with the hostname the PING carries
    (and refuses one that is not a string): a self_hostname of ours that did not
    go into both would be refused."""
    port = free_port()
    fluent_bit(forward_input(port=port, extra=AUTH) + forward_output(receiver.address),
               wait_for=("127.0.0.1", port))
    r = ship(f"address=127.0.0.1:{port}", "shared_key=s3cret", "username=alice", "password=wonderland",
             "self_hostname=edge-7.example", n=50, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "50 acknowledged, 0 lost" in r.stderr.decode()
    wait_until(lambda: len(receiver.records()) >= 50, 30, "records")


@pytest.mark.parametrize("option,sent", [("self_hostname=edge-7.example", "edge-7.example"), (None, None)])
def test_the_ping_carries_self_hostname_or_this_hosts_name(tmp_path, option, sent):
    """What Fluent Bit does not show: which hostname our PING named. A server
    of the test's own (Fluent Bit exposes the client's hostname nowhere) sends
    the HELO, keeps the PING and closes; the digest must be over that name."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(30)
    pings: list = []

    def serve() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                conn.sendall(msgpack.packb(["HELO", {"nonce": b"n0nce", "auth": b"", "keepalive": True}]))
                unpacker = msgpack.Unpacker(raw=False)
                while not pings:
                    data = conn.recv(4096)
                    if not data:
                        return
                    unpacker.feed(data)
                    pings.extend(unpacker)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    opts = [f"address=127.0.0.1:{srv.getsockname()[1]}", "shared_key=k3y", "exit_timeout=1",
            "ack_timeout=2"] + ([option] if option else [])
    ship(*opts, n=3, tmp_path=tmp_path)
    t.join(30)
    assert len(pings) == 1 and pings[0][0] == "PING" and len(pings[0]) == 6, pings
    _, hostname, salt, digest, _, _ = pings[0]
    assert hostname == (sent or socket.gethostname()), hostname
    assert digest == hashlib.sha512(salt.encode() + hostname.encode() + b"n0nce" + b"k3y").hexdigest()


@pytest.mark.parametrize("creds,expect", [
    (("shared_key=s3cret", "username=alice", "password=wrong"),
     "receiver refused the handshake: username/password mismatch"),
    (("shared_key=wrong", "username=alice", "password=wonderland"),
     "receiver closed the connection instead of answering our PING: it refused our shared_key"),
    ((), "receiver expects the Forward handshake (it sent HELO): set shared_key"),
])
def test_handshake_failures_are_reported_not_silent(tmp_path, fluent_bit, receiver, creds, expect):
    port = free_port()
    fluent_bit(forward_input(port=port, extra=AUTH) + forward_output(receiver.address),
               wait_for=("127.0.0.1", port))
    r = ship(f"address=127.0.0.1:{port}", *creds, "exit_timeout=1", "ack_timeout=2", n=10, tmp_path=tmp_path)
    err = r.stderr.decode()
    # its only sink delivered nothing: the run failed
    assert r.returncode == 1, err
    assert "error: every sink failed (forward: delivered nothing, 0 of 10 events written)" in err
    assert expect in err
    assert "written: forward 0;" in err and "forward: 10 queued, 0 acknowledged, 10 lost" in err
    assert "10 events not acknowledged" in err
    assert receiver.records() == []


TLS = "    tls on\n    tls.verify off\n    tls.crt_file {d}/server.crt\n    tls.key_file {d}/server.key\n"


def test_tls_with_verified_server_and_shared_key(tmp_path, fluent_bit, receiver, certs):
    port = free_port()
    fluent_bit(forward_input(port=port, extra=TLS.format(d=certs) + AUTH) + forward_output(receiver.address),
               wait_for=("127.0.0.1", port))
    n = 3000
    r = ship(f"address=127.0.0.1:{port}", "tls=true", f"tls_ca_file={certs}/ca.crt",
             "tls_server_name=localhost", "shared_key=s3cret", "username=alice", "password=wonderland",
             n=n, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{n} acknowledged, 0 lost" in r.stderr.decode()
    wait_until(lambda: len(receiver.records()) >= n, 30, "records")
    check_exact(receiver.entries, n)


def test_tls_server_not_signed_by_our_ca_is_refused(tmp_path, fluent_bit, receiver, certs):
    port = free_port()
    fluent_bit(forward_input(port=port, extra=TLS.format(d=certs)) + forward_output(receiver.address),
               wait_for=("127.0.0.1", port))
    r = ship(f"address=127.0.0.1:{port}", "tls=true", f"tls_ca_file={certs}/other-ca.crt",
             "exit_timeout=1", n=10, tmp_path=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "CERTIFICATE_VERIFY_FAILED" in err and "10 lost" in err
    assert receiver.records() == []


ELSEWHERE = "    tls on\n    tls.verify off\n    tls.crt_file {d}/elsewhere.crt\n    tls.key_file {d}/elsewhere.key\n"


@pytest.mark.parametrize("address,name_opts,host", [
    ("127.0.0.1", (), "127.0.0.1"),                             # the address's IP is what is checked
    ("localhost", (), "localhost"),                             # the address's name, as written
    ("127.0.0.1", ("tls_server_name=localhost",), "localhost"),  # tls_server_name replaces it
])
def test_tls_certificate_for_another_name_is_refused(tmp_path, fluent_bit, receiver, certs, address,
                                                     name_opts, host):
    """Signed by our CA, but for fluent.example.internal only: with tls_verify (the
    default) the name checked is not in it. Refused before anything is sent: one
    warning naming the host and the way out, nothing acknowledged, every event
    counted lost, nothing reaches Fluent Bit, exit status 1."""
    port = free_port()
    fb = fluent_bit(forward_input(port=port, extra=ELSEWHERE.format(d=certs)) + forward_output(receiver.address),
                    wait_for=("127.0.0.1", port))
    r = ship(f"address={address}:{port}", "tls=true", f"tls_ca_file={certs}/ca.crt", *name_opts,
             "exit_timeout=1", "retry_min=0.05", n=10, tmp_path=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 1, err            # every sink failed: delivered nothing
    assert "error: every sink failed (forward: delivered nothing, 0 of 10 events written)" in err, err
    warnings = [line for line in err.splitlines() if "certificate" in line]
    assert len(warnings) == 1, err          # said once, not at every retry
    assert f"certificate is not valid for {host!r}" in warnings[0], err
    assert "tls_server_name" in warnings[0], err
    assert "written: forward 0;" in err and "forward: 10 queued, 0 acknowledged, 10 lost" in err, err
    assert "10 events not acknowledged" in err, err
    assert _input_records(fb) == 0
    assert receiver.records() == []


def test_tls_server_name_matching_the_certificate_is_accepted(tmp_path, fluent_bit, receiver, certs):
    """The same certificate, reached by IP with tls_server_name set to its name
    (Fluent Bit's out_forward calls it tls.vhost): verified, every event delivered."""
    port = free_port()
    fluent_bit(forward_input(port=port, extra=ELSEWHERE.format(d=certs)) + forward_output(receiver.address),
               wait_for=("127.0.0.1", port))
    n = 2000
    r = ship(f"address=127.0.0.1:{port}", "tls=true", f"tls_ca_file={certs}/ca.crt",
             "tls_server_name=fluent.example.internal", n=n, tmp_path=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "forward sink:" not in err, err
    assert f"written: forward {n};" in err and f"forward: {n} queued, {n} acknowledged, 0 lost" in err, err
    wait_until(lambda: len(receiver.records()) >= n, 30, "records")
    assert check_exact(receiver.entries, n) == {"received": n, "lost": 0, "duplicates": 0}


def test_tls_client_certificate(tmp_path, fluent_bit, receiver, certs):
    port = free_port()
    extra = (f"    tls on\n    tls.verify on\n    tls.ca_file {certs}/ca.crt\n"
             f"    tls.crt_file {certs}/server.crt\n    tls.key_file {certs}/server.key\n")
    fluent_bit(forward_input(port=port, extra=extra) + forward_output(receiver.address),
               wait_for=("127.0.0.1", port))
    n = 1000
    r = ship(f"address=127.0.0.1:{port}", "tls=true", f"tls_ca_file={certs}/ca.crt",
             f"tls_cert_file={certs}/client.crt", f"tls_key_file={certs}/client.key", "exit_timeout=15", n=n, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{n} acknowledged, 0 lost" in r.stderr.decode()
    wait_until(lambda: len(receiver.records()) >= n, 30, "records")
    check_exact(receiver.entries, n)


def test_without_acks_the_summary_says_sent_not_acknowledged(tmp_path, fluent_bit, receiver):
    """ack = false: Fluent Bit confirms nothing, so the summary must not claim it did."""
    port = free_port()
    fluent_bit(forward_input(port=port) + forward_output(receiver.address), wait_for=("127.0.0.1", port))
    n = 2000
    r = ship(f"address=127.0.0.1:{port}", "ack=false", n=n, tmp_path=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert f"forward: {n} queued, {n} sent (no acks asked), 0 lost" in err, err
    assert "acknowledged" not in err
    wait_until(lambda: len(receiver.records()) >= n, 30, "records")
    check_exact(receiver.entries, n)


def test_chunk_over_buffer_max_size_is_reported_and_split(tmp_path, fluent_bit, receiver):
    """Fluent Bit resets the connection on a request over Buffer_Max_Size: the sink
    says so and splits, instead of resending the same chunk forever."""
    port = free_port()
    fluent_bit(forward_input(port=port, extra="    Buffer_Chunk_Size 100000\n    Buffer_Max_Size 200000\n")
               + forward_output(receiver.address), wait_for=("127.0.0.1", port))
    n = 5000
    r = ship(f"address=127.0.0.1:{port}", "chunk_events=5000", "chunk_bytes=2000000", "retry_min=0.01",
             "exit_timeout=30", n=n, tmp_path=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert re.search(r"rejected a chunk of \d+ events \(\d+ bytes\): it closed the connection without "
                     r"an ack twice \(Fluent Bit does so above its Buffer_Max_Size; or it restarted twice "
                     r"meanwhile\); nothing is lost", err), err
    assert f"{n} acknowledged, 0 lost" in err
    wait_until(lambda: len(receiver.records()) >= n, 30, "records")
    check_exact(receiver.entries, n)


@pytest.mark.kernel
def test_live_kernel_events_through_real_fluent_bit(tmp_path, fluent_bit, receiver, tracer):
    """The one inherently live path: real tracepoint → forward sink → Fluent Bit."""
    from traffic import session
    port = free_port()
    fb_port = free_port()
    fb = fluent_bit(forward_input(port=fb_port) + forward_output(receiver.address), wait_for=("127.0.0.1", fb_port))
    t = tracer("--sink", "forward", "-L", str(port), "-o", f"sinks.forward.address=127.0.0.1:{fb_port}")
    session(socket.AF_INET, port, hold=0.01, server_delay=0.0)
    rc, _, err = t.stop()
    assert rc == 0, err
    assert "written: forward 7;" in err
    wait_until(lambda: len(receiver.records()) >= 7, 20, "7 records")
    fb.stop()
    recs = receiver.records()
    assert len(recs) == 7 and {r["lport"] for r in recs} == {port}
    assert [r["seq"] for r in recs] == list(range(1, 8))
    for _, t_ns, r in receiver.entries:
        assert t_ns == r["time_ns"]


def test_overflow_lost_record_arrives_through_real_fluent_bit(tmp_path, fluent_bit, receiver):
    """Fluent Bit down while 500 events come in with room for 100: once it is up,
    the 100 events and then the in-band `lost` record (400) pass through the
    real Fluent Bit, although no event follows the overflow."""
    port = free_port()
    err_path = tmp_path / "err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            tcpstates_argv("--replay", str(trace(tmp_path / "t.jsonl", 500)), "--sink", "forward",
                           "-o", f"sinks.forward.address=127.0.0.1:{port}",
                           "-o", "sinks.forward.buffer_events=100", "-o", "sinks.forward.chunk_events=50",
                           "-o", "sinks.forward.retry_min=0.05", "-o", "sinks.forward.retry_max=0.1",
                           "-o", "sinks.forward.exit_timeout=30"),
            stderr=err)
        try:
            # Fluent Bit starts only once the sink has said it cannot reach it
            wait_until(lambda: b"retrying with backoff" in err_path.read_bytes(), 20,
                       "the forward sink's outage warning")
            fb = fluent_bit(forward_input(port=port) + forward_output(receiver.address),
                            wait_for=("127.0.0.1", port))
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err_path.read_bytes()
    assert proc.returncode == 0, stderr
    assert b"forward: 100 queued, 100 acknowledged, 400 lost" in stderr, stderr
    wait_until(lambda: any(e[2].get("type") == "lost" for e in receiver.entries), 30,
               "the lost record out of Fluent Bit")
    fb.stop()
    records = [e[2] for e in receiver.entries]
    events = [r for r in records if r.get("type") == "state_change"]
    lost = [r for r in records if r.get("type") == "lost"]
    assert sorted(r["seq"] for r in events) == list(range(1, 101))
    assert len(lost) == 1 and lost[0]["kind"] == "forward_overflow" and lost[0]["count"] == 400, lost
