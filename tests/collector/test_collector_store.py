"""The collector's SQLite store (real files): WAL, idempotent batches, migrations, the fleet query,
and the fleet view over the real analysis engine."""

import re
import sqlite3
import threading
import time

import pytest

from straggler.collector import schema
from prometheus_client import CollectorRegistry

from straggler.collector.fleet import FleetView
from straggler.collector.metrics import FleetCollector, SelfMetrics, cause_label
from straggler.collector.store import RESULT_COLUMNS, Refused, Store, row_tuples
from straggler.records import result_id
from test_collector_api import make_rows
from postgres import db_url, pg_server  # noqa: F401 (fixtures: the tests taking db_url run on SQLite and PostgreSQL)


def insert_old(conn, rows):
    """Insert rows into a database migrated to an older version: the columns its results table has."""
    cols = [r[1] for r in conn.execute("PRAGMA table_info(results)") if r[1] in RESULT_COLUMNS]
    conn.executemany(
        f"INSERT INTO results ({', '.join(schema.q(c) for c in cols)}, received_ts) "
        f"VALUES ({', '.join('?' * (len(cols) + 1))})",
        [tuple(r.get(c) for c in cols) + (5.0,) for r in rows],
    )


def test_wal_mode_and_latest_schema(tmp_path):
    store = Store(tmp_path / "sub" / "c.db")
    conn = sqlite3.connect(tmp_path / "sub" / "c.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.LATEST == 12
    assert store.migrated_from == 0
    store.close()


def test_batches_are_idempotent_and_track_each_device_latest_scan(db_url):
    store = Store(db_url)
    s1 = make_rows("h", n_gpus=2, scan_id="s1", ts=100.0)
    s2 = make_rows("h", n_gpus=2, scan_id="s2", ts=200.0)
    assert store.ingest(row_tuples(s2), 1.0) == (6, 0)
    assert store.ingest(row_tuples(s1 + s2), 2.0) == (6, 6)  # an older scan arriving late
    devices = store.devices()
    assert [(d["gpu"], d["last_scan_id"], d["last_ts"]) for d in devices] == [
        ("GPU-h-0", "s2", 202.0),
        ("GPU-h-1", "s2", 202.0),
    ]
    cols, rows = store.latest_samples()
    assert cols == list(RESULT_COLUMNS) and len(rows) == 6 and {r[cols.index("scan_id")] for r in rows} == {"s2"}
    cols, rows = store.earlier_samples(5)
    assert len(rows) == 6 and {r[cols.index("scan_id")] for r in rows} == {"s1"}
    assert store.earlier_samples(0)[1] == []
    assert store.count_results() == 12 and store.count_results("s1") == 6
    store.close()


def test_a_scan_of_one_probe_keeps_the_other_probes_latest_scan(db_url):
    store = Store(db_url)
    both = make_rows("h", n_gpus=4, scan_id="s1", ts=100.0, slow=(1,)) + make_rows(
        "h", n_gpus=4, scan_id="s1", ts=100.0, probe="membw", unit="GB/s", settings="size=1GiB"
    )
    store.ingest(row_tuples(both), 1.0)
    store.ingest(row_tuples(make_rows("h", n_gpus=4, scan_id="s2", ts=200.0)), 2.0)  # a matmul-only scan
    cols, rows = store.latest_samples()
    latest = {(r[cols.index("probe")], r[cols.index("scan_id")]) for r in rows}
    assert latest == {("matmul", "s2"), ("membw", "s1")} and len(rows) == 24
    cols, rows = store.earlier_samples(5)
    assert {(r[cols.index("probe")], r[cols.index("scan_id")]) for r in rows} == {("matmul", "s1")}
    assert [d["last_scan_id"] for d in store.devices()] == ["s2"] * 4  # the device's newest scan
    snap = FleetView(store).refresh()  # the real engine
    assert snap.error is None
    assert [sorted(p["probe"] for p in g["probes"]) for g in snap.gpus] == [["matmul", "membw"]] * 4
    store.close()


def test_the_fleet_reads_and_the_sample_check_go_by_index(tmp_path):
    store = Store(tmp_path / "c.db")
    plans = []
    table = store._table
    store._table = lambda sql, params=(): plans.append(table("EXPLAIN QUERY PLAN " + sql, params)[1]) or ([], [])
    store.latest_samples()
    store.earlier_samples(3)
    conn = store._writer
    store._check_samples(conn, [])
    plans.append(conn.execute("EXPLAIN QUERY PLAN " + store._sql["clash"]).fetchall())
    details = [[row[-1] for row in plan] for plan in plans]
    assert "SEARCH r USING INDEX results_device (gpu=? AND host=? AND <expr>=?)" in details[0]
    assert "SEARCH r USING INDEX results_device (gpu=? AND host=? AND <expr>=?)" in details[1]
    assert (
        "SEARCH r USING INDEX results_sample (gpu=? AND host=? AND <expr>=? AND probe=? AND <expr>=? AND <expr>=? AND <expr>=?)"
        in details[2]
    )
    assert not any(d.startswith("SCAN r") for plan in details for d in plan)  # never every result
    store.close()


def test_a_failing_batch_stores_nothing(db_url):
    store = Store(db_url)
    rows = row_tuples(make_rows("h", n_gpus=2))
    rows[3] = rows[3][:-1]  # one malformed row: wrong number of columns
    with pytest.raises(store.errors):
        store.ingest(rows, 1.0)
    assert store.count_results() == 0 and store.devices() == []
    store.close()


def test_migration_from_version_1_keeps_data_and_backfills_devices(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, target=1)  # the database as the first release left it
    rows = make_rows("old", n_gpus=2, scan_id="s1", ts=100.0) + make_rows("old", n_gpus=2, scan_id="s2", ts=200.0)
    insert_old(conn, rows)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "devices" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()

    store = Store(path)
    assert store.migrated_from == 1
    assert store.count_results() == 12
    assert [(d["gpu"], d["last_scan_id"]) for d in store.devices()] == [("GPU-old-0", "s2"), ("GPU-old-1", "s2")]
    assert len(store.latest_samples()[1]) == 6 and len(store.earlier_samples(5)[1]) == 6  # device_scans backfilled
    assert store.ingest(row_tuples(rows), 6.0) == (0, 12)  # ids survived the migration
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == schema.LATEST


def test_the_results_table_stores_every_contract_column(tmp_path):
    # records.COLUMNS is the contract: a fresh database, and one migrated from any version, has a
    # results column for each (a column added to records.py without a migration fails here)
    for target in range(1, schema.LATEST):
        old = sqlite3.connect(tmp_path / f"v{target}.db", isolation_level=None)
        schema.migrate(old, target=target)
        old.close()
    for path in [tmp_path / "fresh.db"] + [tmp_path / f"v{t}.db" for t in range(1, schema.LATEST)]:
        store = Store(path)
        names = [r[1] for r in store._reader.execute("PRAGMA table_info(results)")]
        assert set(RESULT_COLUMNS) <= set(names), (path.name, set(RESULT_COLUMNS) - set(names))
        store.close()


def test_probe_columns_are_stored_and_read_back(db_url):
    store = Store(db_url)
    rows = make_rows(
        "h",
        n_gpus=2,
        probe="allreduce",
        unit="GB/s",
        settings="bytes=16777216,ranks=2",
        algbw_gbps=3.5,
        arrival_skew_s=0.002,
    )
    assert store.ingest(row_tuples(rows), 1.0) == (6, 0)
    got = store.scan_results("s1")
    assert [(r["algbw_gbps"], r["arrival_skew_s"]) for r in got] == [(3.5, 0.002)] * 6
    cols, latest = store.latest_samples()
    assert {r[cols.index("algbw_gbps")] for r in latest} == {3.5}
    store.close()


def test_migration_from_version_5_adds_the_probe_columns(tmp_path):
    path = tmp_path / "v5.db"
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, target=5)
    assert "algbw_gbps" not in [r[1] for r in conn.execute("PRAGMA table_info(results)")]
    old = make_rows("old", n_gpus=2, scan_id="s1", ts=100.0)
    insert_old(conn, old)
    conn.close()
    store = Store(path)
    assert store.migrated_from == 5 and store.count_results() == 6
    assert {r["algbw_gbps"] for r in store.scan_results("s1")} == {None}  # missing, never 0
    new = make_rows(
        "new",
        n_gpus=1,
        scan_id="s2",
        probe="allreduce",
        unit="GB/s",
        settings="r=2",
        algbw_gbps=2.0,
        arrival_skew_s=0.5,
    )
    assert store.ingest(row_tuples(new), 6.0) == (3, 0)
    assert {r["arrival_skew_s"] for r in store.scan_results("s2")} == {0.5}
    assert store.ingest(row_tuples(old), 7.0) == (0, 6)  # ids survived the migration
    store.close()


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "new.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    with pytest.raises(RuntimeError, match="newer than this collector"):
        Store(path)


def test_fleet_view_runs_the_real_analysis_with_history(db_url):
    store = Store(db_url)
    # three earlier scans where every device is alike, then one where gpu 5 is 12% slow
    for k in range(3):
        store.ingest(row_tuples(make_rows("n1", n_gpus=8, scan_id=f"old{k}", ts=100.0 * k, samples=4)), 1.0)
    store.ingest(row_tuples(make_rows("n1", n_gpus=8, scan_id="now", ts=1000.0, samples=4, slow=(5,))), 2.0)
    view = FleetView(store)  # straggler.analysis.analyze
    snap = view.refresh()
    assert snap.error is None
    assert [g["gpu"] for g in snap.stragglers()] == ["GPU-n1-5"]
    p = next(g for g in snap.gpus if g["gpu"] == "GPU-n1-5")["probes"][0]
    assert p["straggler"] and p["ratio"] < 0.9 and p["cost"] > 0.1 and p["causes"]
    assert p["history_scans"] == 3  # the earlier scans reached the engine as history
    assert snap.summary["history_rows"] == 3 * 8 * 4
    store.close()


def test_an_analysis_error_keeps_the_previous_verdicts(db_url):
    store = Store(db_url)
    store.ingest(row_tuples(make_rows("a", n_gpus=4, slow=(2,)) + make_rows("b", n_gpus=4)), 1.0)
    metrics, fleet_metrics = SelfMetrics(), FleetCollector()

    def published(snap):
        fleet_metrics.update(snap)
        metrics.analysis_done(snap)

    view = FleetView(store, on_refresh=published)  # the real engine
    good = view.refresh()
    assert good.error is None and [g["gpu"] for g in good.stragglers()] == ["GPU-a-2"]
    # a newer scan of host b in another unit for the same probe, as a collector before the unit
    # check (schema version 4) may have stored it: the engine refuses the fleet's table
    store._writer.execute("DELETE FROM probe_units")
    store.ingest(row_tuples(make_rows("b", n_gpus=4, scan_id="s2", ts=2e9, unit="GB/s")), 2.0)
    bad = view.refresh()
    assert "mixes units" in bad.error and "\n" not in bad.error
    assert bad.computed_ts > good.computed_ts and bad.verdicts_ts == good.verdicts_ts == good.computed_ts
    assert [g["probes"] for g in bad.gpus] == [g["probes"] for g in good.gpus]  # not blanked
    assert [g["gpu"] for g in bad.stragglers()] == ["GPU-a-2"] and bad.summary == good.summary
    assert next(g for g in bad.gpus if g["gpu"] == "GPU-b-0")["last_scan_id"] == "s2"  # the device table is current
    reg = CollectorRegistry()
    reg.register(fleet_metrics)
    flag = {
        "host": "a",
        "uuid": "GPU-a-2",
        "gpu": "2",
        "model": "NVIDIA H100 80GB HBM3",
        "probe": "matmul",
        "settings": "n=8192,dtype=bf16",
    }
    cause = cause_label(good.stragglers()[0]["probes"][0]["causes"])
    assert (
        reg.get_sample_value(
            "straggler_gpu_straggler", {**flag, "cause": cause, "basis": good.stragglers()[0]["probes"][0]["basis"]}
        )
        == 1.0
    )  # the series stays
    runs = "straggler_collector_analysis_runs_total"
    assert metrics.registry.get_sample_value(runs, {"outcome": "ok"}) == 1.0
    assert metrics.registry.get_sample_value(runs, {"outcome": "error"}) == 1.0
    store.close()


def test_an_analysis_error_before_any_verdict_lists_the_devices(tmp_path):
    store = Store(tmp_path / "c.db")
    store.ingest(row_tuples(make_rows("solo", n_gpus=1)), 1.0)

    def refuse(samples, history):
        from straggler.errors import InputError

        raise InputError("input: too few devices")

    snap = FleetView(store, refuse).refresh()
    assert snap.error == "input: too few devices" and snap.verdicts_ts is None
    assert [(g["gpu"], g["probes"], g["straggler"]) for g in snap.gpus] == [("GPU-solo-0", [], False)]
    store.close()


def test_ingest_refuses_rows_the_analysis_would_refuse(db_url):
    store = Store(db_url)
    store.ingest(row_tuples(make_rows("a", n_gpus=2)), 1.0)
    with pytest.raises(
        Refused, match=r"^results\[0\]\.unit: 'GB/s', but probe matmul \(n=8192,dtype=bf16\) is stored in 'TFLOP/s'$"
    ):
        store.ingest(row_tuples(make_rows("b", n_gpus=2, unit="GB/s")), 2.0)
    mixed = make_rows("c", n_gpus=1, samples=2)
    mixed[1]["unit"] = "GB/s"
    with pytest.raises(Refused, match=r"^results\[1\]\.unit: 'GB/s', but results\[0\] gives 'TFLOP/s'"):
        store.ingest(row_tuples(mixed), 3.0)
    with pytest.raises(Refused, match=r"^results\[0\]\.sample: a row without scan_id"):
        store.ingest(row_tuples(make_rows("d", n_gpus=1, scan_id=None)), 4.0)
    assert store.count_results() == 6 and [d["host"] for d in store.devices()] == ["a", "a"]
    # sample 0 of GPU-a-0 in scan s1 again, measured at another time (so another id) with another value
    again = dict(make_rows("a", n_gpus=1, samples=1)[0], ts=5.0, value=1.0)
    again["id"] = result_id(again)
    with pytest.raises(Refused, match=r"^results\[0\]\.value: 1\.0, but this sample .* as 790\.0$"):
        store.ingest(row_tuples([again]), 5.0)
    # with the stored value it is the same sample uploaded twice: a duplicate
    assert store.ingest(row_tuples([dict(again, value=790.0)]), 6.0) == (0, 1)
    assert store.count_results() == 6
    store.close()


def test_migration_from_version_3_backfills_each_probe_unit(tmp_path):
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, target=3)
    rows = make_rows("old", n_gpus=2) + make_rows("old", n_gpus=1, probe="membw", unit="GB/s", settings="")
    clash = dict(rows[0], ts=1.0, value=1.0)  # one sample twice with two values: the migration still runs
    rows.append(dict(clash, id=result_id(clash)))
    insert_old(conn, rows)
    conn.close()
    store = Store(path)
    assert store.migrated_from == 3 and store.count_results() == 10
    assert store._reader.execute("SELECT probe, settings, unit FROM probe_units ORDER BY probe").fetchall() == [
        ("matmul", "n=8192,dtype=bf16", "TFLOP/s"),
        ("membw", "", "GB/s"),
    ]
    with pytest.raises(Refused, match="stored in 'GB/s'"):
        store.ingest(row_tuples(make_rows("new", n_gpus=1, probe="membw", unit="TB/s", settings=None)), 6.0)
    store.close()


def test_migration_from_version_4_keys_the_latest_scan_by_probe(tmp_path):
    path = tmp_path / "v4.db"
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, target=4)
    rows = (
        make_rows("old", n_gpus=2, scan_id="s1", ts=100.0)
        + make_rows("old", n_gpus=2, scan_id="s1", ts=100.0, probe="membw", unit="GB/s", settings=None)
        + make_rows("old", n_gpus=2, scan_id="s2", ts=200.0)
    )
    insert_old(conn, rows)
    conn.close()
    store = Store(path)
    assert store.migrated_from == 4
    assert store._reader.execute("SELECT probe, settings, scan_id FROM latest_scans GROUP BY 1, 2, 3").fetchall() == [
        ("matmul", "n=8192,dtype=bf16", "s2"),
        ("membw", "", "s1"),
    ]
    tables = {r[0] for r in store._reader.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "device_scans" not in tables and {"probe_scans", "latest_scans"} <= tables
    cols, latest = store.latest_samples()
    assert {(r[cols.index("probe")], r[cols.index("scan_id")]) for r in latest} == {("matmul", "s2"), ("membw", "s1")}
    cols, history = store.earlier_samples(5)
    assert {(r[cols.index("probe")], r[cols.index("scan_id")]) for r in history} == {("matmul", "s1")}
    store.close()


def test_two_collectors_starting_on_one_database_migrate_once(tmp_path):
    path = tmp_path / "c.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the other collector holds the write lock while it migrates
    for v, stmts in enumerate(schema.MIGRATIONS):
        for stmt in stmts:
            other.execute(stmt)
        other.execute(f"PRAGMA user_version = {v + 1}")
    out = {}

    def start():
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            out["from"] = schema.migrate(conn)
        except Exception as e:  # noqa: BLE001 - "table results already exists" when the version was read before the lock
            out["error"] = e
        conn.close()

    t = threading.Thread(target=start)
    t.start()
    time.sleep(0.5)  # this one is waiting for the lock now
    other.execute("COMMIT")
    t.join(30)
    assert out == {"from": schema.LATEST}
    other.close()


def test_postgresql_has_the_sqlite_schema(pg_server, tmp_path):
    # one chain of migrations for both: the same tables, each with the same columns and indexes
    lite, pg = Store(tmp_path / "c.db"), Store(pg_server.new_schema())
    tables = [
        r[0]
        for r in lite._reader.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    assert "results" in tables and "fleet_snapshot" in tables
    got = [
        r[0]
        for r in pg._reader.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_name != 'straggler_schema' ORDER BY table_name"
        )
    ]
    assert got == tables
    for t in tables:
        lite_cols = [(r[1], r[2]) for r in lite._reader.execute(f"PRAGMA table_info({t})")]
        pg_cols = [
            (r[0], r[1])
            for r in pg._reader.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = ? ORDER BY ordinal_position",
                (t,),
            )
        ]
        assert [c for c, _ in pg_cols] == [c for c, _ in lite_cols], t
        # SQLite's REAL is PostgreSQL's double precision (its "real" is 4 bytes), INTEGER is bigint
        want = {"REAL": "double precision", "INTEGER": "bigint", "TEXT": "text", "BLOB": "bytea"}
        assert [ty for _, ty in pg_cols] == [want[ty] for _, ty in lite_cols], t
    lite_idx = {
        r[0]
        for r in lite._reader.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'"
        )
    }
    pg_idx = {r[0] for r in pg._reader.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")}
    assert lite_idx <= pg_idx and lite_idx
    assert pg.migrated_from == 0 and schema.version(pg._reader, pg.dialect) == schema.LATEST
    lite.close()
    pg.close()


def test_replicas_starting_on_one_postgresql_database_migrate_once(pg_server):
    url = pg_server.new_schema()
    out, barrier = [], threading.Barrier(3)

    def start():
        barrier.wait()
        try:
            store = Store(url)
            out.append(store.migrated_from)
            store.close()
        except Exception as e:  # noqa: BLE001 (the test reports it) "relation results already exists" without the migration lock
            out.append(e)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out, key=str) == [0, schema.LATEST, schema.LATEST]


def test_a_newer_postgresql_database_is_refused(pg_server):
    url = pg_server.new_schema()
    Store(url).close()
    store = Store(url)
    store._writer.execute("UPDATE straggler_schema SET version = ?", (schema.LATEST + 1,))
    store.close()
    with pytest.raises(RuntimeError, match=f"schema version {schema.LATEST + 1} is newer than this collector"):
        Store(url)


class _CommitFails:
    """The writer connection of a full disk: COMMIT fails once (everything else is the real connection)."""

    def __init__(self, conn):
        self._conn, self.failed = conn, False

    def execute(self, sql, *args):
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_a_failed_commit_is_rolled_back_and_the_store_goes_on(db_url):
    store = Store(db_url)
    real = store._writer
    store._writer = _CommitFails(real)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store.ingest(row_tuples(make_rows("a", n_gpus=1)), 1.0)
    assert not real.in_transaction and store.count_results() == 0
    assert store.ingest(row_tuples(make_rows("a", n_gpus=1)), 2.0) == (3, 0)  # BEGIN IMMEDIATE works again
    store._writer = real
    store.close()


def test_fleet_input_is_read_in_one_transaction(db_url):
    store = Store(db_url)
    store.ingest(row_tuples(make_rows("h", n_gpus=2, scan_id="s1", ts=100.0)), 1.0)
    read_latest = store.latest_samples

    def latest_then_an_ingest():
        out = read_latest()
        store.ingest(row_tuples(make_rows("h", n_gpus=2, scan_id="s2", ts=200.0)), 2.0)  # lands in between
        return out

    store.latest_samples = latest_then_an_ingest
    read = store.fleet_input(5)
    latest, (summaries, (_, history)), current = read.latest, read.history, read.current
    assert len(summaries) == 0  # no analysis has run: the history would be read from its samples
    assert {d["last_scan_id"] for d in read.devices} == {"s1"} and set(latest["scan_id"]) == {"s1"}
    assert history == []  # s1 is not also history: the ingest of s2 is not seen
    assert set(current["scan_id"]) == {"s1"}  # and its latest scans are those of s1
    del store.latest_samples
    read = store.fleet_input(5)
    latest, (_, (hcols, history)) = read.latest, read.history
    assert set(latest["scan_id"]) == {"s2"} and {r[hcols.index("scan_id")] for r in history} == {"s1"}
    store.close()


class CountingAnalysis:
    """Counts analysis runs (the engine itself is exercised above)."""

    def __init__(self):
        self.runs = 0

    def __call__(self, samples, history):
        from test_collector_api import peer_ratio_analyze

        self.runs += 1
        return peer_ratio_analyze(samples, history)


def wait_until(cond, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_fleet_view_debounces_a_burst_into_one_run(tmp_path):
    store = Store(tmp_path / "c.db")
    store.ingest(row_tuples(make_rows("d", n_gpus=3)), 1.0)
    counting = CountingAnalysis()
    view = FleetView(store, counting, debounce_s=0.5, max_delay_s=30)
    view.start()  # analyses what is stored
    try:
        wait_until(lambda: counting.runs == 1)
        for _ in range(20):  # a burst of uploads
            view.notify()
        time.sleep(2.0)
        assert counting.runs == 2
    finally:
        view.stop()
        store.close()


def test_fleet_view_runs_during_a_steady_stream_at_most_max_delay_late(tmp_path):
    store = Store(tmp_path / "c.db")
    store.ingest(row_tuples(make_rows("m", n_gpus=3)), 1.0)
    counting = CountingAnalysis()
    view = FleetView(store, counting, debounce_s=0.5, max_delay_s=0.4)
    view.start()
    try:
        wait_until(lambda: counting.runs == 1)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:  # never quiet for debounce_s
            view.notify()
            time.sleep(0.05)
        assert counting.runs >= 3  # without max_delay_s it would still be 1
    finally:
        view.stop()
        store.close()


def test_fleet_view_thread_survives_a_failed_refresh(tmp_path):
    store = Store(tmp_path / "c.db")
    store.ingest(row_tuples(make_rows("s", n_gpus=3)), 1.0)
    published = []

    def on_refresh(snap):
        published.append(snap)
        if len(published) == 1:
            raise sqlite3.OperationalError("disk I/O error")  # whatever breaks one refresh

    view = FleetView(store, CountingAnalysis(), debounce_s=0.05, on_refresh=on_refresh)
    view.start()
    try:
        wait_until(lambda: len(published) == 1)
        view.notify()
        wait_until(lambda: len(published) == 2)  # the thread is still there
    finally:
        view.stop()
        store.close()


def test_example_config_lists_the_defaults():
    from conftest import ROOT
    from straggler.collector.settings import CollectorSettings, load_settings

    assert load_settings(ROOT / "systemd" / "collector.toml", env={}) == CollectorSettings()


def test_the_history_reads_find_each_devices_latest_scans_through_the_time_index(db_url):
    """A device keeps many scans (summaries outlive the raw rows), so the reads of its history
    must go to its newest scans by index, not rank all of them or test each one against a
    subquery (each database's plan says which)."""
    store = Store(db_url)
    for k in range(30):
        store.ingest(row_tuples(make_rows("h", n_gpus=2, scan_id=f"s{k:02d}", ts=100.0 * k)), 1.0 + k)
    for name in ("history", "summaries", "samples"):
        sql, params = store.fleet_queries(5)[name]
        if store.url is None:
            plan = " ".join(str(r[-1]) for r in store._reader.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert re.search(r"SEARCH p USING (COVERING )?INDEX probe_scans_recent", plan), (name, plan)  # a range
        else:
            plan = " ".join(r[0] for r in store._reader.execute("EXPLAIN " + sql, params))
            assert re.search(r"Index (Only )?Scan Backward using probe_scans_recent", plan), (name, plan)
            assert "Filter: (SubPlan" not in plan, (name, plan)  # not a subquery per candidate scan
    summaries, (cols, samples) = store.earlier_scans(5)
    assert len(summaries) == 0 and sorted({r[cols.index("scan_id")] for r in samples}) == [
        f"s{k}" for k in range(24, 29)
    ]
    store.close()
