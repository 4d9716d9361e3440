"""The collector's storage: results keyed by id, devices, cluster scans, agents.

SQLite (a file; the default) or PostgreSQL (a ``postgresql://`` URL; collector/db.py holds what
differs). One writer connection behind a lock (SQLite has one writer anyway; on PostgreSQL each
replica has its own), one reader connection per thread. A batch is written with ``executemany``
in one transaction: it is stored whole or not at all, and replaying it stores nothing twice, also
when two replicas of one PostgreSQL database receive it at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from straggler.records import COLUMNS, IDENTITY_COLUMNS, MEASUREMENT_COLUMNS
from straggler.scanproto import FINAL_STATES

from . import db
from .schema import migrate, q

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from .history import HistoryCache
    from .latest import LatestSamples

RESULT_COLUMNS = ("id",) + COLUMNS
_SELECT_RESULTS = "SELECT " + ", ".join(f"r.{q(c)}" for c in RESULT_COLUMNS) + " FROM results r"
# The analysis compares a device with its own past by value only: history needs no telemetry.
HISTORY_COLUMNS = IDENTITY_COLUMNS + MEASUREMENT_COLUMNS
_HISTORY_FIELDS = ", ".join(f"r.{q(c)}" for c in HISTORY_COLUMNS)
# A past scan as its per-scan summary: one row, what the analysis needs of it (docs/analysis.md,
# "Per-scan summaries as history"; no unit: the store keeps one per probe and settings).
SUMMARY_COLUMNS = ("ts", "scan_id", "host", "gpu", "model", "probe", "settings", "value", "median")
# ON CONFLICT DO NOTHING without a target: a replayed id and a sample stored already (results_sample)
_INSERT_RESULT = (
    f"INSERT INTO results ({', '.join(q(c) for c in RESULT_COLUMNS)}, received_ts, sample_unique) "
    f"VALUES ({', '.join('?' for _ in RESULT_COLUMNS)}, ?, 1) ON CONFLICT DO NOTHING"
)
_UPSERT_DEVICE = """
    INSERT INTO devices (host, gpu, "index", model, last_ts, last_scan_id) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (host, gpu) DO UPDATE SET
        "index" = excluded."index", model = excluded.model,
        last_ts = excluded.last_ts, last_scan_id = excluded.last_scan_id
    WHERE devices.last_ts IS NULL OR excluded.last_ts >= devices.last_ts"""
_SAMPLE_KEY = ("gpu", "host", "scan_id", "probe", "settings", "sample", "ts")
# A batch row whose sample is stored with another value (the batch's own rows are stored by then).
# `|| ''` and `+ 0` drop the columns' affinity, so that SQLite matches the index expressions.
_SAMPLE_CLASH = """
    SELECT b.i, r.value FROM batch_samples b {join} results r {indexed_by}
    ON r.gpu = b.gpu AND r.host = b.host AND COALESCE(r.scan_id, '') = b.scan_id || '' AND r.probe = b.probe
    AND COALESCE(r.settings, '') = b.settings || '' AND COALESCE(r.sample, -1) = b.sample + 0
    AND COALESCE(CASE WHEN r.sample IS NULL THEN r.ts END, -1) = b.ts + 0
    AND r.sample_unique = 1
    WHERE r.value != b.value ORDER BY b.i DESC LIMIT 1"""
# ``writes`` counts the batches that stored rows of the scan (a per-scan summary is of one count):
# each batch that stored any row adds 1 to every scan it holds rows of (a scan whose rows in it were
# all stored already is then read from its samples again: safe, and rare).
# ``changed``: the change mark (schema V12; collector/history.py reads what changed since a refresh).
_UPSERT_PROBE_SCAN = """
    INSERT INTO probe_scans (host, gpu, probe, settings, scan_id, last_ts, writes, changed)
    VALUES (?, ?, ?, ?, ?, ?, ?, {mark})
    ON CONFLICT (host, gpu, probe, settings, scan_id) DO UPDATE SET last_ts = CASE
        WHEN excluded.last_ts > probe_scans.last_ts THEN excluded.last_ts ELSE probe_scans.last_ts END,
        writes = probe_scans.writes + excluded.writes, changed = excluded.changed"""
# SQLite: the counter each ingest counts up first; PostgreSQL: the writing transaction's id (no row
# every replica's ingest would queue on)
_CHANGE_MARK = {
    "sqlite": "(SELECT seq FROM fleet_changes WHERE id = 1)",
    "postgresql": "pg_current_xact_id()::text::bigint",
}
_COUNT_CHANGE = "UPDATE fleet_changes SET seq = seq + 1 WHERE id = 1"
_UPSERT_LATEST_SCAN = """
    INSERT INTO latest_scans (host, gpu, probe, settings, scan_id, last_ts) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (host, gpu, probe, settings) DO UPDATE SET scan_id = excluded.scan_id, last_ts = excluded.last_ts
    WHERE latest_scans.last_ts IS NULL OR excluded.last_ts >= latest_scans.last_ts"""
# The rows of each device's latest scan of each probe and settings. CROSS JOIN keeps latest_scans
# outside, and `|| ''` drops the column's TEXT affinity, which would keep SQLite from using the index
# expression: each scan's rows are found by all three leading terms of results_device.
_SELECT_LATEST = (
    "SELECT "
    + ", ".join(f"r.{q(c)}" for c in RESULT_COLUMNS)
    + """ FROM latest_scans l {join} results r
    ON r.gpu = l.gpu AND r.host = l.host AND COALESCE(r.scan_id, '') = l.scan_id || ''
    AND r.probe = l.probe AND COALESCE(r.settings, '') = l.settings"""
)


# ``lid`` numbers each device's latest scan of each probe and settings (latest_scans in key order,
# from 0): the summaries' read names a device by it instead of four text columns (_LATEST_KEYS).
_LATEST_NUMBERED = """l AS (SELECT ROW_NUMBER() OVER (ORDER BY host, gpu, probe, settings) - 1 AS lid,
      host, gpu, probe, settings, scan_id FROM latest_scans)"""
_LATEST_KEYS = f"WITH {_LATEST_NUMBERED} SELECT host, gpu, probe, NULLIF(settings, '') AS settings FROM l ORDER BY lid"
# Each device's ``?`` latest scans before its latest (per probe and settings; scans of one time in
# scan_id order, so that every read of one snapshot picks the same ones): for each latest scan,
# a LIMIT on the index by time (probe_scans_recent), so the cost is that of the scans read, not of
# all the scans retention keeps (a year of summaries is thousands a device). SQLite drives the
# lookups from an IN list (CROSS JOIN keeps the latest scans, l, outside); PostgreSQL, which would run such
# a subquery once per candidate row, takes a LATERAL join.
# ``{latest}``: the CTE ``l`` of the latest scans whose history is read (_LATEST_NUMBERED: all).
_PAST_SCANS = {
    "sqlite": """WITH {latest}, k AS (
      SELECT l.lid, s.host, s.gpu, s.probe, s.settings, s.scan_id, s.writes, s.last_ts
      FROM l CROSS JOIN probe_scans s
      ON s.host = l.host AND s.gpu = l.gpu AND s.probe = l.probe AND s.settings = l.settings
      AND s.scan_id IN (SELECT p.scan_id FROM probe_scans p WHERE p.host = l.host AND p.gpu = l.gpu
          AND p.probe = l.probe AND p.settings = l.settings AND p.scan_id != l.scan_id ORDER BY p.last_ts DESC, p.scan_id DESC LIMIT ?))""",
    "postgresql": """WITH {latest}, k AS (
      SELECT l.lid, l.host, l.gpu, l.probe, l.settings, s.scan_id, s.writes, s.last_ts
      FROM l CROSS JOIN LATERAL (
          SELECT p.scan_id, p.writes, p.last_ts FROM probe_scans p WHERE p.host = l.host AND p.gpu = l.gpu
          AND p.probe = l.probe AND p.settings = l.settings AND p.scan_id != l.scan_id ORDER BY p.last_ts DESC, p.scan_id DESC LIMIT ?) AS s)""",
}
# The summary ``m`` of the scan in row ``{t}``, of any writes (collector/history.py reads those too).
_SUMMARY_KEY = """m.host = {t}.host AND m.gpu = {t}.gpu AND m.probe = {t}.probe AND m.settings = {t}.settings
    AND m.scan_id = {t}.scan_id"""
# A summary is current while its scan has taken no batch since it was computed (``writes``).
_SUMMARY_OF_K = _SUMMARY_KEY.format(t="k") + " AND m.writes = k.writes"
# Every past scan in the history: its device's number (``lid``), ts, scan_id, model, value and median,
# ``value`` NULL where the scan has no current summary (its samples are read instead).
_PAST_SUMMARIES = """{past}
    SELECT k.lid, m.ts, NULLIF(k.scan_id, '') AS scan_id, m.model, m.value, m.median
    FROM k LEFT JOIN scan_summaries m ON {summary_of_k}"""
KEYS_PER_READ = 500  # devices or scans named in one statement (SQLite's limit: 32,766 parameters)
PAST_CHUNK_ROWS = 50_000  # summary rows turned into columns at a time (no tuple of them all is kept)
# Each device's latest scans with the summary stored of them (NULLs where none), to write what changed.
CURRENT_COLUMNS = (
    "host",
    "gpu",
    "probe",
    "settings",
    "scan_id",
    "last_ts",
    "writes",
    "value",
    "median",
    "summary_writes",
    "model",
)
_CURRENT_SUMMARIES = """SELECT l.host, l.gpu, l.probe, l.settings, l.scan_id, l.last_ts, s.writes,
           m.value, m.median, m.writes AS summary_writes, m.model
    FROM latest_scans l JOIN probe_scans s
    ON s.host = l.host AND s.gpu = l.gpu AND s.probe = l.probe AND s.settings = l.settings AND s.scan_id = l.scan_id
    LEFT JOIN scan_summaries m
    ON m.host = l.host AND m.gpu = l.gpu AND m.probe = l.probe AND m.settings = l.settings AND m.scan_id = l.scan_id"""
SUMMARY_FIELDS = (
    "host",
    "gpu",
    "probe",
    "settings",
    "scan_id",
    "model",
    "ts",
    "value",
    "median",
    "n_samples",
    "writes",
)
_UPSERT_SUMMARY = f"""
    INSERT INTO scan_summaries ({", ".join(SUMMARY_FIELDS)}, written_ts, changed)
    VALUES ({", ".join("?" for _ in SUMMARY_FIELDS)}, ?, {{mark}})
    ON CONFLICT (host, gpu, probe, settings, scan_id) DO UPDATE SET
        model = excluded.model, ts = excluded.ts, value = excluded.value, median = excluded.median,
        n_samples = excluded.n_samples, writes = excluded.writes, written_ts = excluded.written_ts,
        changed = excluded.changed"""
SUMMARY_CHUNK_ROWS = 5000  # summaries upserted per write transaction (an ingest waits at most one)

# deadlock_detected, serialization_failure: PostgreSQL aborted the transaction; running it again is safe
_RETRY_SQLSTATES = {"40P01", "40001"}


@dataclass(frozen=True)
class FleetInput:
    """What one fleet analysis reads (:meth:`Store.fleet_input`)."""

    devices: list[dict]  # the device table
    latest: pd.DataFrame  # the samples of each device's latest scan (RESULT_COLUMNS)
    history: tuple  # its earlier scans (Store.earlier_scans: PastSummaries, and a table of samples)
    current: dict[str, Sequence]  # its latest scans with the summary stored of them (CURRENT_COLUMNS; NULLs where none)


@dataclass(frozen=True)
class PastSummaries:
    """The per-scan summaries of the history (:meth:`Store.earlier_scans`), column by column:
    ``device[i]`` is row i's device as a number into ``keys`` (host, gpu, probe, settings: None for
    none), ``scan[i]`` its scan as a number into ``scan_ids``, ``model[i]`` into ``models``; ``ts``,
    ``value`` and ``median`` are float arrays. Read without a Python object per row: a year of
    history at fleet scale fits in memory."""

    keys: list[tuple]
    device: np.ndarray
    ts: np.ndarray
    scan: np.ndarray
    scan_ids: list
    model: np.ndarray
    models: list
    value: np.ndarray
    median: np.ndarray

    def __len__(self) -> int:
        return len(self.device)

    def rows(self) -> list[tuple]:
        """The summaries as tuples of SUMMARY_COLUMNS (for a look at a few; the fleet view reads the columns)."""
        return [
            (float(t), self.scan_ids[c], *self.keys[d][:2], self.models[m], *self.keys[d][2:], float(v), float(md))
            for d, t, c, m, v, md in zip(self.device, self.ts, self.scan, self.model, self.value, self.median)
        ]


def _coded(values: Sequence, table: dict) -> list[int]:
    """Numbers for ``values`` from ``table`` (value -> number, extended with the new ones)."""
    return [table.setdefault(v, len(table)) for v in values]


def sample_frame(chunks: Iterable[list[tuple]], columns: Sequence[str]) -> pd.DataFrame:
    """Rows (RESULT_COLUMNS tuples, in chunks: e.g. an iterator of ``fetchmany``) as one DataFrame,
    each chunk turned into columns as it comes (no list of every row's tuple at once); dtypes as one
    ``from_records`` of them all would give (a column empty in one chunk and numbers in another is
    a number column)."""
    import pandas as pd

    parts = [pd.DataFrame.from_records(c, columns=list(columns)) for c in chunks if c]
    if not parts:
        return pd.DataFrame.from_records([], columns=list(columns))
    frame = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    mixed = [c for c in frame.columns if frame[c].dtype == object]
    if mixed and len(parts) > 1:
        frame[mixed] = frame[mixed].infer_objects()
    return frame


class Refused(ValueError):
    """A batch the analysis could not use; the message names the row and field (``results[3].unit: ...``)."""


def _text(v: str | None) -> str | None:
    return v if v else None  # "" is missing, as the analysis reads it


def _nul_field(rows: Sequence[tuple]) -> str | None:
    """``results[i].column`` of the first text holding a NUL character (looked for only once
    PostgreSQL refused a batch: its text type cannot hold one, SQLite's can)."""
    for i, r in enumerate(rows):
        for c, v in zip(RESULT_COLUMNS, r):
            if isinstance(v, str) and "\x00" in v:
                return f"results[{i}].{c}"
    return None


def check_rows(rows: Sequence[tuple]) -> dict[tuple[str, str], tuple[int, str]]:
    """Refuse rows that would make the analysis refuse the fleet; return each (probe, settings)'s
    unit in the batch with the first row giving it. Raises :class:`Refused`."""
    i_scan, i_sample, i_unit, i_probe, i_settings = (
        RESULT_COLUMNS.index(c) for c in ("scan_id", "sample", "unit", "probe", "settings")
    )
    units: dict[tuple[str, str], tuple[int, str]] = {}
    for i, r in enumerate(rows):
        if _text(r[i_scan]) is None and r[i_sample] is not None:
            # every row without a scan id belongs to one scan: sample k of two uploads would be
            # the same sample with two values
            raise Refused(
                f"results[{i}].sample: a row without scan_id must not have a sample number "
                "(give the scan's id, or leave sample null)"
            )
        unit = _text(r[i_unit])
        if unit is None:
            continue
        key = (r[i_probe], r[i_settings] or "")
        first = units.setdefault(key, (i, unit))
        if first[1] != unit:
            raise Refused(
                f"results[{i}].unit: {unit!r}, but results[{first[0]}] gives {first[1]!r} for probe {key[0]} ({key[1]})"
            )
    return units


class Store:
    """The collector's database: an SQLite file (a path) or a PostgreSQL database (a
    ``postgresql://`` URL). Thread-safe; ``close()`` when done."""

    def __init__(self, target: str | Path):
        self.url = target if db.is_url(target) else None
        self.path = None if self.url else Path(target)
        self.dialect = db.dialect_of(target)
        self.errors = db.errors(target)  # what a database operation raises
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list = []
        self._readers_lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        if self.path is not None:
            self._writer.execute("PRAGMA journal_mode = WAL")
            self._writer.execute("PRAGMA cache_size = -65536")  # 64 MiB: the id index takes random inserts
        try:
            self.migrated_from = migrate(self._writer, dialect=self.dialect)
        except BaseException:
            self._writer.close()
            raise
        # PostgreSQL: what replicas of one database tell each other (collector/replica.py); the names
        # are this database's and schema's, so two fleets on one server do not hear each other
        self.channels: dict[str, str] = {}
        if self.url is not None:
            tag = f"{db.advisory_key(self._writer, 'fleet') & 0xFFFFFFFFFFFF:012x}"
            self.channels = {"results": f"straggler_{tag}_results", "snapshot": f"straggler_{tag}_snapshot"}
        self._sql = {
            "latest": _SELECT_LATEST.format(join=self.dialect.ordered_join),
            # the rows of each scan named in a CTE ``k`` (host, gpu, probe, settings, scan_id)
            "scan_rows": f"""{self.dialect.ordered_join} results r
                ON r.gpu = k.gpu AND r.host = k.host AND COALESCE(r.scan_id, '') = k.scan_id || '' AND r.probe = k.probe
                AND COALESCE(r.settings, '') = k.settings""",
            "probe_scan": _UPSERT_PROBE_SCAN.format(mark=_CHANGE_MARK[self.dialect.name]),
            "summary": _UPSERT_SUMMARY.format(mark=_CHANGE_MARK[self.dialect.name]),
            "clash": _SAMPLE_CLASH.format(
                join=self.dialect.ordered_join, indexed_by=self.dialect.indexed_by("results_sample")
            ),
        }

    @property
    def name(self) -> str:
        """The database as logs and ``/healthz`` name it."""
        return db.display(self.url or self.path)

    def _connect(self):
        if self.url is not None:
            return db.connect_pg(self.url)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        # FULL: the WAL is synced at every commit, so an acknowledged batch survives power loss
        # (NORMAL syncs only at checkpoints). benchmarks/collector_sync.py: it adds ~0.25 ms a commit
        # here, under 1 ms for batches up to 100 rows and noise beyond (docs/collector.md, "Durability").
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @property
    def _reader(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _transaction(self) -> Iterator:
        with self._write_lock:
            conn = self._writer
            conn.execute(self.dialect.begin_write)
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # also when COMMIT itself failed (e.g. SQLITE_BUSY, disk full): the transaction is
                # still open, and left open every later BEGIN IMMEDIATE would fail
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _retrying(self, write):
        """``write(conn)`` in a write transaction. On PostgreSQL two replicas writing the same rows
        at once may deadlock; the database aborts one of them, which is then run again (SQLite's
        single writer never deadlocks)."""
        for attempt in range(5):
            try:
                with self._transaction() as conn:
                    return write(conn)
            except self.errors as e:
                if attempt == 4 or getattr(e, "sqlstate", None) not in _RETRY_SQLSTATES:
                    raise
                time.sleep(0.01 * 2**attempt)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Held by one collector of the database at a time (PostgreSQL: a session advisory lock on
        this thread's connection, waited for; SQLite: one process is the only mode, nothing to take)."""
        if self.url is None:
            yield
            return
        conn = self._reader
        key = db.advisory_key(conn, name)
        conn.execute("SELECT pg_advisory_lock(?)", (key,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(?)", (key,))

    @contextmanager
    def _snapshot(self) -> Iterator:
        """One read transaction on this thread's reader: every SELECT in it sees the same state."""
        conn = self._reader
        conn.execute(self.dialect.begin_read)
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def probe_write(self) -> None:
        """A write transaction that changes nothing the collector reads (the database's error
        when it cannot be written)."""
        with self._transaction() as conn:
            if self.path is not None:
                conn.execute(f"PRAGMA user_version = {conn.execute('PRAGMA user_version').fetchone()[0]}")
            else:
                conn.execute("UPDATE straggler_schema SET version = version")

    def quick_check(self) -> str:
        """SQLite: ``PRAGMA quick_check``, "ok" or its first problem (it reads the whole file).
        PostgreSQL checks its own pages: "ok" once a query answers."""
        if self.path is None:
            self._reader.execute("SELECT 1").fetchone()
            return "ok"
        return self._reader.execute("PRAGMA quick_check(1)").fetchone()[0]

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

    def ingest(self, rows: Sequence[tuple], received_ts: float) -> tuple[int, int]:
        """Store rows (tuples in ``RESULT_COLUMNS`` order). Returns (accepted, duplicates). An upload
        does not mark its host as a live agent (only polling for scans and reporting on one do). Raises
        :class:`Refused` (nothing stored) for rows the analysis could not use: see :func:`check_rows`,
        and a unit other than the one stored for the same probe and settings."""
        units = check_rows(rows)
        latest: dict[tuple[str, str], tuple] = {}
        scans: dict[tuple[str, str, str, str, str], float] = {}
        i_host, i_gpu, i_idx, i_model = (RESULT_COLUMNS.index(c) for c in ("host", "gpu", "index", "model"))
        i_ts, i_scan = RESULT_COLUMNS.index("ts"), RESULT_COLUMNS.index("scan_id")
        i_probe, i_settings = RESULT_COLUMNS.index("probe"), RESULT_COLUMNS.index("settings")
        for r in rows:
            key = (r[i_host], r[i_gpu])
            ts = r[i_ts] if r[i_ts] is not None else received_ts
            if key not in latest or ts >= latest[key][4]:
                latest[key] = (r[i_host], r[i_gpu], r[i_idx], r[i_model], ts, r[i_scan] or "")
            skey = (r[i_host], r[i_gpu], r[i_probe], r[i_settings] or "", r[i_scan] or "")
            if ts > scans.get(skey, float("-inf")):
                scans[skey] = ts
        newest: dict[tuple[str, str, str, str], tuple[str, float]] = {}  # of each probe and settings
        for (*pkey, scan), ts in scans.items():
            if tuple(pkey) not in newest or ts >= newest[tuple(pkey)][1]:
                newest[tuple(pkey)] = (scan, ts)
        # sorted: two replicas upserting the same devices lock them in one order (no deadlock)
        devices, probe_scans = sorted(latest.values()), sorted(k + (ts,) for k, ts in scans.items())
        latest_scans = sorted(k + v for k, v in newest.items())

        def write(conn) -> int:
            self._check_units(conn, units)
            accepted = conn.executemany(_INSERT_RESULT, [r + (received_ts,) for r in rows]).rowcount
            if accepted < len(rows):  # replayed ids, or samples stored already (results_sample)
                self._check_samples(conn, rows)
            conn.executemany(_UPSERT_DEVICE, devices)
            self._count_change(conn)
            conn.executemany(self._sql["probe_scan"], [k + (1 if accepted else 0,) for k in probe_scans])
            conn.executemany(_UPSERT_LATEST_SCAN, latest_scans)
            if accepted and self.channels:  # the refresh leader, whichever replica it is (sent at COMMIT)
                conn.execute("SELECT pg_notify(?, '')", (self.channels["results"],))
            return accepted

        try:
            accepted = self._retrying(write)
        except self.errors as e:
            nul = _nul_field(rows) if self.url is not None else None
            if nul is None:
                raise
            raise Refused(f"{nul}: contains a NUL character, which PostgreSQL cannot store") from e
        return accepted, len(rows) - accepted

    @staticmethod
    def _check_units(conn, units: dict[tuple[str, str], tuple[int, str]]) -> None:
        for (probe, settings), (i, unit) in sorted(units.items()):
            # the first unit stored wins, also against another replica's batch committed meanwhile
            conn.execute(
                "INSERT INTO probe_units (probe, settings, unit) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (probe, settings, unit),
            )
            row = conn.execute(
                "SELECT unit FROM probe_units WHERE probe = ? AND settings = ?", (probe, settings)
            ).fetchone()
            if row[0] != unit:
                raise Refused(f"results[{i}].unit: {unit!r}, but probe {probe} ({settings}) is stored in {row[0]!r}")

    def _check_samples(self, conn, rows: Sequence[tuple]) -> None:
        """Refuse a row recording a sample (device, probe, settings, scan, sample number) stored,
        or given earlier in the batch, with another value: the analysis refuses such a fleet. Only
        needed when rows were left out: a row whose sample is stored already is not inserted."""
        idx = [RESULT_COLUMNS.index(c) for c in _SAMPLE_KEY]
        i_value = RESULT_COLUMNS.index("value")
        conn.execute(
            self.dialect.ddl(
                "CREATE TEMP TABLE IF NOT EXISTS batch_samples (i INTEGER, gpu TEXT, host TEXT, "
                "scan_id TEXT, probe TEXT, settings TEXT, sample INTEGER, ts REAL, value REAL)"
            )
        )
        conn.execute("DELETE FROM batch_samples")
        # a row without a sample number is that sample of its ts (as results_sample keys it)
        conn.executemany(
            "INSERT INTO batch_samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    i,
                    r[idx[0]],
                    r[idx[1]],
                    r[idx[2]] or "",
                    r[idx[3]],
                    r[idx[4]] or "",
                    -1 if r[idx[5]] is None else r[idx[5]],
                    -1 if r[idx[5]] is not None or r[idx[6]] is None else r[idx[6]],
                    r[i_value],
                )
                for i, r in enumerate(rows)
            ),
        )
        clash = conn.execute(self._sql["clash"]).fetchone()
        if clash is not None:
            i, stored = clash
            raise Refused(
                f"results[{i}].value: {rows[i][i_value]!r}, but this sample (scan, device, probe, "
                f"settings and sample number) is stored, or given earlier in the batch, as {stored!r}"
            )

    def count_results(self, scan_id: str | None = None) -> int:
        if scan_id is None:
            return self._reader.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        return self._reader.execute("SELECT COUNT(*) FROM results WHERE scan_id = ?", (scan_id,)).fetchone()[0]

    def scan_results(self, scan_id: str) -> list[dict]:
        return self._rows(
            f"{_SELECT_RESULTS} WHERE r.scan_id = ? ORDER BY r.host, r.gpu, r.probe, r.sample", (scan_id,)
        )

    def history(self, gpu: str, host: str | None = None, limit: int = 1000) -> list[dict]:
        """A device's results, newest first."""
        where, params = "r.gpu = ?", [gpu]
        if host is not None:
            where, params = where + " AND r.host = ?", params + [host]
        return self._rows(f"{_SELECT_RESULTS} WHERE {where} ORDER BY r.ts DESC LIMIT ?", params + [limit])

    def devices(self) -> list[dict]:
        return self._rows('SELECT host, gpu, "index", model, last_ts, last_scan_id FROM devices ORDER BY host, gpu')

    def fleet_input(
        self, scans: int, history: HistoryCache | None = None, latest: LatestSamples | None = None
    ) -> FleetInput:
        """The fleet view's input, read in one transaction (an ingest in between cannot move a
        device's current scan into its history). ``history``: the analysis process' copy of the
        history, brought up to date with what changed since its last read, instead of reading it all;
        ``latest``: its copy of the latest samples, which follows ``history``'s read."""
        with self._snapshot():
            if history is None or scans <= 0:
                past = self._earlier_scans(scans)
                cols, rows = self._table(_CURRENT_SUMMARIES)
                current = dict(zip(cols, zip(*rows))) if rows else {c: () for c in CURRENT_COLUMNS}
                samples = None
            else:
                past = history.read(self, scans)
                current = history.current()  # the same scans and summaries, brought up to date by the read
                samples = None if latest is None else latest.read(self, history)
            if samples is None:
                cols, rows = self.latest_samples()
                samples = sample_frame([rows], cols)
            return FleetInput(self.devices(), samples, past, current)

    def latest_samples(self) -> tuple[list[str], list[tuple]]:
        """Every row of each device's latest scan of each probe and settings: the fleet view's
        input, as (columns, tuples)."""
        return self._table(*self.fleet_queries(0)["latest"])

    def earlier_scans(self, scans: int) -> tuple[PastSummaries, tuple[list[str], list[tuple]]]:
        """Each device's ``scans`` scans of each probe and settings before its latest: the per-scan
        summaries (:class:`PastSummaries`, one row each) of the scans with a current one
        (:meth:`write_summaries`), and as (``HISTORY_COLUMNS``, tuples) the samples of the others (a
        scan stored before summaries were kept, or one that took rows since its summary). Read in
        one snapshot (:meth:`fleet_input` holds one; else one is taken here)."""
        with self._snapshot():
            return self._earlier_scans(scans)

    def _earlier_scans(self, scans: int) -> tuple[PastSummaries, tuple[list[str], list[tuple]]]:
        import numpy as np

        keys = self._reader.execute(_LATEST_KEYS).fetchall() if scans > 0 else []
        parts: dict[str, list] = {c: [] for c in ("device", "ts", "scan", "model", "value", "median")}
        scan_ids: dict = {}
        models: dict = {}
        unsummarised = 0
        if scans > 0:
            cur = self._reader.execute(*self.fleet_queries(scans)["summaries"])
            while chunk := cur.fetchmany(PAST_CHUNK_ROWS):
                rows = np.array(chunk, dtype=object)  # lid, ts, scan_id, model, value, median
                v = np.array(rows[:, 4], dtype=float)  # None (no current summary): NaN
                have = ~np.isnan(v)
                unsummarised += int((~have).sum())
                rows = rows[have]
                parts["device"].append(rows[:, 0].astype(np.int64))
                parts["ts"].append(np.array(rows[:, 1], dtype=float))
                parts["scan"].append(np.array(_coded(rows[:, 2], scan_ids), dtype=np.int64))
                parts["model"].append(np.array(_coded(rows[:, 3], models), dtype=np.int64))
                parts["value"].append(v[have])
                parts["median"].append(np.array(rows[:, 5], dtype=float))
        col = {
            c: np.concatenate(p) if p else np.zeros(0, dtype=np.int64 if c in ("device", "scan", "model") else float)
            for c, p in parts.items()
        }
        past = PastSummaries(keys=keys, scan_ids=list(scan_ids), models=list(models), **col)
        samples = self._table(*self.fleet_queries(scans)["samples"]) if unsummarised else None
        return past, samples or (list(HISTORY_COLUMNS), [])

    def scan_samples(
        self, scans: Sequence[tuple], columns: Sequence[str] = HISTORY_COLUMNS
    ) -> tuple[list[str], list[tuple]]:
        """The samples of the named scans ((host, gpu, probe, settings, scan_id) tuples, settings
        and scan_id ``''`` for none) as (``columns``: HISTORY_COLUMNS, or RESULT_COLUMNS, ...; tuples)."""
        rows: list[tuple] = []
        fields = ", ".join(f"r.{q(c)}" for c in columns)
        for i in range(0, len(scans), KEYS_PER_READ):
            chunk = scans[i : i + KEYS_PER_READ]
            named = ", ".join("(?, ?, ?, ?, ?)" for _ in chunk)
            sql = f"""WITH k (host, gpu, probe, settings, scan_id) AS (VALUES {named})
                SELECT {fields} FROM k {self._sql["scan_rows"]}"""
            rows += self._reader.execute(sql, [v for key in chunk for v in key]).fetchall()
        return list(columns), rows

    def earlier_samples(self, scans: int) -> tuple[list[str], list[tuple]]:
        """The samples of each device's ``scans`` scans before its latest (all of them, summarised
        or not), as (``HISTORY_COLUMNS``, tuples)."""
        if scans <= 0:
            return list(HISTORY_COLUMNS), []
        return self._table(*self.fleet_queries(scans)["history"])

    def fleet_queries(self, scans: int) -> dict[str, tuple[str, tuple]]:
        """The fleet view's reads as (SQL, parameters), in this database's dialect: ``latest``
        (:meth:`latest_samples`), ``history`` (:meth:`earlier_samples` of ``scans`` >= 1 scans),
        ``summaries`` and ``samples`` (:meth:`earlier_scans`: the summaries, and the samples of the
        scans without a current summary)."""
        join = self._sql["scan_rows"]
        past = _PAST_SCANS[self.dialect.name].format(latest=_LATEST_NUMBERED)
        history = f"{past} SELECT {_HISTORY_FIELDS} FROM k {join}"
        unsummarised = f"""{past}, n AS (
                SELECT * FROM k WHERE NOT EXISTS (SELECT 1 FROM scan_summaries m WHERE {_SUMMARY_OF_K}))
                SELECT {_HISTORY_FIELDS} FROM n AS k {join}"""
        summaries = _PAST_SUMMARIES.format(past=past, summary_of_k=_SUMMARY_OF_K)
        return {
            "latest": (self._sql["latest"], ()),
            "history": (history, (scans,)),
            "summaries": (summaries, (scans,)),
            "samples": (unsummarised, (scans,)),
        }

    def write_summaries(self, rows: Sequence[tuple], written_ts: float) -> int:
        """Store per-scan summaries (tuples in ``SUMMARY_FIELDS`` order; settings ``''`` for none),
        replacing the one of the same device, probe, settings and scan; in transactions of
        ``SUMMARY_CHUNK_ROWS``, so that an ingest waits at most one of them. Returns the rows written.
        Sorted by key: two replicas writing at once (a leader that lost its lease mid-analysis, and
        the next) lock rows in one order."""
        rows = sorted(rows, key=lambda r: tuple(r[:5]))

        def write(conn, chunk: list[tuple]) -> None:
            self._count_change(conn)  # marked like an ingest's scans: whoever keeps the history reads them
            conn.executemany(self._sql["summary"], chunk)

        for i in range(0, len(rows), SUMMARY_CHUNK_ROWS):
            chunk = [tuple(r) + (written_ts,) for r in rows[i : i + SUMMARY_CHUNK_ROWS]]
            self._retrying(lambda conn, chunk=chunk: write(conn, chunk))
        return len(rows)

    def _count_change(self, conn) -> None:
        """SQLite: count the change mark up for the rows this write transaction marks (PostgreSQL
        marks them with the transaction's id)."""
        if self.url is None:
            conn.execute(_COUNT_CHANGE)

    # -- agents and cluster scans ----------------------------------------------------------

    @staticmethod
    def _touch(conn, host: str, ts: float) -> None:
        conn.execute(
            "INSERT INTO agents (host, last_seen_ts) VALUES (?, ?) ON CONFLICT (host) DO UPDATE SET last_seen_ts = CASE "
            "WHEN excluded.last_seen_ts > agents.last_seen_ts THEN excluded.last_seen_ts ELSE agents.last_seen_ts END",
            (host, ts),
        )

    def touch_agent(self, host: str, ts: float) -> None:
        self.touch_agents({host: ts})

    def touch_agents(self, seen: dict[str, float]) -> None:
        """Mark hosts alive (host: when seen), in one transaction."""

        def write(conn) -> None:
            for host, ts in sorted(seen.items()):
                self._touch(conn, host, ts)

        self._retrying(write)

    def agents_seen_since(self, ts: float) -> list[str]:
        cur = self._reader.execute("SELECT host FROM agents WHERE last_seen_ts >= ? ORDER BY host", (ts,))
        return [r[0] for r in cur]

    def create_scan(self, scan: dict, prune_before: float | None = None) -> None:
        """Store a new scan; scans created before ``prune_before`` go, with their nodes (not their
        results): the tables a poll reads stay the size of the recent scans."""
        with self._transaction() as conn:
            if prune_before is not None:
                old = "SELECT scan_id FROM scans WHERE created_ts < ?"
                conn.execute(f"DELETE FROM scan_nodes WHERE scan_id IN ({old})", (prune_before,))
                conn.execute("DELETE FROM scans WHERE created_ts < ?", (prune_before,))
            conn.execute(
                "INSERT INTO scans (scan_id, created_ts, start_at, probes, duration_s, hosts) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    scan["scan_id"],
                    scan["created_ts"],
                    scan["start_at"],
                    json.dumps(scan["probes"]),
                    scan["duration_s"],
                    json.dumps(scan["hosts"]),
                ),
            )
            conn.executemany(
                "INSERT INTO scan_nodes (scan_id, host) VALUES (?, ?)", ((scan["scan_id"], h) for h in scan["hosts"])
            )

    def get_scan(self, scan_id: str) -> dict | None:
        """A scan with its nodes' states (``nodes``), their errors (``errors``) and its stored
        result count (``results``), or None."""
        scans = self._scans("WHERE scan_id = ?", (scan_id,))
        return scans[0] if scans else None

    def list_scans(self, limit: int) -> list[dict]:
        """The ``limit`` newest scans, newest first, as :meth:`get_scan` gives each."""
        # created at one clock reading: the one created last first (SQLite: by rowid; PostgreSQL has no
        # rowid, and its scan ids, timestamped to the second, go last)
        tie = "rowid" if self.path is not None else "scan_id"
        return self._scans(f"ORDER BY created_ts DESC, {tie} DESC LIMIT ?", (limit,))

    def _scans(self, tail: str, params: Sequence) -> list[dict]:
        # the scans' nodes and counts are selected by the same query as the scans (a subquery, not one
        # SQL variable per scan: older SQLite allows 999)
        chosen = f"SELECT scan_id FROM scans {tail}"
        with self._snapshot():
            scans = [_decode_scan(r) for r in self._rows(f"SELECT * FROM scans {tail}", params)]
            if not scans:
                return []
            nodes = self._rows(
                f"SELECT scan_id, host, state, error FROM scan_nodes WHERE scan_id IN ({chosen}) ORDER BY host", params
            )
            counts = dict(
                self._reader.execute(
                    f"SELECT scan_id, COUNT(*) FROM results WHERE scan_id IN ({chosen}) GROUP BY scan_id", params
                ).fetchall()
            )
        by_scan: dict[str, list[dict]] = {}
        for n in nodes:
            by_scan.setdefault(n["scan_id"], []).append(n)
        for scan in scans:
            mine = by_scan.get(scan["scan_id"], [])
            scan["nodes"] = {n["host"]: n["state"] for n in mine}
            scan["errors"] = {n["host"]: n["error"] for n in mine if n["error"]}
            scan["results"] = counts.get(scan["scan_id"], 0)
        return scans

    def scan_starts(self, scan_ids: Iterable[str]) -> dict[str, float]:
        """The ``start_at`` of each of these cluster scans the collector holds."""
        out = {}
        for scan_id in scan_ids:
            row = self._reader.execute("SELECT start_at FROM scans WHERE scan_id = ?", (scan_id,)).fetchone()
            if row is not None:
                out[scan_id] = row[0]
        return out

    def set_node_state(self, scan_id: str, host: str, state: str, error: str | None, ts: float) -> bool:
        """Record a node's state for a scan. False, and nothing changes (the agent is not marked
        alive either), when the host is not part of that scan or has already finished it: a final
        state is never left."""
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE scan_nodes SET state = ?, error = ?, updated_ts = ? "
                f"WHERE scan_id = ? AND host = ? AND state NOT IN ({', '.join('?' * len(FINAL_STATES))})",
                (state, error, ts, scan_id, host, *FINAL_STATES),
            )
            if cur.rowcount != 1:
                return False
            self._touch(conn, host, ts)
            return True

    def next_scan(self, host: str, not_before: float) -> dict | None:
        """The oldest scan for ``host`` it has reported nothing for, starting at or after ``not_before``."""
        rows = self._rows(
            "SELECT s.* FROM scans s JOIN scan_nodes n ON s.scan_id = n.scan_id "
            "WHERE n.host = ? AND n.state = 'pending' AND s.start_at >= ? ORDER BY s.created_ts LIMIT 1",
            (host, not_before),
        )
        return _decode_scan(rows[0]) if rows else None


def check_postgres(key: str, url: str) -> None:
    """What ``--check`` runs for a ``postgresql://`` database: connect as the start does and read
    its schema version, which must not be newer than this code (the start would refuse it). Never
    migrates: a running older collector may be using the database. A one-line ConfigError."""
    from straggler.errors import ConfigError

    from .schema import LATEST, version

    try:
        conn = db.connect_pg(url)
        try:
            found = version(conn, db.POSTGRES)
        finally:
            conn.close()
    except (ValueError, RuntimeError) + db.errors(url) as e:
        raise ConfigError([f"{key}: {open_problem(url, e)}"]) from None
    if found > LATEST:
        raise ConfigError(
            [f"{key}: {url} cannot be used (database schema version {found} is newer than this program ({LATEST}))"]
        )


def open_problem(target: str | Path, e: BaseException) -> str:
    """One line: why the database at ``target`` could not be opened."""
    if isinstance(e, db.MissingDriver):
        return str(e)
    why = (
        e.strerror
        if isinstance(e, OSError) and e.strerror
        else str(e).strip().splitlines()[0]
        if str(e)
        else type(e).__name__
    )
    kind = "a PostgreSQL" if db.is_url(target) else "an SQLite"
    return f"{target} cannot be opened as {kind} database ({why})"


def _decode_scan(row: dict) -> dict:
    out = dict(row)
    out["probes"] = json.loads(out["probes"])
    out["hosts"] = json.loads(out["hosts"])
    return out


def row_tuples(rows: Iterable[dict]) -> list[tuple]:
    """Dict rows to tuples in ``RESULT_COLUMNS`` order (missing columns are None)."""
    return [tuple(r.get(c) for c in RESULT_COLUMNS) for r in rows]
