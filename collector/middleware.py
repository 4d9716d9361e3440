"""A pure ASGI middleware: bearer token (401), request size limit (413), timing by route template.

The token is checked first, before any of the body is read: an unauthenticated client learns
nothing about validation and cannot make the service buffer a large body. Then the body is read
(at most ``max_bytes``) before the application sees it, so an oversized request is refused whole,
whether it announces its length or streams chunks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from .metrics import SelfMetrics

INGEST_PATH = "/api/v1/results"
PROTECTED_PREFIXES = (INGEST_PATH, "/api/v1/scans")  # always need the token
# the fleet view: its GETs need the token too, unless open_reads (other routers check their own)
OPEN_READ_PREFIXES = ("/api/v1/gpus", "/api/v1/stragglers")
READ_TOKEN_HINT = (
    "missing or wrong bearer token (the fleet view needs it too; set open_reads = true "
    "in the collector's config for an open read-only view)"
)


class Secret:
    """The current bearer token; ``set()`` replaces it (SIGHUP re-reads the token file)."""

    def __init__(self, token: str):
        self.set(token)

    def set(self, token: str) -> None:
        self.value = token.encode()


def bearer_ok(scope, expected: bytes) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>``."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, cred = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(cred.strip(), expected)
    return False


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class LimitAndTime:
    def __init__(
        self,
        app,
        *,
        secret: Secret,
        max_bytes: int,
        metrics: SelfMetrics,
        open_reads: bool = False,
        body_timeout_s: float = 0.0,
    ):
        self.app = app
        self.secret = secret
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.open_reads = open_reads
        self.body_timeout_s = body_timeout_s

    def _needs_token(self, scope) -> bool:
        path = scope["path"]
        if path.startswith(PROTECTED_PREFIXES):
            return True
        return path.startswith(OPEN_READ_PREFIXES) and not (self.open_reads and scope.get("method") in ("GET", "HEAD"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self._needs_token(scope) and not bearer_ok(scope, self.secret.value):
                status["code"] = 401
                read = scope.get("method") in ("GET", "HEAD") and scope["path"].startswith(OPEN_READ_PREFIXES)
                await _send_json(
                    send,
                    401,
                    {"detail": READ_TOKEN_HINT if read else "missing or wrong bearer token"},
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            try:
                body = await self._read_body_in_time(scope, receive)
            except TimeoutError:
                status["code"] = 408
                await _send_json(
                    send,
                    408,
                    {"detail": f"request body not received within body_timeout_s={self.body_timeout_s:g} s"},
                    [(b"connection", b"close")],
                )
                return
            if body is None:
                status["code"] = 413
                await _send_json(send, 413, {"detail": f"request body larger than {self.max_bytes} bytes"})
                return
            delivered = False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: wait for the disconnect

            await self.app(scope, replay, send_wrapper)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(handler).observe(time.perf_counter() - t0)
            if scope.get("path") == INGEST_PATH and scope.get("method") == "POST":
                self.metrics.ingest_requests.labels(str(status["code"])).inc()

    async def _read_body_in_time(self, scope, receive) -> bytes | None:
        """:meth:`_read_body` within ``body_timeout_s`` (TimeoutError): a client that sends its
        headers and then trickles or withholds its body does not hold a request forever."""
        if self.body_timeout_s <= 0:
            return await self._read_body(scope, receive)
        return await asyncio.wait_for(self._read_body(scope, receive), self.body_timeout_s)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is over the limit."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        return None
                except ValueError:
                    pass  # the server rejects a malformed length itself
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
