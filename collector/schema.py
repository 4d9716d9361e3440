"""The collector's schema and its migrations, on SQLite (``PRAGMA user_version``) and PostgreSQL
(the table ``straggler_schema``).

Each migration takes the database from version ``i`` to ``i + 1``; :func:`migrate` applies the
missing ones in one transaction, taken before the version is read. Never edit a released migration: append a new one.
Migrations are written once, in SQLite's types and portable SQL (``ON CONFLICT``, no ``rowid``, no
``INSERT OR ...``, an alias on every subquery in FROM); ``collector/db.py`` gives PostgreSQL its
types (REAL is DOUBLE PRECISION there). A PostgreSQL database runs the same chain from version 0.
"""

from __future__ import annotations

from straggler.records import INT_COLUMNS, STRING_COLUMNS

from .db import SQLITE, Dialect, advisory_key


def sql_type(column: str) -> str:
    if column in STRING_COLUMNS:
        return "TEXT"
    return "INTEGER" if column in INT_COLUMNS else "REAL"


def q(name: str) -> str:
    """Quote an identifier (``index`` is an SQL keyword)."""
    return '"' + name.replace('"', '""') + '"'


# The result columns of version 1, as released (records.COLUMNS has grown since: each later
# column comes with a migration of its own).
_V1_COLUMNS = (
    "ts",
    "scan_id",
    "host",
    "gpu",
    "index",
    "model",
    "driver",
    "probe",
    "settings",
    "sample",
    "duration_s",
    "value",
    "unit",
    "sm_clock_mhz",
    "sm_clock_max_mhz",
    "mem_clock_mhz",
    "power_w",
    "power_limit_w",
    "temp_c",
    "throttle_reasons",
    "pcie_gen",
    "pcie_gen_max",
    "pcie_width",
    "pcie_width_max",
    "ecc_corrected_total",
    "ecc_uncorrected_total",
    "retired_pages",
    "remapped_rows",
    "util_pct",
    "processes",
)

# Version 1: the result table, keyed by result id.
_V1 = [
    "CREATE TABLE results (id TEXT PRIMARY KEY, "
    + ", ".join(f"{q(c)} {sql_type(c)}" for c in _V1_COLUMNS)
    + ", received_ts REAL NOT NULL)",
    "CREATE INDEX results_device ON results (host, gpu, ts)",
    "CREATE INDEX results_scan ON results (scan_id)",
]

# Version 2: one row per device (its latest scan, for the fleet view), cluster scans, agents.
_V2 = [
    """CREATE TABLE devices (
        host TEXT NOT NULL, gpu TEXT NOT NULL, "index" INTEGER, model TEXT,
        last_ts REAL, last_scan_id TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (host, gpu))""",
    # backfill from version-1 results: each device's latest row names its latest scan
    """INSERT INTO devices (host, gpu, "index", model, last_ts, last_scan_id)
       SELECT host, gpu, "index", model, ts, COALESCE(scan_id, '') FROM (
         SELECT host, gpu, "index", model, ts, scan_id,
                ROW_NUMBER() OVER (PARTITION BY host, gpu ORDER BY ts DESC, received_ts DESC) AS rn
         FROM results) AS t WHERE rn = 1""",
    """CREATE TABLE scans (
        scan_id TEXT PRIMARY KEY, created_ts REAL NOT NULL, start_at REAL NOT NULL,
        probes TEXT NOT NULL, duration_s REAL NOT NULL, hosts TEXT NOT NULL)""",
    """CREATE TABLE scan_nodes (
        scan_id TEXT NOT NULL REFERENCES scans (scan_id), host TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending', error TEXT, updated_ts REAL,
        PRIMARY KEY (scan_id, host))""",
    "CREATE TABLE agents (host TEXT PRIMARY KEY, last_seen_ts REAL NOT NULL)",
]

# Version 3: the fleet's reads go by index. Each device's scans (for picking its history) and an
# index that finds a device's rows of one scan (the expression matches the queries' join).
_V3 = [
    """CREATE TABLE device_scans (
        host TEXT NOT NULL, gpu TEXT NOT NULL, scan_id TEXT NOT NULL, last_ts REAL,
        PRIMARY KEY (host, gpu, scan_id))""",
    """INSERT INTO device_scans (host, gpu, scan_id, last_ts)
       SELECT host, gpu, COALESCE(scan_id, ''), MAX(ts) FROM results GROUP BY 1, 2, 3""",
    "DROP INDEX results_device",
    "CREATE INDEX results_device ON results (gpu, host, COALESCE(scan_id, ''), ts)",
]

# Version 4: what ingest needs to refuse rows the analysis would refuse. The unit of each probe and
# settings (the analysis refuses a fleet that mixes units; backfilled with one unit of each from the
# results), and one stored row per sample (device, probe, settings, scan, sample number: the analysis
# refuses a sample recorded with two values). Rows stored before version 4 are left out of that
# index (``sample_unique`` NULL), so that the migration cannot fail on what they hold.
_V4 = [
    "ALTER TABLE results ADD COLUMN sample_unique INTEGER",
    """CREATE UNIQUE INDEX results_sample ON results
       (gpu, host, COALESCE(scan_id, ''), probe, COALESCE(settings, ''), COALESCE(sample, -1))
       WHERE sample_unique = 1""",
    """CREATE TABLE probe_units (
        probe TEXT NOT NULL, settings TEXT NOT NULL, unit TEXT NOT NULL, PRIMARY KEY (probe, settings))""",
    """INSERT INTO probe_units (probe, settings, unit)
       SELECT probe, COALESCE(settings, ''), MIN(unit) FROM results
       WHERE probe IS NOT NULL AND unit IS NOT NULL AND unit != '' GROUP BY 1, 2""",
]

# Version 5: the latest scan is kept per device, probe and settings (a scan of one probe no longer
# hides the other probes' verdicts), and so are the scans history is picked from. Backfilled from
# the results; they replace device_scans.
_V5 = [
    """CREATE TABLE probe_scans (
        host TEXT NOT NULL, gpu TEXT NOT NULL, probe TEXT NOT NULL, settings TEXT NOT NULL,
        scan_id TEXT NOT NULL, last_ts REAL, PRIMARY KEY (host, gpu, probe, settings, scan_id))""",
    """INSERT INTO probe_scans (host, gpu, probe, settings, scan_id, last_ts)
       SELECT host, gpu, probe, COALESCE(settings, ''), COALESCE(scan_id, ''), MAX(COALESCE(ts, received_ts))
       FROM results WHERE probe IS NOT NULL GROUP BY 1, 2, 3, 4, 5""",
    """CREATE TABLE latest_scans (
        host TEXT NOT NULL, gpu TEXT NOT NULL, probe TEXT NOT NULL, settings TEXT NOT NULL,
        scan_id TEXT NOT NULL, last_ts REAL, PRIMARY KEY (host, gpu, probe, settings))""",
    """INSERT INTO latest_scans (host, gpu, probe, settings, scan_id, last_ts)
       SELECT host, gpu, probe, settings, scan_id, last_ts FROM (
         SELECT *, ROW_NUMBER() OVER (PARTITION BY host, gpu, probe, settings ORDER BY last_ts DESC) AS rn
         FROM probe_scans) AS t WHERE rn = 1""",
    "DROP TABLE device_scans",
]

# Version 6: the probe-specific measurements (records.PROBE_COLUMNS): the allreduce probe's algorithm
# bandwidth and arrival skew. Rows stored before have them missing (NULL).
_V6 = [f"ALTER TABLE results ADD COLUMN {q(c)} {sql_type(c)}" for c in ("algbw_gbps", "arrival_skew_s")]

# Version 7: the quarantine loop (collector/quarantine.py). One row per host straggler has drained
# (state ``drained``, or ``resumed`` once it came back: the time of its resume keeps an old verdict
# from draining it again), and the audit: every drain, retest, resume and refusal, when, why, by
# which rule and whom, with the measured values as JSON. ``scans``: the host's latest scan ids at its
# last step (JSON list): results of those scans never drain it again.
_V7 = [
    """CREATE TABLE quarantine (
        host TEXT PRIMARY KEY, state TEXT NOT NULL, since_ts REAL NOT NULL, rule TEXT, reason TEXT,
        by TEXT, passes INTEGER NOT NULL DEFAULT 0, updated_ts REAL NOT NULL, scans TEXT)""",
    """CREATE TABLE quarantine_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, host TEXT NOT NULL, action TEXT NOT NULL,
        rule TEXT, reason TEXT, by TEXT, outcome TEXT NOT NULL, measured TEXT)""",
    "CREATE INDEX quarantine_events_host ON quarantine_events (host, ts)",
    "CREATE INDEX quarantine_events_action ON quarantine_events (action, ts)",
]

# Version 8: the scan tables go by index (an agent's long poll looks up its pending nodes; the scan
# list and pruning go by creation time), and a row without a sample number is told apart from the
# device's other rows by its ``ts``, as the analysis tells them apart (it was one row per device,
# probe, settings and scan: every later row without a sample number was dropped as a duplicate).
# The new key is finer than the old one, so the stored rows satisfy it.
_V8 = [
    "CREATE INDEX scan_nodes_host ON scan_nodes (host, state)",
    "CREATE INDEX scans_created ON scans (created_ts)",
    "DROP INDEX results_sample",
    """CREATE UNIQUE INDEX results_sample ON results
       (gpu, host, COALESCE(scan_id, ''), probe, COALESCE(settings, ''), COALESCE(sample, -1),
        COALESCE(CASE WHEN sample IS NULL THEN ts END, -1))
       WHERE sample_unique = 1""",
]

# Version 9: the fleet snapshot the refresh leader published, for the other replicas of a shared
# (PostgreSQL) database to serve (collector/replica.py): one row, its version counted up at each
# publication. Unused on SQLite, where one process is the only mode.
_V9 = [
    """CREATE TABLE fleet_snapshot (
        id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, published_ts REAL NOT NULL,
        publisher TEXT NOT NULL, payload BLOB NOT NULL)""",
]

# Version 10: retention (collector/retention.py) finds the rows received before a time by index. The
# receipt time only grows, so the index takes its inserts at its right edge.
_V10 = ["CREATE INDEX results_received ON results (received_ts)"]

# Version 11: per-scan summaries (issue 13). The fleet view keeps, per device, probe, settings and
# scan, what its analysis reported of the scan while it was the device's latest (``value``: the
# transient-robust estimate, ``median``: the sample median, ``n_samples``), and reads these as the
# history of later refreshes instead of every sample. ``probe_scans.writes`` counts the batches that
# stored rows of the scan; a summary is of the ``writes`` it was computed from, so a scan that took
# rows since (a late upload) is read from its samples again. Scans stored before version 11 have
# ``writes`` 0 and no summary: their samples are read until they leave the history. Summaries outlive
# the raw rows (retention), so a device keeps many scans: the history's reads find each device's
# latest scans by time through an index (probe_scans_recent), not by ranking all of them.
_V11 = [
    "ALTER TABLE probe_scans ADD COLUMN writes INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX probe_scans_recent ON probe_scans (host, gpu, probe, settings, last_ts, scan_id)",
    "CREATE INDEX probe_scans_time ON probe_scans (last_ts)",  # retention's range of old scans
    """CREATE TABLE scan_summaries (
        host TEXT NOT NULL, gpu TEXT NOT NULL, probe TEXT NOT NULL, settings TEXT NOT NULL,
        scan_id TEXT NOT NULL, model TEXT, ts REAL NOT NULL, value REAL NOT NULL, median REAL NOT NULL,
        n_samples INTEGER NOT NULL, writes INTEGER NOT NULL, written_ts REAL NOT NULL,
        PRIMARY KEY (host, gpu, probe, settings, scan_id))""",
    "CREATE INDEX scan_summaries_time ON scan_summaries (ts)",  # retention's range of old summaries
]

# Version 12: what changed since a refresh (issue 13). ``changed`` marks each ``probe_scans`` and
# ``scan_summaries`` row with the change it last took: on SQLite the counter ``fleet_changes.seq``,
# counted up by every write transaction that marks rows (one writer: the marks grow in commit order);
# on PostgreSQL the writing transaction's id, read back from the snapshot's oldest running one
# (collector/history.py). ``epoch`` counts the deletions of history (retention): a reader that saw
# another epoch reads it all again. Rows stored before carry 0.
_V12 = [
    "ALTER TABLE probe_scans ADD COLUMN changed INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX probe_scans_changed ON probe_scans (changed)",
    "ALTER TABLE scan_summaries ADD COLUMN changed INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX scan_summaries_changed ON scan_summaries (changed)",
    """CREATE TABLE fleet_changes (
        id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, epoch INTEGER NOT NULL)""",
    "INSERT INTO fleet_changes (id, seq, epoch) VALUES (1, 0, 0)",
]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    tuple(_V1),
    tuple(_V2),
    tuple(_V3),
    tuple(_V4),
    tuple(_V5),
    tuple(_V6),
    tuple(_V7),
    tuple(_V8),
    tuple(_V9),
    tuple(_V10),
    tuple(_V11),
    tuple(_V12),
)
LATEST = len(MIGRATIONS)


_PG_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS straggler_schema (version BIGINT NOT NULL)"


def version(conn, dialect: Dialect = SQLITE) -> int:
    """The schema version of the database (0: empty)."""
    if dialect is SQLITE:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    if conn.execute("SELECT to_regclass('straggler_schema')").fetchone()[0] is None:
        return 0
    row = conn.execute("SELECT version FROM straggler_schema").fetchone()
    return 0 if row is None else row[0]


def _set_version(conn, dialect: Dialect, v: int) -> None:
    if dialect is SQLITE:
        conn.execute(f"PRAGMA user_version = {int(v)}")
    else:
        conn.execute("DELETE FROM straggler_schema")
        conn.execute("INSERT INTO straggler_schema (version) VALUES (?)", (v,))


def migrate(conn, target: int = LATEST, dialect: Dialect = SQLITE) -> int:
    """Bring the database up to ``target``. Returns the version it started from. A database newer
    than this code is refused (RuntimeError) rather than written to.

    ``conn`` must be in autocommit mode (``isolation_level=None``). The write lock is taken before
    the version is read, so of two collectors starting on one database only one migrates; the other
    waits (SQLite: busy_timeout; PostgreSQL: an advisory lock for the transaction) and then finds
    nothing left to do."""
    conn.execute(dialect.begin_write)
    try:
        if dialect is not SQLITE:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (advisory_key(conn, "migrate"),))
            conn.execute(_PG_VERSION_TABLE)
        start = version(conn, dialect)
        if start > LATEST:
            raise RuntimeError(f"database schema version {start} is newer than this collector ({LATEST})")
        for v in range(start, target):  # one transaction: all the missing migrations, or none
            for stmt in MIGRATIONS[v]:
                conn.execute(dialect.ddl(stmt))
            _set_version(conn, dialect, v + 1)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return start
