"""The collector's HTTP API (FastAPI). See docs/interfaces.md "Collector HTTP API" and docs/collector.md.

:func:`create_app` builds one running collector's parts (:class:`Collector`: storage, the fleet view,
cluster scans, metrics) and includes one router per area: ingest (collector/ingest_api.py), scans
(scans_api.py), fleet (fleet_api.py over fleetpages.py), quarantine (quarantine_api.py), service
(service_api.py: /metrics, /healthz, /docs) and the report pages (reportpage.py). Nothing starts until
the application's lifespan does (the fleet analysis thread).
"""

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from straggler import __version__

from .fleet import FleetView
from .fleet_api import fleet_api_router
from .fleetpages import FleetPages
from .health import DbHealth, sqlite_error_handler
from .ingest import ClockOffsets
from .ingest_api import ingest_router
from .metrics import FleetCollector, SelfMetrics
from .middleware import LimitAndTime, Secret
from .quarantine_api import quarantine_router
from .replica import ReplicaFleetView
from .reportpage import router as report_router
from .retention import Retention
from .scans import ScanBoard
from .scans_api import scans_router
from .service_api import install_docs, service_router
from .settings import CollectorSettings
from .store import Store


@dataclass
class Collector:
    """Everything one running collector holds (the routers read their parts here)."""

    settings: CollectorSettings
    store: Store
    fleet: FleetView
    board: ScanBoard
    metrics: SelfMetrics
    fleet_metrics: FleetCollector
    secret: Secret
    health: DbHealth
    offsets: ClockOffsets
    clock: Callable[[], float] = time.time


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
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

    fleet = (ReplicaFleetView if store.dialect.shared else FleetView)(
        store,
        analyze,
        debounce_s=settings.analysis_debounce_s,
        max_delay_s=settings.analysis_max_delay_s,
        history_scans=settings.history_scans,
        on_refresh=published,
        worker="process",
    )  # the analysis cannot stall ingest
    board = ScanBoard(
        store,
        agent_seen_s=settings.agent_seen_s,
        offer_grace_s=settings.scan_offer_grace_s,
        run_limit_s=settings.scan_run_limit_s,
        clock=clock,
        retention_s=settings.scan_retention_s,
    )
    secret = Secret(token)
    offsets, health = ClockOffsets(), DbHealth(store)
    metrics.registry.register(offsets)
    col = Collector(settings, store, fleet, board, metrics, fleet_metrics, secret, health, offsets, clock)
    retention = Retention(store, settings.result_retention_s, clock, summary_keep_s=settings.summary_retention_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        health.start()
        fleet.start()
        retention.start()
        try:
            yield
        finally:
            retention.stop()
            fleet.stop()
            board.flush_seen()
            store.close()

    # /docs is rendered from the spec (service_api.install_docs): FastAPI's Swagger UI and ReDoc load from a CDN
    app = FastAPI(
        title="straggler collector",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Fleet service: result ingest, fleet view, cluster scans. Token: `Authorization: Bearer ...`.",
    )
    app.state.collector = col
    app.add_exception_handler(RequestValidationError, _validation_error)
    for error in store.errors:  # JSON 507/503, never a bare 500
        app.add_exception_handler(error, sqlite_error_handler(health))
    # The token is checked by the middleware (before the body is read); each router's dependency
    # (collector/auth.py) checks it again and documents the scheme in the OpenAPI spec.
    app.add_middleware(
        LimitAndTime,
        secret=secret,
        max_bytes=settings.max_request_bytes,
        metrics=metrics,
        open_reads=settings.open_reads,
        body_timeout_s=settings.body_timeout_s,
    )
    app.state.fleet_pages = FleetPages(fleet, clock)
    app.include_router(quarantine_router(col))
    app.include_router(ingest_router(col))
    app.include_router(scans_router(col))
    app.include_router(fleet_api_router(col, app.state.fleet_pages))
    app.include_router(service_router(col))
    app.include_router(report_router)  # /report, /report/gpu: the fleet report (collector/reportpage.py)
    install_docs(app)
    return app
