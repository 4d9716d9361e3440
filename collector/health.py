"""The database's health, as ``/healthz`` reports it, and database errors as JSON answers.

At start (in a thread: ``PRAGMA quick_check`` reads the whole file) the collector checks that it can
write its database and that the file passes ``quick_check``; every failed write later (a full disk,
an I/O error, a read-only file) is recorded until a write succeeds again. ``/healthz`` answers 503
naming the problem while one is known, 200 otherwise: a check that has not finished yet is not a
failure. A request that fails on a database error is answered in JSON: 507 when the disk (or the
database) is full, 503 for any other database error, never a bare 500. On PostgreSQL the start check is a write and a
query (the server checks its own pages).
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from fastapi import Request
from fastapi.responses import JSONResponse

log = logging.getLogger("straggler.collector")


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class DbHealth:
    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        self.writable: bool | None = None  # None: not checked yet
        self.quick_check: str | None = None  # "ok", the first problem it found, or None: not finished
        self.write_error: str | None = None  # the latest failed write, until one succeeds

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.check, name="db-check", daemon=True)
        t.start()
        return t

    def check(self) -> None:
        """The start checks: a write, then ``PRAGMA quick_check``."""
        try:
            self.store.probe_write()
            with self._lock:
                self.writable = True
        except self.store.errors as e:
            with self._lock:
                self.writable = False
                self.write_error = _reason(e)
            log.error("database %s cannot be written: %s", self.store.name, e)
        try:
            result = self.store.quick_check()
        except self.store.errors as e:
            result = _reason(e)
        with self._lock:
            self.quick_check = result
        if result != "ok":
            log.error("database %s fails PRAGMA quick_check: %s", self.store.name, result)

    def write_failed(self, e: BaseException) -> None:
        with self._lock:
            self.write_error = _reason(e)

    def write_ok(self) -> None:
        if self.write_error is not None or self.writable is False:
            with self._lock:
                self.write_error, self.writable = None, True

    def problem(self) -> str | None:
        with self._lock:
            if self.write_error is not None:
                return f"database cannot be written: {self.write_error}"
            if self.quick_check not in (None, "ok"):
                return f"database fails PRAGMA quick_check: {self.quick_check}"
        return None

    def report(self) -> dict:
        with self._lock:
            return {
                "path": self.store.name,
                "writable": self.writable,
                "quick_check": self.quick_check,
                "write_error": self.write_error,
            }


def is_full(e: BaseException) -> bool:
    # SQLITE_FULL, or PostgreSQL's disk_full (SQLSTATE 53100)
    return (
        getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or "disk is full" in str(e)
        or getattr(e, "sqlstate", None) == "53100"
    )


def sqlite_error_handler(health: DbHealth):
    """An exception handler: a request that failed on the database answers JSON 507 (full) or 503."""

    def handle(request: Request, exc: Exception) -> JSONResponse:
        health.write_failed(exc)
        log.error("%s %s failed on the database: %s", request.method, request.url.path, exc)
        if is_full(exc):
            return JSONResponse(
                status_code=507,
                content={"detail": f"the collector's database is full ({exc}); nothing of this request was stored"},
            )
        return JSONResponse(
            status_code=503,
            content={"detail": f"the collector's database failed ({exc}); nothing of this request was stored"},
            headers={"Retry-After": "30"},
        )

    return handle
