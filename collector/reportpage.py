"""The fleet report for the live fleet (``GET /report``) and each device's history view
(``GET /report/gpu?gpu=UUID&host=H``), behind the read token: the same page as
``straggler analyze --report`` (``straggler.htmlreport``), built from the fleet view's latest
analysis and the stored samples it analysed.

A browser cannot send a bearer header by itself, so these pages also take HTTP Basic
credentials whose password is the token (the browser asks for them on the 401); scripts send
``Authorization: Bearer <token>`` as for the API.
"""

from __future__ import annotations

import base64
import hmac
import threading
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from .fleet import DEVICE_FIELDS, input_frames
from .middleware import bearer_ok
from .models import Name

router = APIRouter(tags=["report"])


def _basic_ok(request: Request, expected: bytes) -> bool:
    scheme, _, cred = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        _, _, password = base64.b64decode(cred.strip(), validate=True).partition(b":")
    except ValueError:
        return False
    return hmac.compare_digest(password, expected)


def read_auth(request: Request) -> None:
    """The read token, as a bearer token or as the password of HTTP Basic credentials; none where the
    collector's config opens the fleet view to reads (``open_reads``, where the collector has it)."""
    col = request.app.state.collector
    if getattr(col.settings, "open_reads", False):
        return
    secret = col.secret.value
    if bearer_ok(request.scope, secret) or _basic_ok(request, secret):
        return
    raise HTTPException(
        401, "missing or wrong token", headers={"WWW-Authenticate": 'Bearer, Basic realm="straggler", charset="UTF-8"'}
    )


def device_link(host: str, gpu: str) -> str:
    """A device's history view, relative to /report (works behind a proxy's path prefix)."""
    return f"report/gpu?gpu={quote(str(gpu), safe='')}&host={quote(str(host), safe='')}"


class _Cache:
    """The last page built, by the analysis it shows (one build at a time)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.key: float | None = None
        self.html = ""


def _fleet_page(request: Request) -> str:
    from straggler.htmlreport import render_report
    from straggler.htmlreport.page import document

    col = request.app.state.collector
    cache = getattr(request.app.state, "report_cache", None)
    if cache is None:
        cache = request.app.state.report_cache = _Cache()
    snap = col.fleet.snapshot
    with cache.lock:
        if cache.key is not None and cache.key == snap.computed_ts:
            return cache.html
        if not any(g.get("probes") for g in snap.gpus):
            why = snap.error or "no analysis yet (no results stored, or the first analysis is running)"
            return document("straggler fleet report", f"<h1>straggler fleet report</h1><p>{why}</p>")
        import pandas as pd

        rows = [{**{f: g.get(f) for f in DEVICE_FIELDS}, **p} for g in snap.gpus for p in g["probes"]]
        devices = pd.DataFrame(rows)
        devices["cost"] = pd.to_numeric(devices["cost"], errors="coerce")
        devices = devices.sort_values(
            ["straggler", "cost"], ascending=[False, False], na_position="last", kind="stable"
        ).reset_index(drop=True)
        read = col.store.fleet_input(col.fleet.history_scans)
        samples, history = input_frames(read.latest, read.history)
        note = f"; analysis error: {snap.error}" if snap.error else ""
        html = render_report(
            devices,
            dict(snap.summary),
            samples,
            history,
            link=device_link,
            generated_ts=snap.verdicts_ts or snap.computed_ts,
            command=f"GET /report on the collector (fleet analysis of the latest scan of each "
            f"device and up to {col.fleet.history_scans} earlier scans){note}",
            source="live fleet from the collector",
        )
        cache.key, cache.html = snap.computed_ts, html
        return html


@router.get("/report", response_class=HTMLResponse, dependencies=[Depends(read_auth)])
async def report(request: Request) -> HTMLResponse:
    """The fleet report (HTML): summary, ratio distributions, node x device heatmap, flagged devices
    with samples, history, telemetry and what to do, each linked to its history view."""
    return HTMLResponse(await run_in_threadpool(_fleet_page, request))


@router.get("/report/gpu", response_class=HTMLResponse, dependencies=[Depends(read_auth)])
def device_report(
    request: Request,
    gpu: Annotated[str, Query(min_length=1, max_length=256)],
    host: Annotated[Name | None, Query()] = None,
) -> HTMLResponse:
    """One device's history view (HTML): its verdict per probe and its stored results over scans."""
    from straggler.htmlreport.device import render

    col = request.app.state.collector
    rows = col.store.history(gpu, host, col.settings.history_limit)
    if not rows:
        raise HTTPException(404, f"no results for device {gpu!r}" + (f" on host {host!r}" if host else ""))
    entry = next((g for g in col.fleet.snapshot.gpus if g["gpu"] == gpu and (host is None or g["host"] == host)), None)
    return HTMLResponse(render(gpu, host or rows[0].get("host"), entry, rows, "../report"))
