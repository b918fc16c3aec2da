"""The real CLI on the real tracepoint: exact state sequences, ports,
addresses, durations and in-kernel filters, on loopback ports of our own."""

from __future__ import annotations

import socket

import pytest
from summary import lost_reported
from traffic import by_socket, free_port, parse_csv, refused, session, transitions

pytestmark = pytest.mark.kernel

CLIENT = ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
SERVER_CHILD = ["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]
LISTENER = ["CLOSE", "LISTEN", "CLOSE"]
REFUSED = ["CLOSE", "SYN_SENT", "CLOSE"]


def _ms(life: list[dict], old: str) -> float:
    (row,) = [r for r in life if r["OLDSTATE"] == old]
    return float(row["MS"])


def _classify(lives: list[list[dict]], port: int) -> dict[str, list[dict]]:
    out = {}
    for life in lives:
        first = life[0]
        if first["OLDSTATE"] == "CLOSE" and first["NEWSTATE"] == "LISTEN":
            out["listener"] = life
        elif first["OLDSTATE"] == "LISTEN":
            out["child"] = life
        elif int(first["RPORT"]) == port:
            out["client"] = life
    return out


def _session_lives(out: str, port: int) -> dict[str, list[dict]]:
    """The three sockets of one session, each with its exact state sequence."""
    lives = _classify(by_socket(parse_csv(out), {port}), port)
    assert transitions(lives["client"]) == CLIENT
    assert transitions(lives["child"]) == SERVER_CHILD
    assert transitions(lives["listener"]) == LISTENER
    return lives


# buffer "perf" is what kernels before 5.8 get: it must be as exact as the ring
@pytest.mark.parametrize("buffer", ["ring", "perf"])
@pytest.mark.parametrize("family,addr,ip", [(socket.AF_INET, "127.0.0.1", "4"),
                                            (socket.AF_INET6, "::1", "6")])
def test_full_session_sequences_ports_addresses_and_durations(tracer, family, addr, ip, buffer):
    for _attempt in range(3):
        port = free_port(family)
        t = tracer("-s", "-o", f"sources.kernel.buffer={buffer}")
        cport = session(family, port, hold=0.1, server_delay=0.05, listener_delay=0.02)
        rc, out, err = t.stop()
        assert rc == 0, err
        if not lost_reported(err):
            break
        # The kernel can skip the program for a tracepoint hit (issue 15's
        # attach-path loss, rare); the run then says so, which is all a tracer
        # can do. Such a run cannot show exact sequences: another session.
    lives = _session_lives(out, port)
    client, child, listener = lives["client"], lives["child"], lives["listener"]
    # the active opener's CLOSE->SYN_SENT has LPORT 0; the ephemeral port follows
    assert [int(r["LPORT"]) for r in client] == [0] + [cport] * 4
    assert all(int(r["RPORT"]) == port for r in client)
    assert all((int(r["LPORT"]), int(r["RPORT"])) == (port, cport) for r in child)
    assert all(r["RADDR"] == ("0.0.0.0" if ip == "4" else "::") and r["RPORT"] == "0" for r in listener)
    for r in client + child:
        assert (r["IP"], r["LADDR"], r["RADDR"]) == (ip, addr, addr)
    # durations follow the traffic's own pauses
    assert 100 <= _ms(client, "ESTABLISHED") < 200   # sleep() overshoots on a busy CI machine
    assert 100 <= _ms(child, "ESTABLISHED") < 200
    assert 50 <= _ms(child, "CLOSE_WAIT") < 150
    assert 170 <= _ms(listener, "LISTEN") < 400
    assert _ms(client, "SYN_SENT") < 20
    assert "0 dropped, 0 kernel misses" in err


def test_refused_connect(tracer):
    port = free_port()
    t = tracer("-s")
    refused(port)
    rc, out, err = t.stop()
    assert rc == 0, err
    (life,) = by_socket(parse_csv(out), {port})
    assert transitions(life) == REFUSED
    assert life[0]["LPORT"] == "0" and int(life[1]["LPORT"]) > 0


def test_local_port_filter_keeps_only_that_local_port(tracer):
    port, other = free_port(), free_port()
    t = tracer("-s", "-L", str(port))
    session(socket.AF_INET, port, hold=0.01, server_delay=0.0)
    session(socket.AF_INET, other, hold=0.01, server_delay=0.0)
    rc, out, err = t.stop()
    rows = parse_csv(out)
    assert rows and all(int(r["LPORT"]) == port for r in rows)
    lives = _classify(by_socket(rows, {port}), port)
    assert transitions(lives["child"]) == SERVER_CHILD
    assert transitions(lives["listener"]) == LISTENER
    assert "client" not in lives


def test_remote_port_filter_keeps_only_that_remote_port(tracer):
    port, other = free_port(), free_port()
    t = tracer("-s", "-D", f"{port},1")
    session(socket.AF_INET, port, hold=0.01, server_delay=0.0)
    session(socket.AF_INET, other, hold=0.01, server_delay=0.0)
    rc, out, err = t.stop()
    rows = parse_csv(out)
    assert rows and all(int(r["RPORT"]) in (port, 1) for r in rows)
    lives = _classify(by_socket(rows, {port}), port)
    assert transitions(lives["client"]) == CLIENT
    assert set(lives) == {"client"}


@pytest.mark.parametrize("flag,keep,drop", [("-4", "4", "6"), ("-6", "6", "4")])
def test_family_filter(tracer, flag, keep, drop):
    p4, p6 = free_port(socket.AF_INET), free_port(socket.AF_INET6)
    t = tracer("-s", flag)
    session(socket.AF_INET, p4, hold=0.01, server_delay=0.0)
    session(socket.AF_INET6, p6, hold=0.01, server_delay=0.0)
    rc, out, err = t.stop()
    rows = parse_csv(out)
    assert rows and all(r["IP"] == keep for r in rows)
    mine = by_socket(rows, {p4 if keep == "4" else p6})
    assert len(mine) == 3     # client, child, listener
    assert not by_socket(rows, {p6 if keep == "4" else p4})


def test_header_only_after_attach_and_first_event_not_lost(tracer):
    port = free_port()
    t = tracer()
    # READY came after attach: the header is already there, and nothing else
    lines = t.stdout_path.read_text().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("SKADDR           C-PID C-COMM")
    refused(port)    # right away: bcc would lose events in its header-to-buffer gap
    rc, out, err = t.stop()
    assert any(f" {port} " in l and "CLOSE       -> SYN_SENT" in l for l in out.splitlines())


def test_started_as_console_script_and_module_alike(tracer):
    import os
    import shutil
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(sys.executable), "tcpstates")
    assert shutil.which(script), "console script not installed"
    out = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("tcpstates ")


def test_tracer_process_stays_small_after_the_helper_compiled(tracer):
    # bcc/LLVM live only in the short-lived loader process (see plugins/kernel/loader.py)
    t = tracer("-L", "1")
    status = open(f"/proc/{t.proc.pid}/status").read()
    hwm_kb = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])
    maps = open(f"/proc/{t.proc.pid}/maps").read()
    t.stop()
    assert "libLLVM" not in maps and "libbcc" not in maps
    assert hwm_kb < 100 * 1024
