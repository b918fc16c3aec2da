"""tcpstates-services, tested with tcpstates.testing (no root, no bcc)."""

from tcpstates.testing import make_event, run_pipeline


def test_services_names_well_known_ports():
    result = run_pipeline('[[chain]]\nuse = "services"\n',
                          [make_event(sport=22, dport=443), make_event(sport=40000, dport=3)])
    first, second = result.events
    assert first.extra == {"lservice": "ssh", "rservice": "https"}
    assert "lservice" not in second.extra


def test_unknown_ports_can_be_labelled():
    result = run_pipeline('[[chain]]\nuse = "services"\nunknown = "?"\n', [make_event(sport=40001, dport=22)])
    assert result.events[0].extra == {"lservice": "?", "rservice": "ssh"}


def test_slow_handshake_keeps_slow_and_failed_connects():
    events = [
        make_event(oldstate="SYN_SENT", newstate="ESTABLISHED", span_ns=250_000_000),
        make_event(oldstate="SYN_SENT", newstate="ESTABLISHED", span_ns=50_000),
        make_event(oldstate="SYN_SENT", newstate="CLOSE", span_ns=1_000),
        make_event(oldstate="ESTABLISHED", newstate="FIN_WAIT1", span_ns=900_000_000),
    ]
    result = run_pipeline('[[chain]]\nuse = "slow_handshake"\nmin_ms = 200.0\n', events)
    assert [(e.newstate, e.span_ns) for e in result.events] == [(1, 250_000_000), (7, 1_000)]
    assert result.summary["filtered"] == 2


def test_options_are_validated():
    import pytest
    from tcpstates import ConfigError
    with pytest.raises(ConfigError, match=r"chain\[0\].*min_ms"):
        run_pipeline('[[chain]]\nuse = "slow_handshake"\nmin_ms = -1.0\n', [])


def test_the_service_counts_flag_adds_its_sink(tmp_path):
    out = tmp_path / "counts.txt"
    events = [make_event(oldstate="SYN_SENT", newstate="ESTABLISHED", dport=443),
              make_event(oldstate="SYN_SENT", newstate="ESTABLISHED", dport=443),
              make_event(oldstate="SYN_SENT", newstate="ESTABLISHED", dport=22),
              make_event(oldstate="ESTABLISHED", newstate="FIN_WAIT1", dport=22)]
    result = run_pipeline("", events, argv=["--service-counts", str(out)])
    assert out.read_text() == "2 https\n1 ssh\n"
    assert list(result.summary["written"]) == ["memory", "service_counts"]
