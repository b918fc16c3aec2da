"""The owner plugin's kernel feature detection and doctor line, without root."""

from __future__ import annotations

import pytest

from tcpstates.plugins.owner import kernel
from tcpstates.plugins.owner.doctor import _owner


def test_missing_tracepoints_fall_back_and_doctor_says_so(tmp_path, monkeypatch):
    (tmp_path / "events").mkdir()
    monkeypatch.setattr(kernel, "TRACEFS", (str(tmp_path),))
    s = kernel.owner_support(1024, btf_path=str(tmp_path / "no-btf"))
    assert not s.io and not s.accept and not s.identity
    assert "-DTCPSTATES_OWNER=1" in s.cflags and "-DTCPSTATES_OWNER_IO=1" not in s.cflags
    ok, detail = _owner()
    assert not ok and detail.startswith("fallback") and "sock_send_length" in detail


def test_format_file_offsets_are_read_not_assumed(tmp_path, io_tracefs):
    s = kernel.owner_support(1024, btf_path=str(tmp_path / "no-btf"))
    assert s.io and "-DTCPSTATES_TP_IO_SK=16" in s.cflags and "-DTCPSTATES_TP_IO_PROTOCOL=26" in s.cflags
    assert "-DTCPSTATES_TP_IO_FAMILY=24" in s.cflags


@pytest.mark.parametrize("pid_max,says", [(32768, "(proved per PID)"), (1 << 22, "checked in /proc")])
def test_doctor_says_how_an_owners_exit_is_known(monkeypatch, pid_max, says):
    # this machine's real tracefs and BTF; only pid_max is made up
    if not kernel.owner_support(1024).exits:
        pytest.skip("no sched:sched_process_exit group_dead (Linux >= 6.13)")
    monkeypatch.setattr(kernel, "_pid_max", lambda: pid_max)
    s = kernel.owner_support(1024)
    assert ("-DTCPSTATES_OWNER_SLOT_PER_PID=1" in s.cflags) == (pid_max <= kernel.GEN_SLOTS)
    ok, detail = _owner()
    assert ok and "process exits (" in detail and says in detail, detail


def test_send_recv_probes_attach_raw_where_btf_gives_the_protocol_offset():
    # this machine's real tracefs and BTF
    s = kernel.owner_support(1024)
    if not s.io:
        pytest.skip("no sock:sock_send_length/sock_recv_length (Linux >= 6.4)")
    assert s.io_raw and "-DTCPSTATES_OWNER_IO_RAW=1" in s.cflags
    # one definition of the offset, shared with accept tracking
    assert sum(f.startswith("-DTCPSTATES_OFF_SOCK_SK_PROTOCOL=") for f in s.cflags) == 1
    ok, detail = _owner()
    assert ok and "send/recv (raw tracepoints)" in detail, detail
    forced = kernel.owner_support(1024, io_probe="tracepoint")
    assert forced.io and not forced.io_raw and "-DTCPSTATES_OWNER_IO_RAW=1" not in forced.cflags
    assert not forced.missing        # asked for: not a fallback


def test_without_btf_send_recv_probes_stay_perf_event_tracepoints(tmp_path, io_tracefs):
    s = kernel.owner_support(1024, btf_path=str(tmp_path / "no-btf"))
    assert s.io and not s.io_raw and "-DTCPSTATES_OWNER_IO_RAW=1" not in s.cflags


def test_close_tracking_and_netns_marking_from_this_kernels_tracefs_and_btf():
    # this machine's real tracefs and BTF: the close probe's fd offset comes from
    # the format file, the netns of this process from /proc/self/ns/net
    s = kernel.owner_support(1024)
    if not s.accept:
        pytest.skip("no accept tracking (syscall tracepoints or BTF missing)")
    assert s.closes and "-DTCPSTATES_OWNER_CLOSE=1" in s.cflags and "-DTCPSTATES_TP_CLOSE_FD=16" in s.cflags
    assert s.netns and f"-DTCPSTATES_OWNER_HOME_NETNS={kernel.home_netns()}U" in s.cflags
    ok, detail = _owner()
    assert ok and "closes of a handed-on socket" in detail and "network namespaces" in detail, detail


def test_without_the_close_tracepoint_doctor_says_what_is_lost(tmp_path, monkeypatch):
    # a tracefs with the accept tracepoints but no sys_enter_close; this machine's BTF
    real = kernel._tracefs()
    if real is None or not kernel.owner_support(1024).accept:
        pytest.skip("no accept tracking on this kernel")
    for name in ("sys_exit_accept4", "sys_exit_accept"):
        d = tmp_path / "events" / "syscalls" / name
        d.mkdir(parents=True)
        d.joinpath("format").write_text((real / "events" / "syscalls" / name / "format").read_text())
    monkeypatch.setattr(kernel, "TRACEFS", (str(tmp_path),))
    s = kernel.owner_support(1024)
    assert s.accept and not s.closes and "-DTCPSTATES_OWNER_CLOSE=1" not in s.cflags
    assert any("sys_enter_close" in why for why in s.missing), s.missing


def test_close_tracking_can_be_turned_off():
    # this machine's real tracefs and BTF: kernel_close = false spares every close()
    # the syscall tracepoint, and is said (not warned: it was asked for)
    s = kernel.owner_support(1024, close=False)
    assert not s.closes and "-DTCPSTATES_OWNER_CLOSE=1" not in s.cflags
    assert kernel.CLOSE_OFF in s.missing


@pytest.mark.parametrize("probe,says", [
    ("auto", "send/recv probes attach as perf-event tracepoints (more kernel time per send/recv) and "
             "cannot tell a raw IPPROTO_TCP socket from TCP (its sends can evict owners)"),
    ("tracepoint", "the perf-event send/recv probes cannot tell a raw IPPROTO_TCP socket from TCP "
                   "(its sends can evict owners)")])
def test_without_the_sockets_type_in_btf_each_probe_form_says_what_it_loses(monkeypatch, probe, says):
    # this machine's real tracefs and BTF, except that BTF is made to lack
    # sock.sk_protocol/sk_type (older or stripped BTF)
    if not kernel.owner_support(1024).io:
        pytest.skip("no sock:sock_send_length/sock_recv_length (Linux >= 6.4)")
    real = kernel._offsets

    def offsets(btf, fields, sizes):
        if fields is kernel.RAW_IO_FIELDS:
            raise kernel.BTFError("struct sock has no member sk_type")
        return real(btf, fields, sizes)
    monkeypatch.setattr(kernel, "_offsets", offsets)
    s = kernel.owner_support(1024, io_probe=probe)
    assert s.io and not s.io_raw and "-DTCPSTATES_OWNER_IO_RAW=1" not in s.cflags
    # one line says it, whole, and nothing else is said of the socket's members
    assert [why for why in s.missing if "sk_type" in why] == [
        f"sock.sk_protocol/sk_type in BTF (struct sock has no member sk_type): {says}"], s.missing


@pytest.mark.parametrize("probe", ["auto", "tracepoint"])
def test_every_compile_flag_is_given_once(probe):
    # this machine's real tracefs and BTF: the send/recv, accept and close probes
    # share member offsets (sock.sk_type, the descriptor table); each -D once
    s = kernel.owner_support(1024, io_probe=probe)
    names = [f.split("=", 1)[0] for f in s.cflags]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
