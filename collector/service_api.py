"""The service area of the collector's HTTP API: ``/metrics``, ``/healthz``, the OpenAPI spec and ``/docs``."""

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from straggler import __version__

from .apidocs import render_docs
from .models import ResultBatch


def service_router(col) -> APIRouter:
    """The router over a running collector ``col`` (collector/app.py ``Collector``)."""
    router = APIRouter(tags=["service"])

    @router.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(
            generate_latest(col.metrics.registry) + col.fleet_metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4
        )

    @router.get("/healthz", responses={503: {"description": "the database cannot be written or is corrupt"}})
    def healthz() -> JSONResponse:
        problem = col.health.problem()
        return JSONResponse(
            status_code=503 if problem else 200,
            content={
                "status": "unhealthy" if problem else "ok",
                "problem": problem,
                "version": __version__,
                "analysis_ts": col.fleet.snapshot.computed_ts,
                "analysis_error": col.fleet.snapshot.error,
                "database": col.health.report(),
            },
        )

    return router


def install_docs(app: FastAPI) -> None:
    """The app's OpenAPI spec (with the ingest body's schema, which the route reads raw) and ``/docs``,
    rendered here from the spec: FastAPI's Swagger UI and ReDoc load from a CDN."""

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

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi()))
