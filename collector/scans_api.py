"""The cluster-scan area of the collector's HTTP API: ``/api/v1/scans...`` (collector/scans.py)."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse, Response

from .auth import bearer_auth
from .fleet import json_safe
from .models import Name, ScanCreated, ScanList, ScanRequest, ScanStatus, ScanView
from .scans import NoHosts
from .settings import scan_problem


def scans_router(col) -> APIRouter:
    """The router over a running collector ``col`` (collector/app.py ``Collector``)."""
    settings, board = col.settings, col.board
    router = APIRouter(prefix="/api/v1/scans", tags=["scans"], dependencies=bearer_auth(col.secret))

    @router.post("", status_code=201, response_model=ScanCreated)
    async def create_scan(req: ScanRequest) -> dict:
        """Schedule a synchronized scan; every node starts its probes at ``start_at``. 422 when it
        could not finish within ``scan_run_limit_s``."""
        too_long = scan_problem(settings, len(req.probes), req.duration_s)
        if too_long:
            raise HTTPException(422, f"duration_s: {too_long}")
        try:
            return await board.create(req.probes, req.duration_s, req.hosts, req.start_delay_s)
        except NoHosts as e:
            raise HTTPException(409, str(e)) from None

    @router.get("", response_model=ScanList)
    def list_scans(limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict:
        """The ``limit`` newest scans, newest first, each as ``GET /api/v1/scans/{scan_id}`` shows it."""
        return {"scans": board.recent(limit)}

    @router.get(
        "/next",
        response_model=None,
        responses={200: {"model": ScanCreated}, 204: {"description": "no scan within wait_s"}},
    )
    async def next_scan(host: Annotated[Name, Query()], wait_s: Annotated[float, Query(ge=0, le=3600)] = 30.0):
        """Long poll: the oldest scan for ``host`` it has not reported on (wait_s is capped at max_wait_s)."""
        scan = await board.next_for(host, min(wait_s, settings.max_wait_s))
        return (
            Response(board.wire(scan), media_type="application/json") if scan is not None else Response(status_code=204)
        )

    def _view(scan_id: str) -> dict:
        view = board.view(scan_id)
        if view is None:
            raise HTTPException(404, f"no scan {scan_id!r}")
        return view

    @router.post("/{scan_id}/status", response_model=ScanView)
    def scan_status(scan_id: str, status: ScanStatus) -> dict:
        """A node reports its state for a scan."""
        before = _view(scan_id)
        if not board.report(scan_id, status.host, status.state, status.error):
            if status.host not in before["nodes"]:
                raise HTTPException(409, f"host {status.host!r} is not part of scan {scan_id!r}")
            current = board.store.get_scan(scan_id)["nodes"][status.host]
            if current != status.state:  # the same final state again is a harmless replay
                raise HTTPException(409, f"host {status.host!r} has already reported {current!r} for scan {scan_id!r}")
        return _view(scan_id)

    @router.get("/{scan_id}", response_model=ScanView)
    def get_scan(scan_id: str) -> dict:
        return _view(scan_id)

    @router.get("/{scan_id}/results")
    def scan_results(scan_id: str) -> JSONResponse:
        """Every result row of a scan (canonical columns plus id)."""
        _view(scan_id)
        return JSONResponse({"scan_id": scan_id, "samples": json_safe(col.store.scan_results(scan_id))})

    return router
