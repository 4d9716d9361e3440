"""The quarantine loop's HTTP API (an APIRouter the collector includes). See docs/collector.md "Quarantine".

- ``GET /api/v1/quarantine`` -> the drained nodes, the circuit breaker, the loop's settings;
- ``GET /api/v1/quarantine/events[?host=H&limit=N]`` -> the audit, newest first;
- ``GET /api/v1/quarantine/{host}`` -> one host's state and history;
- ``POST /api/v1/quarantine/drain`` (token) -> drain a host (a gate's or an operator's request);
- ``POST /api/v1/quarantine/{host}/resume`` (token) -> resume it by hand;
- ``POST /api/v1/quarantine/{host}/retest`` (token) -> an agent's retest outcome.
"""

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from .auth import bearer_auth
from .models import Name
from .quarantine import (
    RULE_GATE,
    RULE_MANUAL,
    ActionFailed,
    NotQuarantined,
    Quarantine,
    QuarantineMetrics,
    QuarantineOff,
)

REASON = Annotated[str, Field(min_length=1, max_length=500)]
WHO = Annotated[str | None, Field(default=None, max_length=200)]


class DrainRequest(BaseModel):
    host: Name
    reason: REASON
    rule: Annotated[str, Field(pattern=r"^[a-z_]{1,40}$")] = RULE_GATE
    by: WHO = None
    manual: bool = False  # by hand: the circuit breaker does not apply
    measured: dict[str, Any] | None = None


class ResumeRequest(BaseModel):
    reason: REASON
    by: WHO = None


class RetestReport(BaseModel):
    passed: bool
    reason: REASON
    scan_id: Annotated[str | None, Field(default=None, max_length=200)] = None
    measured: dict[str, Any] | None = None


def quarantine_router(col) -> APIRouter:
    """The router over a running collector ``col`` (collector/app.py ``Collector``): builds its
    :class:`Quarantine`, adds its metrics to the collector's registry and lets every fleet analysis
    drain the hosts it flags."""
    q = Quarantine(col.store, col.settings)
    col.metrics.registry.register(QuarantineMetrics(q))
    published = col.fleet.on_refresh

    def on_refresh(snap) -> None:
        if published is not None:
            published(snap)
        q.from_analysis(snap)

    col.fleet.on_refresh = on_refresh
    auth = bearer_auth(col.secret)
    router = APIRouter(prefix="/api/v1/quarantine", tags=["quarantine"])

    async def call(fn, *args, **kw):
        try:
            return (await run_in_threadpool(fn, *args, **kw)).to_json()
        except QuarantineOff as e:
            raise HTTPException(409, str(e)) from None
        except NotQuarantined as e:
            raise HTTPException(409, str(e)) from None
        except ActionFailed as e:
            raise HTTPException(502, str(e)) from None

    @router.get("")
    def state() -> dict:
        """The nodes drained by straggler, the circuit breaker (``tripped``: a drain was refused
        within ``window_s``), the drain action and the clean retests a resume needs."""
        return q.state()

    @router.get("/events")
    def events(
        host: Annotated[Name | None, Query()] = None, limit: Annotated[int, Query(ge=1, le=100_000)] = 1000
    ) -> dict:
        """The audit, newest first: every drain, retest, resume and refusal."""
        return {"events": q.events(host, limit)}

    @router.get("/{host}")
    def node(host: str, limit: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> dict:
        """One host: its quarantine state (null when straggler never drained it) and its history."""
        return {"host": host, "node": q.node(host), "events": q.events(host, limit)}

    @router.post("/drain", dependencies=auth)
    async def drain(req: DrainRequest) -> dict:
        """Drain a host. ``action`` in the answer: ``drain``, ``refused`` (the circuit breaker; the
        host stays in service) or ``none`` (drained already). 409 when the loop is off, 502 when the
        drain action failed (recorded)."""
        rule = RULE_MANUAL if req.manual else req.rule
        return await call(q.drain, req.host, req.reason, rule, by=req.by, measured=req.measured, manual=req.manual)

    @router.post("/{host}/resume", dependencies=auth)
    async def resume(host: Name, req: ResumeRequest) -> dict:
        """Resume a host by hand (recorded with who and why)."""
        return await call(q.resume, host, req.reason, by=req.by)

    @router.post("/{host}/retest", dependencies=auth)
    async def retest(host: Name, report: RetestReport) -> dict:
        """An agent's retest of its drained host; the N-th consecutive pass resumes it. 409 when the
        host is not drained by straggler."""
        measured = {**(report.measured or {}), "scan_id": report.scan_id}
        return await call(q.retest, host, report.passed, report.reason, measured=measured, by=f"agent {host}")

    router.quarantine = q  # tests and the app reach the loop through here
    return router
