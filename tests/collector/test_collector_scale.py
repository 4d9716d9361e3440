"""The collector at fleet scale (issue 13): the analysis off the ingest path gives the same view."""

import json
import subprocess
import sys
from pathlib import Path

from postgres import pg_server  # noqa: F401 (fixture)
from straggler.collector.fleet import FleetView
from straggler.collector.store import Store, row_tuples
from test_collector_api import make_rows

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "collector_scale.py"


def _fleet(store: Store) -> None:
    for k in range(3):  # history: three earlier scans of two hosts
        for host in ("a", "b"):
            store.ingest(row_tuples(make_rows(host, n_gpus=8, scan_id=f"old{k}", ts=1e9 + 100.0 * k, samples=4)), 1.0)
    store.ingest(
        row_tuples(
            make_rows("a", n_gpus=8, scan_id="now", ts=1e9 + 1000, samples=4, slow=(5,))
            + make_rows("b", n_gpus=8, scan_id="now", ts=1e9 + 1000, samples=4)
        ),
        2.0,
    )


def test_the_analysis_process_gives_the_verdicts_of_the_thread(tmp_path):
    store = Store(tmp_path / "c.db")
    _fleet(store)
    in_thread = FleetView(store).refresh()
    view = FleetView(store, worker="process")
    try:
        in_process = view.refresh()
        assert view.worker == "process" and view._pool is not None  # it really ran in a child process
        assert in_process.error is None and [g["gpu"] for g in in_process.stragglers()] == ["GPU-a-5"]
        assert in_process.gpus == in_thread.gpus and in_process.summary == in_thread.summary
        assert in_process.summary["history_rows"] == 3 * 16 * 4
        # a refused fleet keeps the previous verdicts there too
        store._writer.execute("DELETE FROM probe_units")
        store.ingest(row_tuples(make_rows("b", n_gpus=8, scan_id="s2", ts=2e9, unit="GB/s")), 3.0)
        bad = view.refresh()
        assert "mixes units" in bad.error and bad.verdicts_ts == in_process.verdicts_ts
        assert [g["probes"] for g in bad.gpus] == [g["probes"] for g in in_process.gpus]
    finally:
        view.stop()
        store.close()
    assert view._pool is None


def test_retention_prunes_old_results_in_chunks_and_keeps_the_devices(tmp_path):
    from straggler.collector.retention import Retention

    store = Store(tmp_path / "c.db")
    day = 86400.0
    store.ingest(row_tuples(make_rows("a", n_gpus=4, scan_id="old", ts=1e9, samples=5)), 1e9)  # 20 rows
    store.ingest(row_tuples(make_rows("a", n_gpus=4, scan_id="new", ts=1e9 + 40 * day, samples=3)), 1e9 + 40 * day)
    store.ingest(row_tuples(make_rows("b", n_gpus=2, scan_id="lone", ts=1e9, samples=2)), 1e9)  # b's only scan
    keep = Retention(store, 30 * day, clock=lambda: 1e9 + 41 * day, chunk_rows=3)
    assert keep.prune_once() == 20 + 4
    assert store.count_results("old") == 0 and store.count_results("lone") == 0 and store.count_results("new") == 12
    scans = store._reader.execute("SELECT host, scan_id FROM probe_scans ORDER BY 1, 2").fetchall()
    assert scans == [("a", "new")] * 4 + [("b", "lone")] * 2  # b's latest scan stays named
    assert sorted(d["gpu"] for d in store.devices()) == [f"GPU-a-{i}" for i in range(4)] + ["GPU-b-0", "GPU-b-1"]
    assert keep.prune_once() == 0 and keep.pruned_rows == 24
    snap = FleetView(store).refresh()  # host b is still listed, without a verdict
    assert {g["gpu"]: bool(g["probes"]) for g in snap.gpus if g["host"] == "b"} == {"GPU-b-0": False, "GPU-b-1": False}
    store.close()


def test_result_retention_s_is_checked_like_the_other_settings(tmp_path):
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "STRAGGLER_COLLECTOR_TOKEN": "0123456789abcdef0123",
        "STRAGGLER_COLLECTOR_RESULT_RETENTION_S": "0",
    }
    out = subprocess.run(
        [sys.executable, "-m", "straggler", "collector", "--check", "--db", str(tmp_path / "c.db"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("straggler: error: "), out
    assert "STRAGGLER_COLLECTOR_RESULT_RETENTION_S" in lines[0] and "must be > 0" in lines[0], lines


def test_the_scale_benchmark_measures_postgresql_beside_sqlite(pg_server, tmp_path):
    """benchmarks/collector_scale.py --backends postgresql on the session's server (--pg-url): a
    tiny fleet built, refreshed, served by a real collector on a schema of its own, then dropped."""
    cmd = [sys.executable, str(BENCH), "--gpus", "16", "--scans", "1", "--readers", "1", "--load-rows", "288"]
    cmd += ["--batch-rows", "72", "--backends", "postgresql", "--pg-url", pg_server.base_url]
    out = subprocess.run(cmd + ["--db", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    [r] = json.loads(out.stdout)
    assert r["backend"] == "postgresql" and r["gpus"] == 16 and r["rows"] == 16 * 3 * 3 * 2
    assert r["devices"] == 16 and r["error"] is None and r["node_error"] is None and r["stragglers"] == 1
    assert r["refresh_full_s"] > 0 and r["refresh_node_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["ingest_rows"] == 288 and r["posts"] == 4 and r["ingest_rows_s"] > 0 and r["ttfb_ms"] > 0
    assert r["db_bytes_per_gpu_scan"] > 0 and r["wal_bytes_per_row"] > 0 and r["wal_after_checkpoint"] is True
    assert "db_cpu_s" not in r and "refresh_full_db_cpu_s" not in r  # a server it did not start: "-"
    import psycopg

    with psycopg.connect(pg_server.base_url) as conn:  # its schema is gone again
        assert conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'scale%'").fetchall() == []
    assert list(tmp_path.iterdir()) == []
    bad = subprocess.run(cmd[:2] + ["--backends", "sqlite,mysql"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown backend 'mysql'" in bad.stderr.strip().splitlines()[-1], bad.stderr


def test_the_scale_table_puts_the_backends_side_by_side():
    import importlib.util

    spec = importlib.util.spec_from_file_location("collector_scale", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sqlite = {"backend": "sqlite", "gpus": 10_000, "refresh_full_s": 2.5, "db_bytes_per_gpu_scan": 4300.0}
    pg = {"backend": "postgresql", "gpus": 10_000, "refresh_full_s": 3.25, "refresh_full_db_cpu_s": 1.5}
    lines = bench.table([sqlite, pg]).splitlines()
    assert lines[0].split() == ["figure", "sqlite", "10,000", "postgresql", "10,000", "target"]
    rows = [(line[:42].strip(), line[42:].split()) for line in lines[1:]]
    assert rows[0] == ("refresh, full-fleet scan: wall s", ["2.50", "3.25", "<=", "1", "@10,000"])  # once a size
    assert rows[2] == ("PostgreSQL server CPU s", ["-", "1.50"])  # what a backend does not give: "-"
    assert dict(rows)["DB bytes per GPU per scan"] == ["4300", "-"]


def test_the_read_benchmark_reads_the_same_rows_with_each_installed_library(tmp_path):
    """benchmarks/collector_read.py as documented: the collector's own sqlite3 read beside pandas'
    read_sql (the libraries not installed here are named as not measured), the same rows, and
    whether each reads a column whose first rows are NULL."""
    bench = BENCH.with_name("collector_read.py")
    cmd = [sys.executable, str(bench), "--gpus", "16", "--scans", "2", "--repeats", "1"]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {r["method"]: r for r in json.loads(out.stdout)}
    assert {"sqlite3", "pandas read_sql"} <= set(runs), runs
    for r in runs.values():  # 16 GPUs x 3 probes x 3 samples, in the current scan and in each of the 2 before
        assert (r["rows_latest"], r["rows_history"], r["devices"]) == (16 * 9, 2 * 16 * 9, 16), r
        assert r["same_rows"] and r["nulls_first"] == "yes", r
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert table.returncode == 0 and "| sqlite3 | " in table.stdout and "| 1.00x |" in table.stdout, table.stdout
    missing = [m for m in ("adbc", "connectorx", "polars") if m not in runs]
    assert not missing or f"not installed here, not measured: {', '.join(missing)}" in table.stdout, table.stdout
