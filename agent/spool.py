"""The local spool: every result lands in SQLite (WAL) before any upload, keyed by its result id.

Two queues: ``results`` (canonical rows with their ``id``; inserting an id twice is a no-op) and
``statuses`` (scan state reports for the collector, in order). Rows leave the spool only once the
collector has accepted them; a row the collector rejects as invalid moves to ``rejected`` (with the
collector's reason; a cluster scan with rejected rows is reported failed, see agent/uploader.py).
One connection per thread (SQLite connections are not shared across threads).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

from straggler.jsonsafe import json_safe
from straggler.records import result_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (id TEXT PRIMARY KEY, scan_id TEXT, row TEXT NOT NULL, spooled_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS statuses (seq INTEGER PRIMARY KEY AUTOINCREMENT, scan_id TEXT NOT NULL,
                                     body TEXT NOT NULL, spooled_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (id TEXT PRIMARY KEY, row TEXT NOT NULL, reason TEXT, rejected_at REAL);
CREATE TABLE IF NOT EXISTS scans (scan_id TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at REAL NOT NULL);
"""


class Spool:
    def __init__(self, path: str | Path, max_rows: int | None = None, max_bytes: int | None = None) -> None:
        """``max_rows`` / ``max_bytes`` (of the rows' JSON): past either, the oldest results are
        dropped (counted in :attr:`dropped`) so the spool cannot fill the disk while the collector
        is away."""
        self.path = Path(path)
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.dropped = 0  # results dropped by the cap since this spool was opened
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as db:
            db.executescript(SCHEMA)

    def check(self) -> str | None:
        """SQLite's ``PRAGMA quick_check``: None when the file is sound, else what is wrong."""
        rows = [r[0] for r in self._conn().execute("PRAGMA quick_check")]
        return None if rows == ["ok"] else "; ".join(map(str, rows[:3]))

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def add_results(self, rows: Iterable[Mapping], host: str | None = None) -> int:
        """Spool rows (each gets its ``id``); returns how many were new."""
        db = self._conn()
        now = time.time()
        new = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                row = json_safe(row)
                if host:
                    row["host"] = host
                row.pop("id", None)
                row["id"] = result_id(row)
                cur = db.execute(
                    "INSERT OR IGNORE INTO results (id, scan_id, row, spooled_at) VALUES (?, ?, ?, ?)",
                    (row["id"], row.get("scan_id"), json.dumps(row), now),
                )
                new += cur.rowcount
            dropped = self._cap(db)
            db.execute("COMMIT")
            self.dropped += dropped
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back itself (a full disk): keep its error
                db.execute("ROLLBACK")
            raise
        return new

    def _cap(self, db: sqlite3.Connection) -> int:
        """Drop the oldest results past ``max_rows`` / ``max_bytes`` (in the caller's transaction)."""
        if self.max_rows is None and self.max_bytes is None:
            return 0
        count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(row)), 0) FROM results").fetchone()
        over_rows = count - self.max_rows if self.max_rows is not None else 0
        over_bytes = size - self.max_bytes if self.max_bytes is not None else 0
        if over_rows <= 0 and over_bytes <= 0:
            return 0
        drop = []
        for rid, length in db.execute("SELECT id, LENGTH(row) FROM results ORDER BY spooled_at, rowid"):
            if over_rows <= 0 and over_bytes <= 0:
                break
            drop.append((rid,))
            over_rows -= 1
            over_bytes -= length
        db.executemany("DELETE FROM results WHERE id = ?", drop)
        return len(drop)

    def add_status(self, scan_id: str, host: str, state: str, error: str | None = None) -> None:
        body = json.dumps({"host": host, "state": state, "error": error})
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO statuses (scan_id, body, spooled_at) VALUES (?, ?, ?)", (scan_id, body, time.time()))
        db.execute(
            "INSERT INTO scans (scan_id, state, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(scan_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            (scan_id, state, time.time()),
        )
        db.execute("COMMIT")

    def touch(self) -> bool:
        """A small real write (is the spool writable again?); raises sqlite3.Error when not."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('touched_at', ?)", (str(time.time()),))
        db.execute("COMMIT")
        return True

    def scans_in_state(self, state: str) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT scan_id FROM scans WHERE state = ?", (state,))]

    def pending_results(self, limit: int) -> list[dict]:
        rows = self._conn().execute("SELECT row FROM results ORDER BY spooled_at, id LIMIT ?", (limit,))
        return [json.loads(r[0]) for r in rows]

    def pending_statuses(self, limit: int = 100) -> list[tuple[int, str, dict]]:
        rows = self._conn().execute("SELECT seq, scan_id, body FROM statuses ORDER BY seq LIMIT ?", (limit,))
        return [(seq, scan_id, json.loads(body)) for seq, scan_id, body in rows]

    def mark_uploaded(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        db.executemany("DELETE FROM results WHERE id = ?", [(i,) for i in ids])
        db.execute("COMMIT")

    def mark_status_sent(self, seq: int) -> None:
        self._conn().execute("DELETE FROM statuses WHERE seq = ?", (seq,))

    def reject(self, rows: Iterable[Mapping], reason: str) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        for row in rows:
            db.execute(
                "INSERT OR REPLACE INTO rejected (id, row, reason, rejected_at) VALUES (?, ?, ?, ?)",
                (row["id"], json.dumps(row), reason, time.time()),
            )
            db.execute("DELETE FROM results WHERE id = ?", (row["id"],))
        db.execute("COMMIT")

    def rejected_for(self, scan_id: str) -> tuple[int, str | None]:
        """How many of a scan's rows the collector refused, and the reason it gave the first."""
        db = self._conn()
        where = "FROM rejected WHERE json_extract(row, '$.scan_id') = ?"
        n = db.execute(f"SELECT COUNT(*) {where}", (scan_id,)).fetchone()[0]
        first = db.execute(f"SELECT reason {where} ORDER BY rejected_at, id LIMIT 1", (scan_id,)).fetchone()
        return n, first[0] if first else None

    def count(self, table: str = "results") -> int:
        if table not in ("results", "statuses", "rejected"):
            raise ValueError(table)
        return self._conn().execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def open_spool(path: Path, max_rows: int | None = None, max_bytes: int | None = None) -> tuple[Spool, str | None]:
    """The spool at ``path``, and what was done when the file there was corrupt: it is moved aside
    (``<name>.corrupt-<UTC time>``, with its WAL files, kept for inspection) and a new spool started,
    so a broken file is one error line, not an agent that cannot start (a crash loop under systemd).
    Other errors (a directory that cannot be written) raise as before."""
    path = Path(path)
    try:
        spool = Spool(path, max_rows, max_bytes)
        problem = spool.check()
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "malformed" not in str(e):
            raise  # cannot open, locked, read-only: not a broken file
        spool, problem = None, str(e)
    if problem is None:
        return spool, None
    if spool is not None:
        spool.close()
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.replace(aside.with_name(aside.name + suffix))
    return Spool(
        path, max_rows, max_bytes
    ), f"the spool {path} is corrupt ({problem}); moved to {aside}, a new spool started"
