"""Running the real CLI as an unprivileged user (nobody), wherever the clone lives.

A clone under /root (mode 0700) and its .venv cannot be reached by nobody, so
the tool is copied, with the libraries it imports, into a world-readable
directory under /tmp, and run with the system's own Python (the venv's python
is that same interpreter). Removed again at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


class NobodyCli:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tcpstates-nobody-", dir="/tmp"))
        self.dir.chmod(0o755)
        ignore = shutil.ignore_patterns("__pycache__")
        pkg = self.dir / "tcpstates"
        shutil.copytree(ROOT / "core", pkg, ignore=ignore)
        shutil.copytree(ROOT / "plugins", pkg / "plugins", ignore=ignore)
        shutil.copytree(ROOT / "bpf", pkg / "bpf", ignore=ignore)
        for name in ("pluggy", "orjson", "msgpack"):
            mod = __import__(name)
            src = Path(mod.__file__).parent
            shutil.copytree(src, self.dir / src.name, ignore=ignore)
        for path in self.dir.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.python = os.path.realpath(sys.executable)

    def run(self, *args: str, cwd: str = "/", env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-m", "tcpstates", *args], capture_output=True, cwd=cwd,
                              user=NOBODY, group=NOBODY, timeout=timeout,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.dir), **(env or {})})

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
