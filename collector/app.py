"""The collector's HTTP API (FastAPI). See docs/interfaces.md "Collector HTTP API" and docs/collector.md.

:func:`create_app` wires storage, the fleet view, cluster scans and metrics into one application;
nothing starts until the application's lifespan does (the fleet analysis thread).
"""


import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Callable

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import ValidationError

from straggler import __version__

from .apidocs import render_docs
from .fleet import FleetView, json_safe
from .fleetpages import FleetPages, fleet_router
from .health import DbHealth, sqlite_error_handler
from .metrics import FleetCollector, SelfMetrics
from .ingest import ClockOffsets, IngestGate, clock_problem, count_rows, scan_ids, sent_ts
from .middleware import LimitAndTime, Secret
from .quarantine_api import quarantine_router
from .models import BATCH_ADAPTER, IngestResponse, Name, ResultBatch, ScanCreated, ScanList, ScanRequest, ScanStatus, ScanView
from .replica import ReplicaFleetView
from .reportpage import router as report_router
from .scans import NoHosts, ScanBoard
from .settings import CollectorSettings, scan_problem
from .store import Refused, Store, row_tuples


@dataclass
class Collector:
    """Everything one running collector holds."""

    settings: CollectorSettings
    store: Store
    fleet: FleetView
    board: ScanBoard
    metrics: SelfMetrics
    fleet_metrics: FleetCollector
    secret: Secret


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    first = f"{_loc(tuple(errors[0]['loc']))}: {errors[0]['msg']}" if errors else "invalid request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return JSONResponse(status_code=422, content={"detail": first + more, "errors": errors[:100]})


def create_app(
    settings: CollectorSettings,
    token: str,
    *,
    analyze: Callable | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The application. ``analyze`` replaces ``straggler.analysis.analyze`` (tests isolate it)."""
    store = Store(settings.db_path)
    metrics = SelfMetrics()
    fleet_metrics = FleetCollector(clock)

    def published(snap):
        fleet_metrics.update(snap)
        metrics.analysis_done(snap)

    fleet = (ReplicaFleetView if store.dialect.shared else FleetView)(store, analyze, debounce_s=settings.analysis_debounce_s,
                      max_delay_s=settings.analysis_max_delay_s, history_scans=settings.history_scans,
                      on_refresh=published)
    board = ScanBoard(store, agent_seen_s=settings.agent_seen_s, offer_grace_s=settings.scan_offer_grace_s,
                       run_limit_s=settings.scan_run_limit_s, clock=clock, retention_s=settings.scan_retention_s)
    secret = Secret(token)
    offsets, gate, health = ClockOffsets(), IngestGate(), DbHealth(store)
    metrics.registry.register(offsets)
    col = Collector(settings, store, fleet, board, metrics, fleet_metrics, secret)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        health.start()
        fleet.start()
        try:
            yield
        finally:
            fleet.stop()
            board.flush_seen()
            store.close()

    # /docs is rendered here from the spec: FastAPI's Swagger UI and ReDoc load from a CDN
    app = FastAPI(title="straggler collector", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Fleet service: result ingest, fleet view, cluster scans. Token: `Authorization: Bearer ...`.")
    app.state.collector = col
    app.include_router(quarantine_router(col))
    app.add_exception_handler(RequestValidationError, _validation_error)
    for error in store.errors:  # JSON 507/503, never a bare 500
        app.add_exception_handler(error, sqlite_error_handler(health))
    # The token is checked by the middleware (before the body is read); the dependency below checks
    # it again and documents the scheme in the OpenAPI spec.
    app.add_middleware(LimitAndTime, secret=secret, max_bytes=settings.max_request_bytes, metrics=metrics,
                       open_reads=settings.open_reads, body_timeout_s=settings.body_timeout_s)

    bearer = HTTPBearer(auto_error=False)

    def authorized(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), secret.value):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    def store_batch(body: bytes, sent: float | None) -> IngestResponse:
        received = clock()
        n = count_rows(body, settings.max_batch_rows)  # before parsing: a parsed batch takes ~10x its bytes
        if n is not None:
            raise HTTPException(413, f"results: {n} rows, more than max_batch_rows={settings.max_batch_rows}")
        try:
            batch = BATCH_ADAPTER.validate_json(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        del body
        if len(batch["results"]) > settings.max_batch_rows:
            raise HTTPException(413, f"results: {len(batch['results'])} rows, more than max_batch_rows={settings.max_batch_rows}")
        if sent is not None:
            offsets.record(batch["host"], received - sent)
        lie = clock_problem(batch["results"], received, settings.max_clock_skew_s,
                            store.scan_starts(scan_ids(batch["results"])))
        if lie:
            raise HTTPException(422, lie)
        try:
            accepted, duplicates = store.ingest(row_tuples(batch["results"]), received)
        except Refused as e:
            raise HTTPException(422, str(e)) from None
        health.write_ok()
        metrics.results.labels("accepted").inc(accepted)
        metrics.results.labels("duplicate").inc(duplicates)
        if accepted:
            fleet.notify()
        return IngestResponse(accepted=accepted, duplicates=duplicates)

    @app.post("/api/v1/results", response_model=IngestResponse, dependencies=auth, tags=["ingest"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/ResultBatch"}}}}})
    async def ingest(request: Request) -> IngestResponse:
        """Store a batch of results (body: ResultBatch); idempotent by id (a replayed row counts as a
        duplicate). The whole batch is stored, or nothing (422 names the first bad field)."""
        body = await request.body()
        async with gate:
            return await run_in_threadpool(store_batch, body, sent_ts(request.headers))

    @app.post("/api/v1/scans", status_code=201, response_model=ScanCreated, dependencies=auth, tags=["scans"])
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

    @app.get("/api/v1/scans", response_model=ScanList, dependencies=auth, tags=["scans"])
    def list_scans(limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict:
        """The ``limit`` newest scans, newest first, each as ``GET /api/v1/scans/{scan_id}`` shows it."""
        return {"scans": board.recent(limit)}

    @app.get("/api/v1/scans/next", response_model=None, dependencies=auth, tags=["scans"],
             responses={200: {"model": ScanCreated}, 204: {"description": "no scan within wait_s"}})
    async def next_scan(host: Annotated[Name, Query()], wait_s: Annotated[float, Query(ge=0, le=3600)] = 30.0):
        """Long poll: the oldest scan for ``host`` it has not reported on (wait_s is capped at max_wait_s)."""
        scan = await board.next_for(host, min(wait_s, settings.max_wait_s))
        return Response(board.wire(scan), media_type="application/json") if scan is not None else Response(status_code=204)

    def _view(scan_id: str) -> dict:
        view = board.view(scan_id)
        if view is None:
            raise HTTPException(404, f"no scan {scan_id!r}")
        return view

    @app.post("/api/v1/scans/{scan_id}/status", response_model=ScanView, dependencies=auth, tags=["scans"])
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

    @app.get("/api/v1/scans/{scan_id}", response_model=ScanView, dependencies=auth, tags=["scans"])
    def get_scan(scan_id: str) -> dict:
        return _view(scan_id)

    @app.get("/api/v1/scans/{scan_id}/results", dependencies=auth, tags=["scans"])
    def scan_results(scan_id: str) -> JSONResponse:
        """Every result row of a scan (canonical columns plus id)."""
        _view(scan_id)
        return JSONResponse({"scan_id": scan_id, "samples": json_safe(store.scan_results(scan_id))})

    app.state.fleet_pages = FleetPages(fleet, clock)
    app.include_router(fleet_router(app.state.fleet_pages))  # /api/v1/gpus, /api/v1/stragglers (cached pages)

    @app.get("/api/v1/gpus/{uuid}/history", tags=["fleet"])
    def history(uuid: str, host: Annotated[Name | None, Query()] = None,
                limit: Annotated[int | None, Query(ge=1, le=1_000_000)] = None) -> JSONResponse:
        """A device's results, newest first (``host`` tells apart CPU devices such as cpu0)."""
        rows = store.history(uuid, host, limit or settings.history_limit)
        if not rows:
            raise HTTPException(404, f"no results for device {uuid!r}" + (f" on host {host!r}" if host else ""))
        return JSONResponse({"gpu": uuid, "results": json_safe(rows)})

    @app.get("/metrics", tags=["service"])
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry) + fleet_metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get("/healthz", tags=["service"], responses={503: {"description": "the database cannot be written or is corrupt"}})
    def healthz() -> JSONResponse:
        problem = health.problem()
        return JSONResponse(status_code=503 if problem else 200, content={
            "status": "unhealthy" if problem else "ok", "problem": problem, "version": __version__,
            "analysis_ts": fleet.snapshot.computed_ts, "analysis_error": fleet.snapshot.error,
            "database": health.report()})

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            batch = ResultBatch.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(batch.pop("$defs", {}))
            schemas["ResultBatch"] = batch
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    app.include_router(report_router)  # /report, /report/gpu: the fleet report (collector/reportpage.py)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi()))

    return app

