"""The exit summary line, parsed exactly as core/pipeline.summary_line prints it:

  tcpstates: E events seen, K kept, written: S1 N1, S2 N2; D dropped, M kernel misses[...]
  [; not written: S1 L1, ...]

so a test can hold every sink's count against what its destination holds.
"""

from __future__ import annotations

import dataclasses
import re

_HEAD = re.compile(r"^tcpstates: (\d+) events seen, (\d+) kept, written: (.*?); (\d+) dropped, "
                   r"(\d+) kernel misses")
_COUNTS = re.compile(r"^([\w.-]+) (\d+)$")


@dataclasses.dataclass
class Summary:
    seen: int
    kept: int
    written: dict[str, int]
    dropped: int
    kernel_misses: int
    not_written: dict[str, int]


def _counts(text: str) -> dict[str, int]:
    if text == "none":
        return {}
    out: dict[str, int] = {}
    for part in text.split(", "):
        m = _COUNTS.match(part)
        assert m, f"not a 'sink count' pair: {part!r} in {text!r}"
        out[m.group(1)] = int(m.group(2))
    return out


def parse_summary(stderr: str) -> Summary:
    """The last summary line in `stderr`; fails the test if there is none."""
    lines = [line for line in stderr.splitlines() if _HEAD.match(line)]
    assert lines, f"no exit summary in stderr:\n{stderr}"
    line = lines[-1]
    m = _HEAD.match(line)
    assert m is not None
    not_written: dict[str, int] = {}
    if "; not written: " in line:
        # always the last part of the line
        not_written = _counts(line.rsplit("; not written: ", 1)[1])
    return Summary(int(m.group(1)), int(m.group(2)), _counts(m.group(3)), int(m.group(4)),
                   int(m.group(5)), not_written)
