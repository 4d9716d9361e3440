"""Client side of the quarantine API (``straggler quarantine`` calls these). Imports httpx only when called."""

from __future__ import annotations

from typing import Any

from .client import CollectorError, _call  # noqa: F401 - CollectorError: what these raise


def _client(url: str, token: str | None, timeout_s: float = 60.0):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout_s))


def state(url: str) -> dict:
    """``GET /api/v1/quarantine``: the drained nodes, the circuit breaker, the loop's settings."""
    with _client(url, None) as c:
        return _call(c, "GET", "/api/v1/quarantine")


def history(url: str, host: str, limit: int = 1000) -> dict:
    with _client(url, None) as c:
        return _call(c, "GET", f"/api/v1/quarantine/{host}", params={"limit": limit})


def drain(url: str, token: str, host: str, reason: str, by: str, measured: dict[str, Any] | None = None) -> dict:
    """Drain ``host`` by hand (the circuit breaker does not apply to a drain by hand)."""
    with _client(url, token) as c:
        return _call(
            c,
            "POST",
            "/api/v1/quarantine/drain",
            json={"host": host, "reason": reason, "by": by, "manual": True, "measured": measured},
        )


def request_drain(
    url: str,
    token: str,
    host: str,
    reason: str,
    by: str,
    rule: str = "gate",
    measured: dict[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> dict:
    """What a gate on the node calls instead of draining by itself: the collector drains through its
    action unless the circuit breaker refuses (``action`` ``refused``: leave the node in service)."""
    with _client(url, token, timeout_s) as c:
        return _call(
            c,
            "POST",
            "/api/v1/quarantine/drain",
            json={"host": host, "reason": reason, "by": by, "rule": rule, "measured": measured},
        )


def resume(url: str, token: str, host: str, reason: str, by: str) -> dict:
    with _client(url, token) as c:
        return _call(c, "POST", f"/api/v1/quarantine/{host}/resume", json={"reason": reason, "by": by})


def gpus(url: str, token: str | None = None) -> list[dict]:
    """Every device of ``GET /api/v1/gpus`` (with its ``perf_class``); the token is needed unless the
    collector sets ``open_reads``."""
    with _client(url, token) as c:
        return _call(c, "GET", "/api/v1/gpus")["gpus"]
