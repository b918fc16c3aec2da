"""The metrics endpoint's HTTP server: a bounded number of clients, and a
scrape that cannot be starved.

prometheus-client's own `start_http_server` starts one thread per connection
without limit, so anyone who can reach the port could make the tracer start
thousands of threads. Here at most `max_clients` connections are served at
once. A connection must send its whole request head within `HEAD_TIMEOUT`
(a total, not per read: a client trickling a byte now and then is cut off
all the same). And when all slots are taken, a new connection takes the slot
of the one that has waited longest without sending its request: clients that
connect and stall (any local user can open a few) cannot keep a scraper out,
since the scraper, the newest, sends its request at once.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

HEAD_TIMEOUT = 2.0    # seconds for a whole request line and headers


class _QuietHandler(WSGIRequestHandler):
    timeout = 5.0   # per read/write once the request is in (the response phase)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.request_read(self.request)   # type: ignore[attr-defined]
        return ok

    def log_message(self, format: str, *args: Any) -> None:
        pass   # a scrape per few seconds must not fill stderr


class _Client:
    __slots__ = ("sock", "since", "waiting")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.since = time.monotonic()
        self.waiting = True            # its request head is not in yet


class BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], max_clients: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _QuietHandler)
        self.max_clients = max_clients
        self._clients: dict[int, _Client] = {}
        self._lock = threading.Lock()
        self.refused = 0    # connections closed unserved: refused, displaced or too slow

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._clients) >= self.max_clients and not self._displace_oldest_waiting():
                self.refused += 1
                self.shutdown_request(request)
                return
            self._clients[id(request)] = _Client(request)
        super().process_request(request, client_address)

    def _displace_oldest_waiting(self) -> bool:
        """Cut off the connection that has waited longest for its request
        (its thread ends at once and frees the slot). Displaced connections
        stay counted until their threads have ended, up to twice max_clients
        threads: past that, nobody is displaced and the newcomer is refused."""
        if len(self._clients) >= 2 * self.max_clients:
            return False
        waiting = [c for c in self._clients.values() if c.waiting]
        if not waiting:
            return False         # every slot is answering a request: the newcomer waits its turn elsewhere
        oldest = min(waiting, key=lambda c: c.since)
        self._cut(oldest)
        return True

    def _cut(self, client: _Client) -> None:
        client.waiting = False   # cut once
        self.refused += 1
        try:
            client.sock.shutdown(socket.SHUT_RDWR)   # its blocked read returns at once
        except OSError:
            pass

    def request_read(self, request: Any) -> None:
        with self._lock:
            client = self._clients.get(id(request))
            if client is not None:
                client.waiting = False

    def service_actions(self) -> None:
        """Between accepts (every poll interval): cut off clients whose
        request head has not arrived within HEAD_TIMEOUT."""
        limit = time.monotonic() - HEAD_TIMEOUT
        with self._lock:
            for client in [c for c in self._clients.values() if c.waiting and c.since < limit]:
                self._cut(client)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client gone mid-answer (or cut off above) is its own business: the
        # default prints a traceback to the tracer's stderr (nothing reads a count of them)
        pass

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)   # type: ignore[misc]
        finally:
            with self._lock:
                self._clients.pop(id(request), None)


def serve(app: Any, host: str, port: int, max_clients: int) -> tuple[BoundedServer, threading.Thread]:
    server = BoundedServer((host, port), max_clients)
    server.set_app(app)
    # poll_interval: how often a stalled request head is looked for
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25},
                              name="tcpstates-metrics", daemon=True)
    thread.start()
    return server, thread
