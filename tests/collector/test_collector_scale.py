"""The collector at fleet scale (issue 13): the analysis off the ingest path gives the same view."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from postgres import db_url, pg_server  # noqa: F401 (fixtures)
from straggler.collector.fleet import FleetView
from straggler.collector.store import Store, row_tuples
from straggler.records import result_id
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


def test_the_analysis_process_writes_the_summaries_after_the_verdicts_are_out(tmp_path):
    store = Store(tmp_path / "c.db")
    _fleet(store)
    view = FleetView(store, worker="process", history_scans=3)
    try:
        assert view.refresh().error is None
        written = view.settle(timeout_s=120)  # queued in the analysis process after the refresh returned
        assert written is not None and written["summaries"] == 16 and written["wall_s"] >= 0
        assert _summaries(store)["scans"] == ["now"] and _summaries(store)["rows"] == 16
        assert view.refresh().error is None and view.settle(timeout_s=120)["summaries"] == 0  # nothing new
    finally:
        view.stop()
        store.close()


def test_a_refresh_after_the_analysis_process_died_starts_another(tmp_path):
    import os
    import signal

    store = Store(tmp_path / "c.db")
    _fleet(store)
    view = FleetView(store, worker="process", history_scans=3)
    try:
        assert view.refresh().error is None and view.settle(timeout_s=120) is not None
        (pid,) = list(view._pool._processes)
        os.kill(pid, signal.SIGKILL)  # killed while idle, after its write
        deadline = time.monotonic() + 60
        while not view._pool._broken:  # the executor has seen it die
            assert time.monotonic() < deadline
            time.sleep(0.05)
        snap = view.refresh()  # not an error: a fresh analysis process
        assert snap.error is None and [g["gpu"] for g in snap.stragglers()] == ["GPU-a-5"]
        assert list(view._pool._processes) != [pid]
    finally:
        view.stop()
        store.close()


def test_retention_prunes_old_results_in_chunks_and_keeps_the_devices(tmp_path):
    from straggler.collector.retention import Retention

    store = Store(tmp_path / "c.db")
    day = 86400.0
    store.ingest(row_tuples(make_rows("a", n_gpus=4, scan_id="old", ts=1e9, samples=5)), 1e9)  # 20 rows
    store.ingest(row_tuples(make_rows("a", n_gpus=4, scan_id="new", ts=1e9 + 40 * day, samples=3)), 1e9 + 40 * day)
    store.ingest(row_tuples(make_rows("b", n_gpus=2, scan_id="lone", ts=1e9, samples=2)), 1e9)  # b's only scan
    kept = FleetView(store, history_scans=3)  # a running view: it keeps the latest samples, b's too
    assert {g["gpu"] for g in kept.refresh().gpus if g["probes"]} >= {"GPU-b-0", "GPU-b-1"}
    keep = Retention(store, 30 * day, clock=lambda: 1e9 + 41 * day, chunk_rows=3)
    assert keep.prune_once() == 20 + 4
    assert store.count_results("old") == 0 and store.count_results("lone") == 0 and store.count_results("new") == 12
    scans = store._reader.execute("SELECT host, scan_id FROM probe_scans ORDER BY 1, 2").fetchall()
    assert scans == [("a", "new")] * 4 + [("b", "lone")] * 2  # b's latest scan stays named
    assert sorted(d["gpu"] for d in store.devices()) == [f"GPU-a-{i}" for i in range(4)] + ["GPU-b-0", "GPU-b-1"]
    assert keep.prune_once() == 0 and keep.pruned_rows == 24
    for snap in (FleetView(store).refresh(), kept.refresh()):  # host b is still listed, without a verdict
        assert {g["gpu"]: bool(g["probes"]) for g in snap.gpus if g["host"] == "b"} == {
            "GPU-b-0": False,
            "GPU-b-1": False,
        }
    assert kept._latest.last["whole"] == 1  # the deletion counted up the epoch: its samples were read again
    store.close()


def test_a_kept_copy_of_the_latest_samples_loses_those_retention_deletes(tmp_path):
    """Only raw results age out (no scan, no summary): the view that keeps the latest samples in
    its analysis process reads them whole again, as a fresh one reads them."""
    from straggler.collector.retention import Retention

    store = Store(tmp_path / "c.db")
    day = 86400.0
    store.ingest(row_tuples(make_rows("a", n_gpus=4, scan_id="new", ts=1e9 + 40 * day, samples=3)), 1e9 + 40 * day)
    store.ingest(row_tuples(make_rows("b", n_gpus=2, scan_id="lone", ts=1e9, samples=3)), 1e9)
    kept = FleetView(store, history_scans=3)
    assert {g["gpu"] for g in kept.refresh().gpus if g["probes"]} == {f"GPU-a-{i}" for i in range(4)} | {
        "GPU-b-0",
        "GPU-b-1",
    }
    assert kept.refresh().error is None and kept._latest.last == {"whole": 0, "devices": 0}
    assert Retention(store, 30 * day, clock=lambda: 1e9 + 41 * day).prune_once() == 6
    assert store._reader.execute("SELECT count(*) FROM probe_scans").fetchone()[0] == 6  # scans kept: latest
    snap = kept.refresh()
    assert kept._latest.last["whole"] == 1
    assert {g["gpu"] for g in snap.gpus if g["probes"]} == {f"GPU-a-{i}" for i in range(4)}
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
    assert (
        r["devices"] == 16
        and r["error"] is None
        and r["node_error"] is None
        and r["first_error"] is None
        and r["stragglers"] == 1
    )
    assert r["refresh_full_s"] > 0 and r["refresh_node_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["ingest_rows"] == 288 and r["posts"] == 4 and r["ingest_rows_s"] > 0 and r["ttfb_ms"] > 0
    assert r["db_bytes_per_gpu_scan"] > 0 and r["wal_bytes_per_row"] > 0 and r["wal_after_checkpoint"] is True
    assert r["history"] == "summaries" and r["summarise_s"] > 0  # the earlier scan was summarised while latest
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
    assert rows[0] == ("first refresh (after a restart): wall s", ["-", "-"])  # what a run does not give: "-"
    assert rows[1] == ("refresh, full-fleet scan: wall s", ["2.50", "3.25", "<=", "1", "@10,000"])  # once a size
    assert rows[3] == ("PostgreSQL server CPU s", ["-", "1.50"])  # what a backend does not give: "-"
    assert dict(rows)["DB bytes per GPU per scan"] == ["4300", "-"]
    both = bench.table([{**sqlite, "history": "summaries"}, {**sqlite, "history": "samples"}]).splitlines()
    assert both[0].split() == ["figure", "sqlite", "10,000", "summaries", "sqlite", "10,000", "samples", "target"]


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


def _drifting_scan(scan: int, rng, ts: float) -> list[dict]:
    """One scan of 2 hosts x 8 GPUs x 2 probes x 5 noisy samples. GPU-a-2 loses 8% from scan 3 on
    (its own history shows it); GPU-b-5 is 9% slow in every scan (a straggler against its peers)."""
    rows = []
    for host in ("a", "b"):
        for i in range(8):
            gpu = f"GPU-{host}-{i}"
            factor = 0.92 if (gpu == "GPU-a-2" and scan >= 3) else 0.91 if gpu == "GPU-b-5" else 1.0
            for probe, base, unit in (("matmul", 790.0, "TFLOP/s"), ("membw", 3000.0, "GB/s")):
                for k in range(5):
                    row = {
                        "ts": ts + k,
                        "scan_id": f"s{scan}",
                        "host": host,
                        "gpu": gpu,
                        "index": i,
                        "model": "NVIDIA H100 80GB HBM3",
                        "probe": probe,
                        "settings": None if probe == "membw" else "n=8192",
                        "sample": k,
                        "value": base * factor * (1 + 0.003 * rng.standard_normal()) * (1 + 0.002 * (i % 3)),
                        "unit": unit,
                    }
                    row["id"] = result_id(row)
                    rows.append(row)
    return rows


def _summaries(store: Store) -> dict:
    rows = store._reader.execute("SELECT scan_id, writes, written_ts FROM scan_summaries").fetchall()
    return {"rows": len(rows), "scans": sorted({r[0] for r in rows}), "written": sorted({r[2] for r in rows})}


def test_a_refresh_reads_past_scans_as_their_summaries_and_decides_as_the_samples_do(db_url):
    """Item 1 of issue 13: each refresh stores its estimate of each device's latest scan; later
    refreshes read those scans as one summary row each instead of their samples, and decide as an
    analysis of the samples does. A scan that takes rows after its summary is read from its samples."""
    import numpy as np
    import pandas as pd

    from straggler.analysis import analyze

    rng = np.random.default_rng(3)
    store = Store(db_url)
    view = FleetView(store, history_scans=20)
    try:
        for scan in range(7):
            store.ingest(row_tuples(_drifting_scan(scan, rng, 1e9 + 1000.0 * scan)), 1e9 + 1000.0 * scan + 100)
            snap = view.refresh()
            assert snap.error is None
            assert _summaries(store)["scans"] == [f"s{k}" for k in range(scan + 1)]  # each scan summarised while latest
        devices = 16 * 2
        past, (_, samples) = store.earlier_scans(20)
        assert len(past) == 6 * devices and samples == []  # no sample read
        assert snap.summary["history_rows"] == 6 * devices

        # the same verdicts as the analysis of every stored sample
        raw = analyze(
            pd.DataFrame.from_records(store.latest_samples()[1], columns=store.latest_samples()[0]),
            pd.DataFrame.from_records(store.earlier_samples(20)[1], columns=store.earlier_samples(20)[0]),
        ).devices.set_index(["gpu", "probe"])
        assert raw.loc[("GPU-a-2", "matmul"), "degraded"] and raw.loc[("GPU-b-5", "matmul"), "straggler"]
        got = {(g["gpu"], p["probe"]): p for g in snap.gpus for p in g["probes"]}
        assert len(got) == len(raw) == devices
        for key, p in got.items():
            r = raw.loc[key]
            assert (p["verdict"], p["straggler"], p["degraded"], p["change_scan"]) == (
                r["verdict"],
                bool(r["straggler"]),
                bool(r["degraded"]),
                None if pd.isna(r["change_scan"]) else r["change_scan"],
            ), key
            assert p["ratio"] == pytest.approx(r["ratio"], rel=1e-12)
            assert p["history_baseline"] == pytest.approx(r["history_baseline"], rel=0.01), key

        # nothing new: the next refresh writes no summary
        before = _summaries(store)
        assert view.refresh().error is None and _summaries(store) == before
        # a batch of stored rows only (an agent's replay) leaves the summaries current
        assert store.ingest(row_tuples(store.scan_results("s2")[:3]), 2e9) == (0, 3)
        past, (_, samples) = store.earlier_scans(20)
        assert len(past) == 6 * devices and samples == []
        # a late sample of a past scan: that device's scan is read from its samples again
        late = _drifting_scan(4, np.random.default_rng(9), 1e9 + 4000.0)[0]
        late.update(sample=99, value=780.0)
        late["id"] = result_id(late)
        assert store.ingest(row_tuples([late]), 2e9 + 1) == (1, 0)
        past, (cols, samples) = store.earlier_scans(20)
        assert {(r[cols.index("gpu")], r[cols.index("scan_id")]) for r in samples} == {(late["gpu"], "s4")}
        assert len(samples) == 6 and len(past) == 6 * devices - 1
        assert view.refresh().error is None  # an older scan's summary is not rewritten: its samples stay in use
        assert [len(store.earlier_scans(20)[0]), len(store.earlier_scans(20)[1][1])] == [6 * devices - 1, 6]
    finally:
        view.stop()
        store.close()


def test_summaries_outlive_the_raw_results_and_are_pruned_after_summary_retention(db_url):
    import numpy as np

    from straggler.collector.retention import Retention

    day, rng = 86400.0, np.random.default_rng(5)
    store = Store(db_url)
    view = FleetView(store)
    try:
        for scan, at in ((0, 1e9), (1, 1e9 + 40 * day), (2, 1e9 + 41 * day)):
            store.ingest(row_tuples(_drifting_scan(scan, rng, at)), at + 60)
            assert view.refresh().error is None

        def scans() -> list[str]:
            past, (cols, samples) = store.earlier_scans(20)
            return sorted({r[1] for r in past.rows()} | {r[cols.index("scan_id")] for r in samples})

        assert scans() == ["s0", "s1"]
        keep = Retention(store, 30 * day, clock=lambda: 1e9 + 41.5 * day, summary_keep_s=60 * day)
        assert keep.prune_once() == 160 and store.count_results("s0") == 0 and keep.pruned_summaries == 0
        assert scans() == ["s0", "s1"]  # s0 is history still, from its summaries
        assert view.refresh().error is None and view.snapshot.summary["history_rows"] == 2 * 32
        shorter = Retention(store, 30 * day, clock=lambda: 1e9 + 41.5 * day, summary_keep_s=35 * day, chunk_rows=7)
        assert shorter.prune_once() == 0 and shorter.pruned_summaries == 32
        assert scans() == ["s1"]  # and with its summaries gone, s0 is too
        left = store._reader.execute("SELECT DISTINCT scan_id FROM probe_scans ORDER BY 1").fetchall()
        assert [r[0] for r in left] == ["s1", "s2"]
    finally:
        view.stop()
        store.close()


def test_a_scan_whose_summary_went_stale_leaves_the_history_with_its_raw_rows(db_url):
    """A batch that stores new rows and replays a stored row of the previous scan makes that scan's
    summary stale (its samples are read instead); once retention prunes those samples the scan must
    go too, not hold a place in the device's history with nothing to read. (From a review's
    reproducer.)"""
    import numpy as np

    from straggler.collector.retention import Retention

    day, t = 86400.0, 1e9
    store = Store(db_url)
    view, rng = FleetView(store), np.random.default_rng(5)
    try:
        s0 = _drifting_scan(0, rng, t)
        store.ingest(row_tuples(s0), t + 60)
        view.refresh()
        store.ingest(row_tuples(_drifting_scan(1, rng, t + day) + s0[:1]), t + day + 60)  # s0's first row again
        view.refresh()
        store.ingest(row_tuples(_drifting_scan(2, rng, t + 2 * day)), t + 2 * day + 60)
        view.refresh()
        _, (cols, samples) = store.earlier_scans(20)
        assert {r[cols.index("scan_id")] for r in samples} == {"s0"} and len(samples) == 5  # its samples, for now
        Retention(store, 30 * day, clock=lambda: t + 31 * day).prune_once()
        summaries, (_, samples) = store.earlier_scans(20)
        assert samples == [] and sum(r[1] == "s0" for r in summaries.rows()) == 31
        stale = (s0[0]["host"], s0[0]["gpu"], s0[0]["probe"], s0[0]["settings"] or "")
        kept = store._reader.execute("SELECT host, gpu, probe, settings, scan_id FROM probe_scans").fetchall()
        assert stale + ("s0",) not in kept and stale + ("s1",) in kept and len(kept) == 3 * 32 - 1
    finally:
        view.stop()
        store.close()
