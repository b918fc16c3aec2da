"""Container name and image from the Docker Engine API, when its socket is there.

A plain HTTP/1.1 GET over the unix socket (no docker SDK): one request per
container id, answers cached (failures too), a short timeout so a hung
daemon cannot stall the pipeline for long. No socket, no noise.
"""

from __future__ import annotations

import http.client
import json
import os
import socket

from tcpstates.plugins.container.metadata import docker_names

DEFAULT_SOCKET = "/var/run/docker.sock"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class DockerNames:
    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 0.5, limit: int = 4096) -> None:
        self.path = path
        self.timeout = timeout
        self.limit = limit
        self.cache: dict[str, dict[str, str] | None] = {}

    def available(self) -> bool:
        return os.path.exists(self.path)

    def lookup(self, container_id: str) -> dict[str, str] | None:
        """{"container_name": ..., "container_image": ...} or None."""
        if container_id in self.cache:
            return self.cache[container_id]
        info: dict[str, str] | None = None
        if self.available():
            try:
                conn = _UnixHTTPConnection(self.path, self.timeout)
                conn.request("GET", f"/containers/{container_id}/json")
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status == 200:
                    info = docker_names(json.loads(body))
            except (OSError, ValueError, http.client.HTTPException):
                info = None
        if len(self.cache) >= self.limit:
            self.cache.clear()
        self.cache[container_id] = info
        return info

