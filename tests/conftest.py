"""Shared fixtures. Kernel tests (marked `kernel`) need root and run serially:
the tracepoint is global, so each test filters on ports it chose itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "helpers"))

# The CLI runs in subprocesses as a user's shell starts it: with Python's own
# buffering of stdout/stderr. A developer's PYTHONUNBUFFERED (set on this
# project's machines) hid that a failed flush at exit turned the exit status
# into 120; CI's clean environment has no such variable.
os.environ.pop("PYTHONUNBUFFERED", None)

from tracer import Tracer  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: drives the real tracepoint (CI runs as root)")
    for item in items:
        if "kernel" in item.keywords or "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tracer(tmp_path: Path):
    """Start the real CLI in a subprocess; every tracer is stopped at the end."""
    started: list[Tracer] = []

    def start(*args: str, **kw) -> Tracer:
        t = Tracer(list(args), workdir=tmp_path / f"tracer{len(started)}", **kw)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


@pytest.fixture
def fixtures_dir() -> Path:
    return TESTS / "fixtures"


@pytest.fixture
def fluent_bit(tmp_path: Path):
    """Start real Fluent Bits (tests/helpers/fluentbit.py); every one is killed at the end."""
    from fluentbit import FluentBit
    started: list[FluentBit] = []

    def start(config: str, name: str = "fb", **kw) -> FluentBit:
        fb = FluentBit(config, tmp_path / name, **kw)
        started.append(fb)
        return fb

    yield start
    for fb in started:
        fb.kill()


@pytest.fixture
def fluent_bit_binary() -> str:
    """The real Fluent Bit's path (tests/helpers/fbcase.py's needs_fluent_bit).
    $FLUENT_BIT set to something that cannot run: the test fails (an explicitly
    named binary is not optional). Skipped only without any binary, or with one
    this OS's C library is too old for."""
    from fluentbit import binary, cannot_run, unusable
    problem = unusable()
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    path = binary()
    if path is None:
        pytest.skip("no Fluent Bit: set FLUENT_BIT or put it in ../shared/tools/fluent-bit/")
    reason = cannot_run()
    if reason is not None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def as_nobody():
    """Run the real CLI as uid 65534 (needs root to switch): `as_nobody(*args, env=...)`."""
    from nobody import NobodyCli
    cli = NobodyCli()
    yield cli.run
    cli.remove()


@pytest.fixture
def io_tracefs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tracefs holding only sock:sock_send_length/sock_recv_length's format
    files (sk at 16, family at 24, protocol at 26), made the owner's: its
    feature detection then runs the same on any kernel (a unit-test stand-in;
    the real tracepoints are attached in test_owner_designs.py)."""
    from tcpstates.plugins.owner import kernel
    root = tmp_path / "tracefs"
    for name in ("sock_send_length", "sock_recv_length"):
        d = root / "events" / "sock" / name
        d.mkdir(parents=True)
        (d / "format").write_text("\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
                                  "\tfield:void * sk;\toffset:16;\tsize:8;\tsigned:0;\n"
                                  "\tfield:__u16 family;\toffset:24;\tsize:2;\tsigned:0;\n"
                                  "\tfield:__u16 protocol;\toffset:26;\tsize:2;\tsigned:0;\n")
    monkeypatch.setattr(kernel, "TRACEFS", (str(root),))
    return root
