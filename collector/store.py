"""SQLite storage for the collector: results keyed by id, devices, cluster scans, agents.

WAL mode, one writer connection behind a lock (SQLite has one writer anyway), one reader
connection per thread. A batch is written with ``executemany`` in one transaction: it is stored
whole or not at all, and replaying it stores nothing twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from straggler.records import COLUMNS, IDENTITY_COLUMNS, MEASUREMENT_COLUMNS

from .schema import migrate, q

RESULT_COLUMNS = ("id",) + COLUMNS
_SELECT_RESULTS = "SELECT " + ", ".join(f"r.{q(c)}" for c in RESULT_COLUMNS) + " FROM results r"
# The analysis compares a device with its own past by value only: history needs no telemetry.
HISTORY_COLUMNS = IDENTITY_COLUMNS + MEASUREMENT_COLUMNS
_SELECT_HISTORY = "SELECT " + ", ".join(f"r.{q(c)}" for c in HISTORY_COLUMNS) + " FROM results r"
_INSERT_RESULT = (
    f"INSERT OR IGNORE INTO results ({', '.join(q(c) for c in RESULT_COLUMNS)}, received_ts) "
    f"VALUES ({', '.join('?' for _ in RESULT_COLUMNS)}, ?)"
)
_UPSERT_DEVICE = """
    INSERT INTO devices (host, gpu, "index", model, last_ts, last_scan_id) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (host, gpu) DO UPDATE SET
        "index" = excluded."index", model = excluded.model,
        last_ts = excluded.last_ts, last_scan_id = excluded.last_scan_id
    WHERE devices.last_ts IS NULL OR excluded.last_ts >= devices.last_ts"""
_UPSERT_DEVICE_SCAN = """
    INSERT INTO device_scans (host, gpu, scan_id, last_ts) VALUES (?, ?, ?, ?)
    ON CONFLICT (host, gpu, scan_id) DO UPDATE SET last_ts = MAX(last_ts, excluded.last_ts)"""


class Store:
    """The collector's database. Thread-safe; ``close()`` when done."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode = WAL")
        self._writer.execute("PRAGMA cache_size = -65536")  # 64 MiB: the id index takes random inserts
        self.migrated_from = migrate(self._writer)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA synchronous = NORMAL")  # durable at each WAL checkpoint; safe in WAL mode
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @property
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._writer.close()

    def _rows(self, sql: str, params: Sequence = ()) -> list[dict]:
        names, rows = self._table(sql, params)
        return [dict(zip(names, row)) for row in rows]

    def _table(self, sql: str, params: Sequence = ()) -> tuple[list[str], list[tuple]]:
        """Column names and row tuples (cheaper than dicts for the fleet's large reads)."""
        cur = self._reader.execute(sql, params)
        return [d[0] for d in cur.description], cur.fetchall()

    # -- results ---------------------------------------------------------------------------

    def ingest(self, rows: Sequence[tuple], received_ts: float, agent: str | None = None) -> tuple[int, int]:
        """Store rows (tuples in ``RESULT_COLUMNS`` order). Returns (accepted, duplicates)."""
        latest: dict[tuple[str, str], tuple] = {}
        scans: dict[tuple[str, str, str], float] = {}
        i_host, i_gpu, i_idx, i_model = (RESULT_COLUMNS.index(c) for c in ("host", "gpu", "index", "model"))
        i_ts, i_scan = RESULT_COLUMNS.index("ts"), RESULT_COLUMNS.index("scan_id")
        for r in rows:
            key = (r[i_host], r[i_gpu])
            ts = r[i_ts] if r[i_ts] is not None else received_ts
            if key not in latest or ts >= latest[key][4]:
                latest[key] = (r[i_host], r[i_gpu], r[i_idx], r[i_model], ts, r[i_scan] or "")
            skey = (r[i_host], r[i_gpu], r[i_scan] or "")
            if ts > scans.get(skey, float("-inf")):
                scans[skey] = ts
        with self._transaction() as conn:
            before = conn.total_changes
            conn.executemany(_INSERT_RESULT, (r + (received_ts,) for r in rows))
            accepted = conn.total_changes - before
            conn.executemany(_UPSERT_DEVICE, latest.values())
            conn.executemany(_UPSERT_DEVICE_SCAN, (k + (ts,) for k, ts in scans.items()))
            if agent is not None:
                self._touch(conn, agent, received_ts)
        return accepted, len(rows) - accepted

    def count_results(self, scan_id: str | None = None) -> int:
        if scan_id is None:
            return self._reader.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        return self._reader.execute("SELECT COUNT(*) FROM results WHERE scan_id = ?", (scan_id,)).fetchone()[0]

    def scan_results(self, scan_id: str) -> list[dict]:
        return self._rows(f"{_SELECT_RESULTS} WHERE r.scan_id = ? ORDER BY r.host, r.gpu, r.probe, r.sample", (scan_id,))

    def history(self, gpu: str, host: str | None = None, limit: int = 1000) -> list[dict]:
        """A device's results, newest first."""
        where, params = "r.gpu = ?", [gpu]
        if host is not None:
            where, params = where + " AND r.host = ?", params + [host]
        return self._rows(f"{_SELECT_RESULTS} WHERE {where} ORDER BY r.ts DESC LIMIT ?", params + [limit])

    def devices(self) -> list[dict]:
        return self._rows('SELECT host, gpu, "index", model, last_ts, last_scan_id FROM devices ORDER BY host, gpu')

    def latest_samples(self) -> tuple[list[str], list[tuple]]:
        """Every row of each device's latest scan: the fleet view's input, as (columns, tuples)."""
        return self._table(
            f"{_SELECT_RESULTS} JOIN devices d ON r.gpu = d.gpu AND r.host = d.host "
            "AND COALESCE(r.scan_id, '') = d.last_scan_id"
        )

    def earlier_samples(self, scans: int) -> tuple[list[str], list[tuple]]:
        """Rows of each device's ``scans`` scans before its latest: the fleet view's history, as
        (``HISTORY_COLUMNS``, tuples)."""
        if scans <= 0:
            return list(HISTORY_COLUMNS), []
        return self._table(
            f"""WITH k AS (
                  SELECT s.host, s.gpu, s.scan_id,
                         ROW_NUMBER() OVER (PARTITION BY s.host, s.gpu ORDER BY s.last_ts DESC) AS rn
                  FROM device_scans s JOIN devices d
                  ON s.host = d.host AND s.gpu = d.gpu AND s.scan_id != d.last_scan_id)
                {_SELECT_HISTORY} JOIN k ON r.gpu = k.gpu AND r.host = k.host
                AND COALESCE(r.scan_id, '') = k.scan_id WHERE k.rn <= ?""",
            (scans,),
        )

    # -- agents and cluster scans ----------------------------------------------------------

    @staticmethod
    def _touch(conn: sqlite3.Connection, host: str, ts: float) -> None:
        conn.execute(
            "INSERT INTO agents (host, last_seen_ts) VALUES (?, ?) "
            "ON CONFLICT (host) DO UPDATE SET last_seen_ts = MAX(last_seen_ts, excluded.last_seen_ts)",
            (host, ts),
        )

    def touch_agent(self, host: str, ts: float) -> None:
        with self._transaction() as conn:
            self._touch(conn, host, ts)

    def agents_seen_since(self, ts: float) -> list[str]:
        cur = self._reader.execute("SELECT host FROM agents WHERE last_seen_ts >= ? ORDER BY host", (ts,))
        return [r[0] for r in cur]

    def create_scan(self, scan: dict) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO scans (scan_id, created_ts, start_at, probes, duration_s, hosts) VALUES (?, ?, ?, ?, ?, ?)",
                (scan["scan_id"], scan["created_ts"], scan["start_at"], json.dumps(scan["probes"]),
                 scan["duration_s"], json.dumps(scan["hosts"])),
            )
            conn.executemany(
                "INSERT INTO scan_nodes (scan_id, host) VALUES (?, ?)", ((scan["scan_id"], h) for h in scan["hosts"])
            )

    def get_scan(self, scan_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM scans WHERE scan_id = ?", (scan_id,))
        if not rows:
            return None
        scan = _decode_scan(rows[0])
        nodes = self._rows("SELECT host, state, error FROM scan_nodes WHERE scan_id = ? ORDER BY host", (scan_id,))
        scan["nodes"] = {n["host"]: n["state"] for n in nodes}
        scan["errors"] = {n["host"]: n["error"] for n in nodes if n["error"]}
        return scan

    def set_node_state(self, scan_id: str, host: str, state: str, error: str | None, ts: float) -> bool:
        """Record a node's state for a scan. False when the host is not part of that scan."""
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE scan_nodes SET state = ?, error = ?, updated_ts = ? WHERE scan_id = ? AND host = ?",
                (state, error, ts, scan_id, host),
            )
            self._touch(conn, host, ts)
            return cur.rowcount == 1

    def next_scan(self, host: str, not_before: float) -> dict | None:
        """The oldest scan for ``host`` it has reported nothing for, starting at or after ``not_before``."""
        rows = self._rows(
            "SELECT s.* FROM scans s JOIN scan_nodes n ON s.scan_id = n.scan_id "
            "WHERE n.host = ? AND n.state = 'pending' AND s.start_at >= ? ORDER BY s.created_ts LIMIT 1",
            (host, not_before),
        )
        return _decode_scan(rows[0]) if rows else None


def _decode_scan(row: dict) -> dict:
    out = dict(row)
    out["probes"] = json.loads(out["probes"])
    out["hosts"] = json.loads(out["hosts"])
    return out


def row_tuples(rows: Iterable[dict]) -> list[tuple]:
    """Dict rows to tuples in ``RESULT_COLUMNS`` order (missing columns are None)."""
    return [tuple(r.get(c) for c in RESULT_COLUMNS) for r in rows]
