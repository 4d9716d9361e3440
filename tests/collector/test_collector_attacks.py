"""Attacks on the collector (issue 10), each reproduced over real HTTP on 127.0.0.1 with a real
SQLite file: rows that lie about time, batches too large to parse, rows without a scan id, and the
scan list past SQLite's variable limit. The connection attacks (half-open clients) are in
tests/collector/test_collector_guard.py."""

import sqlite3
import time
from dataclasses import replace

import httpx
import pytest

from straggler.collector.fleetpages import REBUILD_S
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings
from straggler.collector.store import Store
from straggler.records import result_id
from test_collector_api import AUTH, TOKEN, make_rows, peer_ratio_analyze
from postgres import BACKENDS, database, pg_server  # noqa: F401 (fixtures: server runs on SQLite and PostgreSQL)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    db = database(request, tmp_path_factory.mktemp("attacks") / "collector.db")
    settings = CollectorSettings(
        port=0, db_path=db, max_batch_rows=50, analysis_debounce_s=0.05, analysis_max_delay_s=1.0
    )
    with BackgroundCollector(settings, TOKEN, analyze=peer_ratio_analyze) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as client:
            srv.client = client
            srv.settings = settings
            yield srv


def stored(server, host):
    return server.collector.store._reader.execute("SELECT COUNT(*) FROM results WHERE host = ?", (host,)).fetchone()[0]


def test_a_row_dated_in_the_future_is_refused_naming_it(server):
    """One row from a clock an hour ahead would make its scan the device's latest for good (and
    hide a later straggler): 422 naming the row, nothing of the batch stored."""
    now = time.time()
    rows = make_rows("future", n_gpus=2, ts=now - 60)
    rows[3]["ts"] = now + 3600
    rows[3]["id"] = result_id(rows[3])
    r = server.client.post("/api/v1/results", json={"host": "future", "results": rows})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("results[3].ts: ") and "ahead of the collector's clock" in r.json()["detail"]
    assert stored(server, "future") == 0
    # within the skew it is taken, and its age is 0, never negative
    rows[3]["ts"] = now + 60
    rows[3]["id"] = result_id(rows[3])
    assert server.client.post("/api/v1/results", json={"host": "future", "results": rows}).status_code == 200
    gpu = rows[3]["gpu"]
    deadline = time.monotonic() + 30 * server.settings.analysis_max_delay_s
    while time.monotonic() < deadline:
        mine = [g for g in server.client.get("/api/v1/gpus").json()["gpus"] if g["gpu"] == gpu]
        if mine:
            break
        time.sleep(0.05)
    assert mine and mine[0]["last_probe_age_s"] == 0.0
    ages = [
        line
        for line in server.client.get("/metrics").text.splitlines()
        if line.startswith("straggler_gpu_last_probe_age_seconds{") and gpu in line
    ]
    assert ages and float(ages[0].rsplit(" ", 1)[1]) == 0.0


def test_a_row_dated_before_its_cluster_scan_started_is_refused(server):
    c = server.client
    c.get("/api/v1/scans/next", params={"host": "early", "wait_s": 0})
    scan = c.post(
        "/api/v1/scans", json={"probes": ["matmul"], "duration_s": 1, "hosts": ["early"], "start_delay_s": 0}
    ).json()
    rows = make_rows("early", n_gpus=1, scan_id=scan["scan_id"], ts=scan["start_at"] - 7200)
    r = c.post("/api/v1/results", json={"host": "early", "results": rows})
    assert r.status_code == 422 and r.json()["detail"].startswith("results[0].ts: "), r.text
    assert f"before the start of scan {scan['scan_id']!r}" in r.json()["detail"]
    rows = make_rows("early", n_gpus=1, scan_id=scan["scan_id"], ts=scan["start_at"] + 1)
    assert c.post("/api/v1/results", json={"host": "early", "results": rows}).status_code == 200


def test_the_clock_offset_of_each_agent_is_recorded_and_exported(server):
    rows = make_rows("skewed", n_gpus=1, ts=time.time() - 10)
    r = server.client.post(
        "/api/v1/results",
        json={"host": "skewed", "results": rows},
        headers={"X-Straggler-Sent-Ts": str(time.time() - 42.0)},
    )
    assert r.status_code == 200, r.text
    line = [
        x
        for x in server.client.get("/metrics").text.splitlines()
        if x.startswith('straggler_collector_agent_clock_offset_seconds{host="skewed"}')
    ]
    assert line and 42.0 <= float(line[0].rsplit(" ", 1)[1]) < 42.0 + 30  # network delay on top
    # a bad header is ignored, not an error: the batch is still stored
    r = server.client.post(
        "/api/v1/results",
        json={"host": "skewed2", "results": make_rows("skewed2", n_gpus=1)},
        headers={"X-Straggler-Sent-Ts": "nan"},
    )
    assert r.status_code == 200 and "skewed2" not in server.client.get("/metrics").text


def test_an_agents_uploads_carry_its_clock_and_the_collector_exports_the_offset(server, tmp_path):
    """The agent's own uploader (agent/uploader.py) against the collector: the offset of a host
    whose clock agrees with ours is about 0 (before, agents sent no clock: no offset at all)."""
    from straggler.agent.settings import AgentSettings
    from straggler.agent.spool import Spool
    from straggler.agent.uploader import Uploader

    (tmp_path / "token").write_text(TOKEN + "\n")
    settings = AgentSettings(collector_url=server.url, token_file=tmp_path / "token", http_timeout_s=30)
    spool = Spool(tmp_path / "spool.sqlite")
    try:
        spool.add_results(make_rows("clocked", n_gpus=1, ts=time.time() - 10), host="clocked")
        up = Uploader(settings, spool, "clocked")
        t0 = time.monotonic()
        assert up.flush(60) and spool.count() == 0
        took_s = time.monotonic() - t0
        up.close()
    finally:
        spool.close()
    line = [
        x
        for x in server.client.get("/metrics").text.splitlines()
        if x.startswith('straggler_collector_agent_clock_offset_seconds{host="clocked"}')
    ]
    assert line, "no clock offset exported for the agent's host"
    assert 0.0 <= float(line[0].rsplit(" ", 1)[1]) <= took_s  # one clock: the offset is the delivery time


def test_too_many_rows_is_413_before_the_rows_are_parsed(server):
    """The row count is checked on the raw bytes: a batch over max_batch_rows is 413 even when a
    row is invalid (parsed first, it was a 422, after the whole batch was turned into dicts)."""
    rows = make_rows("big", n_gpus=20, samples=3)  # 60 > 50
    rows[0]["value"] = "fast"
    r = server.client.post("/api/v1/results", json={"host": "big", "results": rows})
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == "results: 60 rows, more than max_batch_rows=50"
    # "id" as a value is not a row: 30 rows holding 90 more "id" strings are taken
    rows = make_rows("big", n_gpus=30, samples=1, model="id", driver="id", settings="id")
    r = server.client.post("/api/v1/results", json={"host": "big", "results": rows})
    assert r.status_code == 200 and r.json()["accepted"] == 30, r.text


def test_rows_without_scan_id_and_sample_are_stored_by_their_own_id(server):
    """Rows without scan_id and sample (e.g. a periodic probe posted by hand) were collapsed to one
    per device, probe and settings: every later one was counted a duplicate and dropped."""
    rows = make_rows("noscan", n_gpus=2, samples=3, scan_id=None)
    for r in rows:
        r["sample"] = None
        r["id"] = result_id(r)
    r = server.client.post("/api/v1/results", json={"host": "noscan", "results": rows})
    assert r.json() == {"accepted": 6, "duplicates": 0}
    assert stored(server, "noscan") == 6
    # the same rows again are duplicates
    assert server.client.post("/api/v1/results", json={"host": "noscan", "results": rows}).json() == {
        "accepted": 0,
        "duplicates": 6,
    }


def test_the_scan_list_needs_no_sql_variable_per_scan(tmp_path):
    """``GET /api/v1/scans?limit=`` used one SQL variable per scan: past 999 (SQLite before 3.32)
    listing failed. The reader here is limited to 999 variables, as such a SQLite is."""
    store = Store(tmp_path / "c.db")
    try:
        for i in range(1200):
            store.create_scan(
                {
                    "scan_id": f"s{i:05d}",
                    "created_ts": float(i),
                    "start_at": float(i) + 10,
                    "probes": ["matmul"],
                    "duration_s": 1.0,
                    "hosts": ["a", "b"],
                }
            )
        store._reader.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        scans = store.list_scans(1200)
        assert len(scans) == 1200 and scans[0]["scan_id"] == "s01199"
        assert scans[-1]["nodes"] == {"a": "pending", "b": "pending"}
    finally:
        store.close()


def test_the_scan_poll_is_an_indexed_lookup_and_old_scans_are_pruned(tmp_path):
    """3,000 agents poll ``next_scan``: it must find a host's pending nodes by index, not read every
    node of every scan; and the scan tables keep only ``scan_retention_s`` of scans."""
    store = Store(tmp_path / "c.db")
    try:
        for i in range(50):
            store.create_scan(
                {
                    "scan_id": f"old{i}",
                    "created_ts": 1000.0 + i,
                    "start_at": 1010.0 + i,
                    "probes": ["matmul"],
                    "duration_s": 1.0,
                    "hosts": [f"n{j}" for j in range(20)],
                }
            )
        plan = [
            r[-1]
            for r in store._reader.execute(
                "EXPLAIN QUERY PLAN SELECT s.* FROM scans s JOIN scan_nodes n ON s.scan_id = n.scan_id "
                "WHERE n.host = ? AND n.state = 'pending' AND s.start_at >= ? ORDER BY s.created_ts LIMIT 1",
                ("n1", 0.0),
            )
        ]
        assert any("USING INDEX scan_nodes_host (host=? AND state=?)" in p for p in plan), plan
        assert store.next_scan("n1", 0.0)["scan_id"] == "old0"
        store.create_scan(
            {
                "scan_id": "new",
                "created_ts": 5000.0,
                "start_at": 5010.0,
                "probes": ["matmul"],
                "duration_s": 1.0,
                "hosts": ["n1"],
            },
            prune_before=5000.0 - 100,
        )
        assert [s["scan_id"] for s in store.list_scans(100)] == ["new"]
        assert store._reader.execute("SELECT COUNT(*) FROM scan_nodes").fetchone()[0] == 1
        assert store.next_scan("n1", 0.0)["scan_id"] == "new"
    finally:
        store.close()


def _fleet_server(tmp_path, **kw):
    # the test's own refresh() is the only analysis: a background one after the upload would
    # publish a second snapshot (a second page build, a new ETag) at a moment a busy machine chooses
    settings = CollectorSettings(
        port=0, db_path=tmp_path / "c.db", analysis_debounce_s=3600.0, analysis_max_delay_s=3600.0, **kw
    )
    srv = BackgroundCollector(settings, TOKEN, analyze=peer_ratio_analyze)
    rows = [
        r
        for h in ("ra", "rb", "rc")
        for r in make_rows(h, n_gpus=4, slow=(1,) if h == "rb" else (), ts=time.time() - 30)
    ]
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
        assert c.post("/api/v1/results", json={"host": "r", "results": rows}).status_code == 200
    srv.collector.fleet.refresh()
    return srv


def test_fleet_reads_are_one_cached_page_with_etag_and_gzip(tmp_path):
    """Readers of an unchanged fleet get the same serialized page (built once), 304 for the ETag
    they hold, and gzip when they accept it: six readers cannot make the collector serialize a
    20,000-GPU fleet six times over."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    srv = _fleet_server(tmp_path)
    try:
        pages = srv.app.state.fleet_pages
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            before = pages.builds
            with ThreadPoolExecutor(6) as pool:
                replies = list(
                    pool.map(lambda _: c.get("/api/v1/gpus", headers={"Accept-Encoding": "identity"}), range(6))
                )
            assert pages.builds - before <= 1  # within REBUILD_S: one build for all six
            assert {r.content for r in replies} == {replies[0].content}
            etag = replies[0].headers["etag"]
            assert json.loads(replies[0].content)["total"] == 12
            assert c.get("/api/v1/gpus", headers={"If-None-Match": etag}).status_code == 304
            # a page rebuilt only for its probe ages (past REBUILD_S) is the same fleet view: still 304
            pages._pages["gpus"] = replace(pages._pages["gpus"], built_mono=time.monotonic() - 2 * REBUILD_S)
            again = c.get("/api/v1/gpus", headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.headers["etag"] == etag
            # a new analysis is a new snapshot: a new ETag, and the page is sent
            srv.collector.fleet.refresh()
            fresh = c.get("/api/v1/gpus", headers={"If-None-Match": etag})
            assert fresh.status_code == 200 and fresh.headers["etag"] != etag
            gz = c.get("/api/v1/gpus", headers={"Accept-Encoding": "gzip"})
            assert gz.headers["content-encoding"] == "gzip" and gz.json()["total"] == 12  # httpx decodes it
    finally:
        srv.stop()


def test_a_page_that_was_slow_to_build_is_rebuilt_for_its_probe_ages_less_often(tmp_path):
    """A page is rebuilt for its probe ages past REBUILD_S, or past 1 / MAX_BUILD_SHARE times its
    build's duration where that is longer: at 100,000 GPUs a build holds the GIL for seconds, and
    rebuilt every REBUILD_S for readers polling back to back it stalled uploads past the agent's timeout."""
    from straggler.collector.fleetpages import MAX_BUILD_SHARE

    srv = _fleet_server(tmp_path)
    try:
        pages = srv.app.state.fleet_pages
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            c.get("/api/v1/gpus")
            page = pages._pages["gpus"]
            assert 0 < page.build_s < REBUILD_S * MAX_BUILD_SHARE and page.max_age_s == REBUILD_S  # 12 devices
            age_s = 2 * REBUILD_S
            # built in 3 s: good for 30 s of probe ages, so not rebuilt at 10 s
            pages._pages["gpus"] = replace(page, built_mono=time.monotonic() - age_s, build_s=3.0)
            before = pages.builds
            c.get("/api/v1/gpus")
            assert pages.builds == before and pages._pages["gpus"].max_age_s == 3.0 / MAX_BUILD_SHARE
            # built in 0.5 s: good for REBUILD_S, so rebuilt at 10 s
            pages._pages["gpus"] = replace(page, built_mono=time.monotonic() - age_s, build_s=0.5)
            c.get("/api/v1/gpus")
            assert pages.builds == before + 1
    finally:
        srv.stop()


def test_fleet_reads_filter_by_host_and_verdict_and_page(tmp_path):
    srv = _fleet_server(tmp_path)
    try:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            doc = c.get("/api/v1/gpus", params={"host": "rb"}).json()
            assert doc["total"] == 4 and {g["host"] for g in doc["gpus"]} == {"rb"}
            verdicts = {g["verdict"] for g in c.get("/api/v1/gpus").json()["gpus"]}
            for v in verdicts - {None}:
                mine = c.get("/api/v1/gpus", params={"verdict": v}).json()["gpus"]
                assert mine and {g["verdict"] for g in mine} == {v}
            first = c.get("/api/v1/gpus", params={"limit": 5}).json()
            rest = c.get("/api/v1/gpus", params={"limit": 5, "offset": 5}).json()
            every = c.get("/api/v1/gpus").json()["gpus"]
            assert first["total"] == rest["total"] == 12
            assert [g["gpu"] for g in first["gpus"] + rest["gpus"]] == [g["gpu"] for g in every[:10]]
            r = c.get("/api/v1/gpus", params={"verdict": "fast"})
            assert r.status_code == 422 and r.json()["detail"].startswith("verdict: ")
    finally:
        srv.stop()


def test_fleet_reads_need_the_token_unless_open_reads(tmp_path):
    srv = _fleet_server(tmp_path)
    try:
        r = httpx.get(srv.url + "/api/v1/gpus", timeout=30)
        assert r.status_code == 401 and "open_reads = true" in r.json()["detail"]
        assert httpx.get(srv.url + "/api/v1/gpus/GPU-ra-0/history", timeout=30).status_code == 401
        assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200
    finally:
        srv.stop()
    srv = _fleet_server(tmp_path, open_reads=True)
    try:
        assert httpx.get(srv.url + "/api/v1/gpus", timeout=30).json()["total"] == 12
        assert httpx.get(srv.url + "/api/v1/stragglers", timeout=30).status_code == 200
        r = httpx.post(srv.url + "/api/v1/results", json={"host": "x", "results": []}, timeout=30)
        assert r.status_code == 401  # the open view is read-only
        assert httpx.get(srv.url + "/api/v1/scans", timeout=30).status_code == 401
    finally:
        srv.stop()


def test_a_full_database_answers_json_507_and_healthz_says_so(tmp_path):
    """SQLite's "database or disk is full" (SQLITE_FULL: here from max_page_count, the same error a
    full disk gives) was a bare 500; now JSON 507, nothing stored, and /healthz 503 until a write
    succeeds again."""
    srv = BackgroundCollector(CollectorSettings(port=0, db_path=tmp_path / "c.db"), TOKEN, analyze=peer_ratio_analyze)
    try:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
            writer = srv.collector.store._writer
            pages = writer.execute("PRAGMA page_count").fetchone()[0]
            writer.execute(f"PRAGMA max_page_count = {pages + 2}")
            rows = make_rows("full", n_gpus=50, samples=5, ts=time.time(), driver="x" * 500)
            r = c.post("/api/v1/results", json={"host": "full", "results": rows})
            assert r.status_code == 507, r.text
            assert "database is full" in r.json()["detail"]
            assert stored(srv, "full") == 0
            h = c.get("/healthz")
            assert h.status_code == 503 and h.json()["problem"].startswith("database cannot be written: ")
            writer.execute("PRAGMA max_page_count = 1073741823")
            assert c.post("/api/v1/results", json={"host": "full", "results": rows}).status_code == 200
            assert c.get("/healthz").status_code == 200
    finally:
        srv.stop()


def test_a_corrupt_database_fails_healthz_at_start(tmp_path):
    """A database file damaged on disk (an index page overwritten) opens, but fails PRAGMA
    quick_check: /healthz says so (503) instead of "ok"."""
    db = tmp_path / "c.db"
    store = Store(db)
    from straggler.collector.store import row_tuples

    for k in range(20):
        store.ingest(row_tuples(make_rows(f"h{k}", n_gpus=8, samples=5, driver="d" * 200)), 1.0)
    store._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = store._writer.execute("PRAGMA page_size").fetchone()[0]
    root = store._writer.execute("SELECT rootpage FROM sqlite_master WHERE name = 'results_device'").fetchone()[0]
    store.close()
    with open(db, "r+b") as f:  # the index's root page: garbage, keeping the file's size
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    srv = BackgroundCollector(CollectorSettings(port=0, db_path=db), TOKEN, analyze=peer_ratio_analyze)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            deadline = time.monotonic() + 60
            while c.get("/healthz").json()["database"]["quick_check"] is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            h = c.get("/healthz")
            assert h.status_code == 503, h.text
            assert h.json()["problem"].startswith("database fails PRAGMA quick_check: ")
    finally:
        srv.stop()


def test_an_acknowledged_batch_is_synced_at_commit(tmp_path):
    """synchronous=FULL in WAL mode: the WAL is synced at every commit, so an acknowledged batch
    survives power loss (NORMAL would sync only at checkpoints)."""
    store = Store(tmp_path / "c.db")
    try:
        assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()
