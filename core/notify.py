"""sd_notify(3) without libsystemd: tell a Type=notify service manager we are tracing.

The socket is connected up front (`Notifier()`), so READY=1 can still be sent
after root has been dropped (--user) even if the notify socket is root-only.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        path = os.environ.get("NOTIFY_SOCKET")
        if not path:
            return
        if path.startswith("@"):
            path = "\0" + path[1:]
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            s.connect(path)
            self.sock = s
        except OSError:
            pass

    def notify(self, state: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.send(state.encode())
            return True
        except OSError:
            return False

