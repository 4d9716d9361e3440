"""The fleet view's read endpoints, served from a cached, already-serialized page.

``GET /api/v1/gpus`` and ``GET /api/v1/stragglers`` of a 20,000-GPU fleet are tens of megabytes of
JSON. Serialized on every request, six readers polling them took the CPU that ingest needs. Here each
page is serialized (and gzipped) once per fleet snapshot, and again for the probe ages it carries
at most every :data:`REBUILD_S`, or every ``1 / MAX_BUILD_SHARE`` times its last build's duration
where that is longer (a build holds the GIL: at 100,000 GPUs it took seconds, and rebuilt every 5 s
for readers polling back to back it stalled uploads up to 12.6 s, where the agent's timeout is 10 s); every reader in between gets the same bytes, with
a weak ``ETag`` per snapshot (``If-None-Match`` answers 304 until the next analysis: a page rebuilt
only for its probe ages is the same fleet view) and gzip when the client accepts it. One build runs at a
time: readers arriving meanwhile wait for it rather than build their own.

``?host=`` and ``?verdict=`` filter the snapshot's devices before anything is serialized, and
``?limit=`` / ``?offset=`` page them (``total`` counts the matching devices); only the unfiltered,
unpaged pages are cached.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Sequence

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from straggler.analysis.tiers import TIERS

from .fleet import FleetSnapshot, FleetView, json_safe
from .models import Name

REBUILD_S = 5.0  # the probe ages in a cached page are at most this old (or page_max_age_s)
MAX_BUILD_SHARE = 0.1  # rebuilds for the probe ages take at most this share of the collector's time
GZIP_LEVEL = 1  # fast: the page is rebuilt often, and JSON compresses ~10x even so
Verdict = Literal[TIERS]  # type: ignore[valid-type]


Host = Annotated[Optional[Name], Query(description="only this host's devices")]
Tier = Annotated[Optional[Verdict], Query(description="only devices with this verdict")]
Limit = Annotated[Optional[int], Query(ge=1, le=1_000_000, description="at most this many devices")]
Offset = Annotated[int, Query(ge=0, description="skip this many matching devices first")]


@dataclass(frozen=True)
class Page:
    snapshot: FleetSnapshot
    built_ts: float  # collector clock
    built_mono: float
    body: bytes
    gzipped: bytes
    etag: str
    build_s: float = 0.0  # how long serializing and gzipping it took

    @property
    def max_age_s(self) -> float:
        """How old the page's probe ages may get before it is rebuilt for them."""
        return max(REBUILD_S, self.build_s / MAX_BUILD_SHARE)


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class FleetPages:
    """The cached pages of one collector (thread-safe: the read routes run in worker threads)."""

    def __init__(self, fleet: FleetView, clock: Callable[[], float] = time.time):
        self.fleet = fleet
        self.clock = clock
        self._lock = threading.Lock()
        self._pages: dict[str, Page] = {}
        self._builds = 0
        self._snap: FleetSnapshot | None = None  # the snapshot the pages were last built from
        self._snap_seq = 0  # counts snapshots: the ETag names the one a page shows

    @staticmethod
    def devices(snap: FleetSnapshot, kind: str) -> Sequence[Mapping]:
        return snap.gpus if kind == "gpus" else snap.stragglers()

    def document(self, snap: FleetSnapshot, gpus: Sequence[Mapping], total: int, now: float) -> dict:
        return {
            "computed_ts": snap.computed_ts,
            "error": snap.error,
            "verdicts_ts": snap.verdicts_ts,
            "summary": json_safe(dict(snap.summary)),
            "total": total,
            "gpus": [
                {**g, "last_probe_age_s": None if g["last_ts"] is None else max(0.0, now - g["last_ts"])} for g in gpus
            ],
        }

    def page(self, kind: str) -> Page:
        """The cached page of ``kind`` ("gpus" or "stragglers"), rebuilt when the snapshot changed
        or the page is :attr:`Page.max_age_s` old."""
        with self._lock:
            snap = self.fleet.snapshot
            page = self._pages.get(kind)
            if page is not None and page.snapshot is snap and time.monotonic() - page.built_mono < page.max_age_s:
                return page
            if snap is not self._snap:
                self._snap, self._snap_seq = snap, self._snap_seq + 1
            now, t0 = self.clock(), time.monotonic()
            devices = self.devices(snap, kind)
            body = _dumps(self.document(snap, devices, len(devices), now))
            gzipped = gzip.compress(body, GZIP_LEVEL)
            self._builds += 1
            built = time.monotonic()
            page = Page(snap, now, built, body, gzipped, f'W/"{kind}-{self._snap_seq}"', built - t0)
            self._pages[kind] = page
            return page

    @property
    def builds(self) -> int:
        return self._builds


def _accepts_gzip(request: Request) -> bool:
    return any(part.split(";")[0].strip() == "gzip" for part in request.headers.get("accept-encoding", "").split(","))


def _etag_matches(request: Request, etag: str) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 13.1.2): W/"x" and "x" match."""
    tags = [t.strip().removeprefix("W/") for t in request.headers.get("if-none-match", "").split(",")]
    return etag.removeprefix("W/") in tags or "*" in tags


def fleet_router(pages: FleetPages) -> APIRouter:
    """``GET /api/v1/gpus`` and ``GET /api/v1/stragglers``."""
    router = APIRouter(tags=["fleet"])

    def serve(
        request: Request, kind: str, host: str | None, verdict: str | None, limit: int | None, offset: int
    ) -> Response:
        if host is None and verdict is None and limit is None and offset == 0:
            page = pages.page(kind)
            headers = {"ETag": page.etag, "Vary": "Accept-Encoding", "Cache-Control": "no-cache"}
            if _etag_matches(request, page.etag):
                return Response(status_code=304, headers=headers)
            if _accepts_gzip(request):
                return Response(
                    page.gzipped, media_type="application/json", headers={**headers, "Content-Encoding": "gzip"}
                )
            return Response(page.body, media_type="application/json", headers=headers)
        snap, now = pages.fleet.snapshot, pages.clock()
        chosen = [
            g
            for g in pages.devices(snap, kind)
            if (host is None or g["host"] == host) and (verdict is None or g.get("verdict") == verdict)
        ]
        shown = chosen[offset:] if limit is None else chosen[offset : offset + limit]
        return Response(_dumps(pages.document(snap, shown, len(chosen), now)), media_type="application/json")

    @router.get("/api/v1/gpus")
    def gpus(
        request: Request, host: Host = None, verdict: Tier = None, limit: Limit = None, offset: Offset = 0
    ) -> Response:
        """Every device with its latest verdict per probe (``total``: the matching devices)."""
        return serve(request, "gpus", host, verdict, limit, offset)

    @router.get("/api/v1/stragglers")
    def stragglers(
        request: Request, host: Host = None, verdict: Tier = None, limit: Limit = None, offset: Offset = 0
    ) -> Response:
        """Flagged devices, costliest first."""
        return serve(request, "stragglers", host, verdict, limit, offset)

    return router
