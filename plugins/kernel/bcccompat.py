"""What older bcc releases need from the machine (Ubuntu 22.04 ships bcc 0.18).

bcc before 0.26 reads a tracepoint's format only under /sys/kernel/debug/tracing
(iovisor/bcc#4216 added /sys/kernel/tracing); without it bcc compiles the program
against no tracepoint struct and fails. systemd mounts debugfs there at boot, a
chroot or container may not.
"""

from __future__ import annotations

import re
from pathlib import Path

DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")


def bcc_needs_debugfs(bcc_version: str) -> bool:
    """Whether this bcc finds tracepoint formats only under DEBUGFS_TRACING."""
    m = re.match(r"(\d+)\.(\d+)", bcc_version)
    return m is not None and (int(m.group(1)), int(m.group(2))) < (0, 26)
