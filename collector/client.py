"""Client side of cluster scans: ``straggler scan --collector URL`` calls :func:`cluster_scan`.

Imports httpx (and pandas, for the analysis) only when called.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from straggler.errors import StragglerError
from straggler.scanproto import DEFAULT_START_DELAY_S, FINAL_STATES


class CollectorError(StragglerError):
    """The collector could not be reached, refused the request, or answered nonsense."""


def _call(client, method: str, path: str, **kw) -> Any:
    import httpx

    try:
        resp = client.request(method, path, **kw)
    except httpx.HTTPError as e:
        raise CollectorError(f"cannot reach the collector at {client.base_url}: {e}") from None
    if resp.status_code == 401:
        raise CollectorError(f"the collector at {client.base_url} refused the token (401); check --token-file")
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text[:200]
        raise CollectorError(f"collector: {method} {path}: {resp.status_code} {detail}")
    try:
        return resp.json()
    except ValueError:
        raise CollectorError(f"collector: {method} {path}: the answer is not JSON") from None


def cluster_scan(
    url: str,
    token: str,
    probes: list[str] | tuple[str, ...],
    duration_s: float,
    timeout_s: float,
    on_progress: Callable[[dict], None] | None = None,
    *,
    hosts: list[str] | None = None,
    start_delay_s: float = DEFAULT_START_DELAY_S,
    poll_s: float = 1.0,
) -> dict:
    """Schedule a synchronized scan on the collector at ``url``, follow it until every node has
    finished or ``timeout_s`` passed, and return ``{"scan_id", "state", "timed_out", "nodes",
    "errors", "samples", "analysis"}``. ``analysis`` is ``analyze(samples).to_json()``, or
    ``{"error": ...}`` when the samples cannot be analysed, or None without samples."""
    import httpx

    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30.0)) as client:
        created = _call(
            client,
            "POST",
            "/api/v1/scans",
            json={"probes": list(probes), "duration_s": duration_s, "hosts": hosts, "start_delay_s": start_delay_s},
        )
        scan_id = created["scan_id"]
        while True:
            status = _call(client, "GET", f"/api/v1/scans/{scan_id}")
            if on_progress is not None:
                on_progress(status)
            remaining = deadline - time.monotonic()
            if status["state"] in FINAL_STATES or remaining <= 0:
                break
            time.sleep(min(poll_s, remaining))
        samples = _call(client, "GET", f"/api/v1/scans/{scan_id}/results")["samples"]
    return {
        "scan_id": scan_id,
        "state": status["state"],
        "timed_out": status["state"] not in FINAL_STATES,
        "nodes": status["nodes"],
        "errors": status.get("errors", {}),
        "samples": samples,
        "analysis": _analyze(samples),
    }


def _analyze(samples: list[dict]) -> dict | None:
    if not samples:
        return None
    from straggler.analysis import analyze
    from straggler.records import to_frame

    try:
        return analyze(to_frame(samples)).to_json()
    except StragglerError as e:  # e.g. a single device: the samples are still returned
        return {"error": str(e)}
