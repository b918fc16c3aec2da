"""Several sinks at once, and hostile command names, on real kernel events."""

from __future__ import annotations

import ctypes
import threading

import orjson
import pytest
from traffic import free_port, parse_csv, refused

pytestmark = pytest.mark.kernel
PR_SET_NAME = 15


def _connect_as(name: bytes, port: int) -> None:
    """A refused connect from a thread whose kernel comm is `name`."""
    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) == 0
        refused(port)
    t = threading.Thread(target=run)
    t.start()
    t.join()


def test_every_event_reaches_every_sink(tracer, tmp_path):
    port = free_port()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[sinks.a]\ntype = "jsonl"\npath = "{a}"\n[sinks.b]\ntype = "jsonl"\npath = "{b}"\n'
                   f'[sinks.table]\ntype = "csv"\npath = "{tmp_path / "t.csv"}"\n')
    t = tracer("--config", str(cfg), "--sink", "a", "--sink", "b", "--sink", "table", "--sink", "text",
               "-D", str(port))
    for _ in range(25):
        refused(port)
    rc, out, err = t.stop()
    assert rc == 0, err
    ra = [orjson.loads(l) for l in a.read_bytes().splitlines()]
    rb = [orjson.loads(l) for l in b.read_bytes().splitlines()]
    rows = parse_csv((tmp_path / "t.csv").read_text())
    assert len(ra) == len(rb) == len(rows) == len(out.splitlines()) - 1 == 50
    assert [r["skaddr"] for r in ra] == [r["skaddr"] for r in rb] == [r["SKADDR"] for r in rows]
    assert "written: a 50, b 50, table 50, text 50" in err


def test_comm_with_comma_newline_and_escape_cannot_break_rows(tracer, tmp_path):
    port = free_port()
    j = tmp_path / "e.jsonl"
    t = tracer("-s", "--sink", "csv", "--sink", "jsonl", "-o", f"sinks.jsonl.path={j}", "-D", str(port))
    _connect_as(b"ev,il\"x", port)
    _connect_as(b"a\nb\x1b[31m", port)
    rc, out, err = t.stop()
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 5                       # header + 4 rows: no forged lines
    assert lines[1].split(",")[2] == '"ev' and '"ev,il""x"' in lines[1]   # RFC 4180 quoting
    assert "a\\x0ab\\x1b[31m" in lines[3] and "\x1b" not in out
    recs = [orjson.loads(l) for l in j.read_bytes().splitlines()]
    # CLOSE->SYN_SENT runs in the connecting thread itself: its comm is certain
    assert [r["comm"] for r in recs if r["newstate"] == "SYN_SENT"] == ['ev,il"x', "a\\x0ab\\x1b[31m"]
