"""The collector's connection guard: a header read timeout and a cap on connections per client.

uvicorn closes a connection idle *between* requests (``timeout_keep_alive``) but waits forever for
the head of a request: a client that connects and sends nothing, or one header line a minute, holds
its connection (and a file descriptor) for good, and ~1,000 of them exhaust a default
``LimitNOFILE`` so that nobody else can connect. :func:`guarded_http` returns uvicorn's h11
protocol with two limits added (the choice of uvicorn plus this guard over hypercorn or granian is
explained in docs/collector.md, "Hostile clients"):

- ``header_timeout_s``: a connection whose request head (request line and headers) is not complete
  this long after it opened, or after its previous response, is closed;
- ``max_connections_per_client``: a client address holding that many connections has each further
  one closed at once (0: no cap).

The body has its own deadline (``body_timeout_s``, :class:`~straggler.collector.middleware.LimitAndTime`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass
class GuardStats:
    """What the guard did (read by the collector's /metrics and by tests)."""

    refused_over_cap: int = 0
    header_timeouts: int = 0


def guarded_http(
    *, header_timeout_s: float, max_connections_per_client: int, stats: GuardStats | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol class with the two limits (pass it as ``uvicorn.Config(http=...)``).
    Each call makes a class with its own per-client counts: one per server."""
    per_client: dict[str, int] = {}
    stats = stats if stats is not None else GuardStats()

    class GuardedH11(H11Protocol):
        guard_stats = stats
        _counted: str | None = None
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            ip = self.client[0] if self.client else ""
            if max_connections_per_client and per_client.get(ip, 0) >= max_connections_per_client:
                stats.refused_over_cap += 1
                transport.abort()  # connection_lost follows; nothing was counted for it
                return
            per_client[ip] = per_client.get(ip, 0) + 1
            self._counted = ip
            self._await_head()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            if self._counted is not None:
                left = per_client.get(self._counted, 1) - 1
                if left > 0:
                    per_client[self._counted] = left
                else:
                    per_client.pop(self._counted, None)
                self._counted = None
            super().connection_lost(exc)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's head arrived: the body has its own deadline
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            # armed first: a pipelined request handled inside the call cancels it again
            self._await_head()
            super().on_response_complete()

        def _await_head(self) -> None:
            self._cancel_head_timer()
            if header_timeout_s > 0 and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                stats.header_timeouts += 1
                self.transport.abort()

    return GuardedH11


def uvicorn_config(app, settings, **kw):
    """The uvicorn configuration every collector server uses (the service and
    :class:`~straggler.collector.service.BackgroundCollector`): the guarded protocol, keep-alive
    idle timeout, and the caller's own options (``kw``)."""
    import uvicorn

    stats = GuardStats()
    http = guarded_http(
        header_timeout_s=settings.header_timeout_s,
        max_connections_per_client=settings.max_connections_per_client,
        stats=stats,
    )
    app.state.guard_stats = stats
    return uvicorn.Config(app, http=http, timeout_keep_alive=5, **kw)
