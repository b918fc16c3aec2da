"""The metrics endpoint's HTTP server: a bounded number of clients at a time.

prometheus-client's own `start_http_server` starts one thread per connection
without limit, so anyone who can reach the port could make the tracer start
thousands of threads. Here at most `max_clients` requests are served at once
(more are closed at once and counted), and a client that sends nothing is cut
off after `timeout` seconds.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer


class _QuietHandler(WSGIRequestHandler):
    timeout = 5.0   # a client that stalls mid-request holds its slot at most this long

    def log_message(self, format: str, *args: Any) -> None:
        pass   # a scrape per few seconds must not fill stderr


class BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], max_clients: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _QuietHandler)
        self._slots = threading.BoundedSemaphore(max_clients)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)   # type: ignore[misc]
        finally:
            self._slots.release()


def serve(app: Any, host: str, port: int, max_clients: int) -> tuple[BoundedServer, threading.Thread]:
    server = BoundedServer((host, port), max_clients)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, name="tcpstates-metrics", daemon=True)
    thread.start()
    return server, thread
