"""The collector's SQLite store (real files): WAL, idempotent batches, migrations, the fleet query,
and the fleet view over the real analysis engine."""

import sqlite3
import time

import pytest

from straggler.collector import schema
from straggler.collector.fleet import FleetView
from straggler.collector.store import RESULT_COLUMNS, Store, row_tuples
from test_collector_api import make_rows


def test_wal_mode_and_latest_schema(tmp_path):
    store = Store(tmp_path / "sub" / "c.db")
    conn = sqlite3.connect(tmp_path / "sub" / "c.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.LATEST == 3
    assert store.migrated_from == 0
    store.close()


def test_batches_are_idempotent_and_track_each_device_latest_scan(tmp_path):
    store = Store(tmp_path / "c.db")
    s1 = make_rows("h", n_gpus=2, scan_id="s1", ts=100.0)
    s2 = make_rows("h", n_gpus=2, scan_id="s2", ts=200.0)
    assert store.ingest(row_tuples(s2), 1.0) == (6, 0)
    assert store.ingest(row_tuples(s1 + s2), 2.0) == (6, 6)  # an older scan arriving late
    devices = store.devices()
    assert [(d["gpu"], d["last_scan_id"], d["last_ts"]) for d in devices] == [
        ("GPU-h-0", "s2", 202.0), ("GPU-h-1", "s2", 202.0)]
    cols, rows = store.latest_samples()
    assert cols == list(RESULT_COLUMNS) and len(rows) == 6 and {r[cols.index("scan_id")] for r in rows} == {"s2"}
    cols, rows = store.earlier_samples(5)
    assert len(rows) == 6 and {r[cols.index("scan_id")] for r in rows} == {"s1"}
    assert store.earlier_samples(0)[1] == []
    assert store.count_results() == 12 and store.count_results("s1") == 6
    store.close()


def test_a_failing_batch_stores_nothing(tmp_path):
    store = Store(tmp_path / "c.db")
    rows = row_tuples(make_rows("h", n_gpus=2))
    rows[3] = rows[3][:-1]  # one malformed row: wrong number of columns
    with pytest.raises(sqlite3.ProgrammingError):
        store.ingest(rows, 1.0)
    assert store.count_results() == 0 and store.devices() == []
    store.close()


def test_migration_from_version_1_keeps_data_and_backfills_devices(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, target=1)  # the database as the first release left it
    rows = make_rows("old", n_gpus=2, scan_id="s1", ts=100.0) + make_rows("old", n_gpus=2, scan_id="s2", ts=200.0)
    cols = ", ".join(schema.q(c) for c in RESULT_COLUMNS)
    conn.executemany(f"INSERT INTO results ({cols}, received_ts) VALUES ({', '.join('?' * (len(RESULT_COLUMNS) + 1))})",
                     [t + (5.0,) for t in row_tuples(rows)])
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


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "new.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    with pytest.raises(RuntimeError, match="newer than this collector"):
        Store(path)


def test_fleet_view_runs_the_real_analysis_with_history(tmp_path):
    store = Store(tmp_path / "c.db")
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


def test_fleet_view_reports_an_analysis_error_without_failing(tmp_path):
    store = Store(tmp_path / "c.db")
    # two agents disagree on the unit of one probe: the engine refuses the fleet's table
    store.ingest(row_tuples(make_rows("a", n_gpus=2) + make_rows("b", n_gpus=2, unit="GB/s")), 1.0)
    snap = FleetView(store).refresh()
    assert "mixes units" in snap.error and "\n" not in snap.error
    assert [g["gpu"] for g in snap.gpus] == ["GPU-a-0", "GPU-a-1", "GPU-b-0", "GPU-b-1"]
    assert all(g["probes"] == [] and not g["straggler"] for g in snap.gpus)
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
