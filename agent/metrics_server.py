"""The agent's /metrics HTTP server: prometheus_client's WSGI app behind a guarded threading server.

``prometheus_client.start_http_server`` starts a thread per connection that waits forever for the
request head: 1,100 connections that send half a request hold 1,100 threads and file descriptors
for good (under a unit's default ``RLIMIT_NOFILE`` of 1024 the agent stops accepting). This server
adds the collector guard's two limits (collector/guard.py, docs/collector.md "Hostile clients"; the
agent cannot import the collector, and the mechanism differs: threads here, asyncio there):

- :data:`HEADER_TIMEOUT_S`: a connection whose request head is not complete this long after it
  opened is closed (a total deadline, not per read, so a client sending a byte at a time is dropped);
- :data:`MAX_CONNECTIONS_PER_CLIENT`: a client address holding that many connections has each
  further one closed at once, before a thread is started for it.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS_PER_CLIENT = 16  # Prometheus scrapes from one address, one connection at a time


class _Handler(WSGIRequestHandler):
    timeout = HEADER_TIMEOUT_S  # per read/write as well (a stalled reader of the response)

    def setup(self) -> None:
        super().setup()
        self._head_timer = threading.Timer(HEADER_TIMEOUT_S, self._head_late)
        self._head_timer.daemon = True
        self._head_timer.start()

    def _head_late(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns; the thread ends
        except OSError:
            pass

    def parse_request(self) -> bool:
        self._head_timer.cancel()  # the head is in: the request is served
        return super().parse_request()

    def finish(self) -> None:
        self._head_timer.cancel()
        super().finish()

    def log_message(self, format, *args) -> None:
        pass


class _GuardedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = socket.SOMAXCONN  # (socketserver's 5 drops a burst of connects for seconds)

    def __init__(self, *args, **kw) -> None:
        self._per_client: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self.refused_over_cap = 0
        super().__init__(*args, **kw)

    def process_request(self, request, client_address) -> None:
        ip = client_address[0]
        with self._count_lock:
            if self._per_client.get(ip, 0) >= MAX_CONNECTIONS_PER_CLIENT:
                self.refused_over_cap += 1
                refused = True
            else:
                self._per_client[ip] = self._per_client.get(ip, 0) + 1
                refused = False
        if refused:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                left = self._per_client.get(client_address[0], 1) - 1
                if left > 0:
                    self._per_client[client_address[0]] = left
                else:
                    self._per_client.pop(client_address[0], None)


def start_metrics_server(port: int, addr: str, registry):
    """Serve ``registry`` at ``addr:port`` from a daemon thread; returns the server (``server_port``,
    ``shutdown()``, ``server_close()``). Raises OSError when the address cannot be bound."""
    from prometheus_client import make_wsgi_app

    infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)

    class Server(_GuardedServer):
        address_family = infos[0][0]

    httpd = make_server(addr, port, make_wsgi_app(registry), Server, handler_class=_Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd
