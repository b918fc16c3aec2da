"""The real-Fluent-Bit tests' set-up (tests/conftest.py's fluent_bit_binary): a
binary named in $FLUENT_BIT that cannot run fails those tests with one clear
message; it never turns them into skips (which a green run would hide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_one_fluent_bit_test(fluent_bit: str) -> subprocess.CompletedProcess:
    """pytest, as ./test.sh runs it, on the first real-Fluent-Bit test only."""
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rE",
                           "tests/test_fluentbit_examples.py", "-k", "test_config_parses"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLUENT_BIT": fluent_bit})


@pytest.mark.parametrize("make,why", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "fb").write_text("#!/bin/sh\n") and tmp / "fb", "is not an executable file"),
    (lambda tmp: tmp, "is not an executable file"),                   # a directory is "executable"
])
def test_a_named_fluent_bit_that_cannot_run_fails_instead_of_skipping(tmp_path, make, why):
    path = make(tmp_path)
    r = _run_one_fluent_bit_test(str(path))
    out = r.stdout
    assert r.returncode == 1 and "1 error" in out and "skipped" not in out, out
    assert f"FLUENT_BIT={path} {why}: point it at a Fluent Bit binary or unset it" in out, out
