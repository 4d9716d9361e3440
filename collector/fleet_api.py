"""The fleet area of the collector's HTTP API: the cached fleet pages (collector/fleetpages.py:
``/api/v1/gpus``, ``/api/v1/stragglers``) and one device's history."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse

from .fleet import json_safe
from .fleetpages import FleetPages, fleet_router
from .models import Name


def fleet_api_router(col, pages: FleetPages) -> APIRouter:
    """The router over a running collector ``col`` (collector/app.py ``Collector``)."""
    router = APIRouter()
    router.include_router(fleet_router(pages))  # tagged "fleet" there

    @router.get("/api/v1/gpus/{uuid}/history", tags=["fleet"])
    def history(
        uuid: str,
        host: Annotated[Name | None, Query()] = None,
        limit: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    ) -> JSONResponse:
        """A device's results, newest first (``host`` tells apart CPU devices such as cpu0)."""
        rows = col.store.history(uuid, host, limit or col.settings.history_limit)
        if not rows:
            raise HTTPException(404, f"no results for device {uuid!r}" + (f" on host {host!r}" if host else ""))
        return JSONResponse({"gpu": uuid, "results": json_safe(rows)})

    return router
