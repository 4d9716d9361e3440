"""The ingest area of the collector's HTTP API: ``POST /api/v1/results``."""

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .auth import bearer_auth
from .ingest import IngestGate, clock_problem, count_rows, scan_ids, sent_ts
from .models import BATCH_ADAPTER, IngestResponse
from .store import Refused, row_tuples


def ingest_router(col) -> APIRouter:
    """The router over a running collector ``col`` (collector/app.py ``Collector``)."""
    settings, store, gate = col.settings, col.store, IngestGate()
    router = APIRouter(tags=["ingest"])

    def store_batch(body: bytes, sent: float | None) -> IngestResponse:
        received = col.clock()
        n = count_rows(body, settings.max_batch_rows)  # before parsing: a parsed batch takes ~10x its bytes
        if n is not None:
            raise HTTPException(413, f"results: {n} rows, more than max_batch_rows={settings.max_batch_rows}")
        try:
            batch = BATCH_ADAPTER.validate_json(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        del body
        if len(batch["results"]) > settings.max_batch_rows:
            raise HTTPException(
                413, f"results: {len(batch['results'])} rows, more than max_batch_rows={settings.max_batch_rows}"
            )
        if sent is not None:
            col.offsets.record(batch["host"], received - sent)
        lie = clock_problem(
            batch["results"], received, settings.max_clock_skew_s, store.scan_starts(scan_ids(batch["results"]))
        )
        if lie:
            raise HTTPException(422, lie)
        try:
            accepted, duplicates = store.ingest(row_tuples(batch["results"]), received)
        except Refused as e:
            raise HTTPException(422, str(e)) from None
        col.health.write_ok()
        col.metrics.results.labels("accepted").inc(accepted)
        col.metrics.results.labels("duplicate").inc(duplicates)
        if accepted:
            col.fleet.notify()
        return IngestResponse(accepted=accepted, duplicates=duplicates)

    @router.post(
        "/api/v1/results",
        response_model=IngestResponse,
        dependencies=bearer_auth(col.secret),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ResultBatch"}}},
            }
        },
    )
    async def ingest(request: Request) -> IngestResponse:
        """Store a batch of results (body: ResultBatch); idempotent by id (a replayed row counts as a
        duplicate). The whole batch is stored, or nothing (422 names the first bad field)."""
        body = await request.body()
        async with gate:
            return await run_in_threadpool(store_batch, body, sent_ts(request.headers))

    return router
