"""The history kept in the analysis process (collector/history.py): after every kind of change a
read gives what the store's own read of the whole history gives in the same snapshot."""

import numpy as np
import pytest
from postgres import db_url, pg_server  # noqa: F401 (fixtures)
from straggler.collector.fleet import FleetView
from straggler.collector.history import HistoryCache
from straggler.collector.latest import LatestSamples
from straggler.collector.retention import Retention
from straggler.collector.store import _CURRENT_SUMMARIES, CURRENT_COLUMNS, Store, row_tuples
from straggler.records import result_id
from test_collector_api import make_rows

HOSTS = ("a", "b", "c")
PROBES = (("matmul", "n=8192", "TFLOP/s", 790.0), ("membw", None, "GB/s", 3000.0))
DAY = 86400.0


def _scan(scan_id: str, ts: float, rng, hosts=HOSTS, gpus=4, probes=PROBES, samples=3, factor=None) -> list[dict]:
    """One scan of ``hosts`` x ``gpus`` x ``probes`` x ``samples`` noisy samples (``factor``: GPU -> slowdown)."""
    rows = []
    for host in hosts:
        for probe, settings, unit, base in probes:
            for r in make_rows(host, gpus, scan_id, ts, probe=probe, samples=samples, settings=settings, unit=unit):
                r["value"] = base * (factor or {}).get(r["gpu"], 1.0) * (1 + 0.004 * rng.standard_normal())
                r["id"] = result_id(r)
                rows.append(r)
    return rows


def _row(r) -> tuple:
    """A sample row with its numbers as floats and None for missing (a DataFrame's column of
    integers with a gap is of floats)."""
    out = []
    for v in r:
        v = v.item() if isinstance(v, np.generic) else v
        missing = v is None or (isinstance(v, float) and v != v)
        out.append(None if missing else float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
    return tuple(out)


def _plain(v):
    """A value as the database gives it: None for a missing number (NaN, and the cache's -2 for
    no summary's writes), numbers as Python numbers."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return None if v == -2 else int(v)
    return float(v) if isinstance(v, (np.floating, float)) else v


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "c.db")
    yield s
    s.close()


def _same(store: Store, cache: HistoryCache, scans: int, latest: LatestSamples | None = None) -> dict:
    """Read the cache and the store in one snapshot; they must hold the same history, and
    ``latest`` (which follows the cache; a fresh one when None) the same latest samples."""
    latest = latest or LatestSamples()
    with store._snapshot():
        past, (cols, samples) = cache.read(store, scans)
        frame = latest.read(store, cache)
        want, (want_cols, want_samples) = store._earlier_scans(scans)
        want_current = store._table(_CURRENT_SUMMARIES)
        want_latest = store.latest_samples()
    assert list(frame.columns) == want_latest[0]
    assert sorted(map(_row, frame.itertuples(index=False)), key=repr) == sorted(map(_row, want_latest[1]), key=repr)
    assert sorted(past.rows(), key=repr) == sorted(want.rows(), key=repr)
    # and each device's latest scan with its summary, as the fleet view's write of summaries reads it
    current = cache.current()
    got = [tuple(_plain(current[c][i]) for c in CURRENT_COLUMNS) for i in range(len(current["host"]))]
    assert want_current[0] == list(CURRENT_COLUMNS)
    assert sorted(got, key=repr) == sorted((tuple(map(_plain, r)) for r in want_current[1]), key=repr)
    assert cols == want_cols and sorted(samples, key=repr) == sorted(want_samples, key=repr)
    return {k: v for k, v in cache.last.items() if k != "summaries"}  # what it did with the scans


@pytest.mark.parametrize("small_rows", [5000, 0], ids=["devices-one-by-one", "devices-by-index"])
def test_a_kept_history_reads_what_the_store_reads_after_every_kind_of_change(db_url, small_rows, monkeypatch):
    import straggler.collector.latest as latest_mod

    monkeypatch.setattr(latest_mod, "SMALL_ROWS", small_rows)  # both lookups of the rows' devices
    rng = np.random.default_rng(1)
    store = Store(db_url)
    view = FleetView(store, history_scans=3)  # thread: the analysis writes the summaries it reads
    cache = view._history
    try:
        t = 1e9
        for k in range(5):  # scans of the whole fleet: a shift each, nothing read again
            store.ingest(row_tuples(_scan(f"s{k}", t + k * DAY, rng)), t + k * DAY + 60)
            assert view.refresh().error is None
            if k:  # the scans changed, and the summaries the refresh before wrote
                assert cache.last == {"whole": 0, "changed": 24, "reread": 0, "summaries": 24}
        assert _same(store, cache, 3, view._latest) == {"whole": 0, "changed": 0, "reread": 0}
        assert len(store._earlier_scans(3)[0]) == 3 * 24  # three past scans of 24 device-probes

        # the latest scan in two batches, a refresh between: its time and writes only
        two = _scan("s5", t + 5 * DAY, rng)
        store.ingest(row_tuples(two[: len(two) // 2]), t + 5 * DAY + 60)
        assert view.refresh().error is None
        store.ingest(row_tuples(two[len(two) // 2 :]), t + 5 * DAY + 61)
        assert view.refresh().error is None and cache.last["reread"] == 0
        assert _same(store, cache, 3, view._latest)["reread"] == 0

        # a replay of stored rows of a past scan changes nothing
        assert store.ingest(row_tuples(store.scan_results("s3")[:2]), t + 6 * DAY)[0] == 0
        assert _same(store, cache, 3, view._latest) == {"whole": 0, "changed": 1, "reread": 0}

        # a late sample of a past scan: that device is read again, the scan from its samples
        late = _scan("s4", t + 4 * DAY, rng, hosts=("b",), gpus=1, probes=PROBES[:1], samples=1)[0]
        late.update(sample=7)
        late["id"] = result_id(late)
        assert store.ingest(row_tuples([late]), t + 6 * DAY + 1) == (1, 0)
        assert _same(store, cache, 3, view._latest) == {"whole": 0, "changed": 1, "reread": 1}
        assert len(store._earlier_scans(3)[1][1]) == 4  # s4 of that device: its 3 samples and the late one

        # one node's scan; two scans of another at once; a new node
        store.ingest(row_tuples(_scan("a6", t + 6 * DAY, rng, hosts=("a",))), t + 6 * DAY + 60)
        store.ingest(row_tuples(_scan("b6", t + 6 * DAY, rng, hosts=("b",))), t + 6 * DAY + 60)
        store.ingest(row_tuples(_scan("b7", t + 7 * DAY, rng, hosts=("b",))), t + 7 * DAY + 60)
        store.ingest(row_tuples(_scan("d7", t + 7 * DAY, rng, hosts=("d",))), t + 7 * DAY + 60)
        assert _same(store, cache, 3, view._latest) == {"whole": 0, "changed": 8 + 16 + 8, "reread": 16}
        assert view._latest.last == {"whole": 0, "devices": 24}  # the latest samples of a, b and d read again
        assert view.refresh().error is None

        # a scan of the same time as the latest (the order falls to the scan ids): read again
        store.ingest(row_tuples(_scan("a6x", t + 6 * DAY, rng, hosts=("a",))), t + 7 * DAY + 90)
        assert _same(store, cache, 3, view._latest)["reread"] == 8
        store.ingest(row_tuples(_scan("a8", t + 8 * DAY, rng, hosts=("a",))), t + 8 * DAY + 60)
        assert _same(store, cache, 3, view._latest)["whole"] == 0

        # retention deletes history rows: the next read is whole
        Retention(store, 2.5 * DAY, clock=lambda: t + 8.5 * DAY, summary_keep_s=4.5 * DAY).prune_once()
        assert _same(store, cache, 3, view._latest)["whole"] == 1 and view._latest.last["whole"] == 1
        assert _same(store, cache, 3, view._latest) == {"whole": 0, "changed": 0, "reread": 0}
        assert view._latest.last == {"whole": 0, "devices": 0}
        # another history length: whole
        assert _same(store, cache, 5, view._latest)["whole"] == 1

        # a fresh copy (another process) reads the same
        assert _same(store, HistoryCache(), 3)["whole"] == 1
    finally:
        view.stop()
        store.close()


def test_a_refresh_with_the_kept_history_decides_as_one_that_reads_it_all(store):
    rng = np.random.default_rng(2)
    kept = FleetView(store, history_scans=4)
    try:
        for k in range(7):
            slow = {"GPU-a-1": 0.94} if k >= 4 else {}  # GPU-a-1 loses 6% from scan 4 on: its own history shows it
            store.ingest(row_tuples(_scan(f"s{k}", 1e9 + k * DAY, rng, factor=slow)), 1e9 + k * DAY + 60)
            snap = kept.refresh()
            fresh = FleetView(store, history_scans=4).refresh()  # a new copy: the history read whole
            assert snap.error is None and snap.gpus == fresh.gpus and snap.summary == fresh.summary
        assert {g["gpu"]: any(p["degraded"] for p in g["probes"]) for g in snap.gpus}["GPU-a-1"]
    finally:
        kept.stop()


def test_a_read_that_fails_half_way_leaves_the_next_one_whole(store, monkeypatch):
    rng = np.random.default_rng(3)
    cache = HistoryCache()
    store.ingest(row_tuples(_scan("s0", 1e9, rng)), 1e9)
    store.ingest(row_tuples(_scan("s1", 1e9 + DAY, rng)), 1e9 + DAY)
    assert _same(store, cache, 3)["whole"] == 1
    store.ingest(row_tuples(_scan("s2", 1e9 + 2 * DAY, rng, hosts=("z",))), 1e9 + 2 * DAY)

    def broken(*_a):
        raise RuntimeError("the disk went away")

    with monkeypatch.context() as m, pytest.raises(RuntimeError), store._snapshot():
        m.setattr(store, "scan_samples", broken)
        cache.read(store, 3)
    assert _same(store, cache, 3)["whole"] == 1


def test_a_long_lived_copy_forgets_the_scan_ids_it_no_longer_holds(store, monkeypatch):
    from straggler.collector import history

    monkeypatch.setattr(history, "SCAN_IDS_SLACK", 0)
    rng = np.random.default_rng(4)
    cache = HistoryCache()
    for k in range(12):  # one node's scans, each its own scan id
        store.ingest(row_tuples(_scan(f"n{k}", 1e9 + k * DAY, rng, hosts=("a",), gpus=1)), 1e9 + k * DAY)
        _same(store, cache, 1)
        assert len(cache.scan_ids) <= 2 * cache.cols["scan"].size  # 2 device-probes x 2 slots
    assert {"n10", "n11"} <= set(cache.scan_ids) and len(cache.scan_ids) < 12  # forgotten, not only bounded


def test_the_kept_history_takes_the_summaries_whoever_wrote_them(store, monkeypatch):
    """From a review's reproducers: a summary write that fails after its first chunk committed,
    and a second fleet view (another replica's refresh leader) writing summaries between two of the
    first one's refreshes; the kept history must hold the summaries the store holds."""
    import sqlite3

    from straggler.collector import store as store_module

    monkeypatch.setattr(store_module, "SUMMARY_CHUNK_ROWS", 10)  # 24 summaries a refresh: 3 transactions
    rng = np.random.default_rng(6)
    view, other = FleetView(store, history_scans=3), FleetView(store, history_scans=3)
    t = 1e9
    try:
        for k in range(3):
            store.ingest(row_tuples(_scan(f"s{k}", t + k * DAY, rng)), t + k * DAY + 60)
            assert view.refresh().error is None
        store.ingest(row_tuples(_scan("s3", t + 3 * DAY, rng)), t + 3 * DAY + 60)
        real, calls = store._retrying, []

        def second_chunk_fails(write):
            calls.append(1)
            if len(calls) == 2:
                raise sqlite3.OperationalError("database or disk is full")
            return real(write)

        monkeypatch.setattr(store, "_retrying", second_chunk_fails)
        assert view.refresh().error is None  # the verdicts stand; 10 of s3's 24 summaries are stored
        monkeypatch.setattr(store, "_retrying", real)
        stored = store._reader.execute("SELECT COUNT(*) FROM scan_summaries WHERE scan_id = 's3'").fetchone()[0]
        assert stored == 10
        store.ingest(row_tuples(_scan("s4", t + 4 * DAY, rng)), t + 4 * DAY + 60)
        _same(store, view._history, 3)
        assert view.refresh().error is None

        # the other view leads for one scan: it writes s5's summaries, then the first leads again
        store.ingest(row_tuples(_scan("s5", t + 5 * DAY, rng)), t + 5 * DAY + 60)
        assert other.refresh().error is None
        store.ingest(row_tuples(_scan("s6", t + 6 * DAY, rng)), t + 6 * DAY + 60)
        _same(store, view._history, 3)
        past, (_, samples) = store._earlier_scans(3)
        assert len(past) == 3 * 24 - 14 and len(samples) == 14 * 3  # s3's 14 unstored summaries: its samples
    finally:
        view.stop()
        other.stop()


def test_a_kept_history_is_read_whole_at_least_hourly(store):
    cache = HistoryCache()
    store.ingest(row_tuples(_scan("s0", 1e9, np.random.default_rng(7))), 1e9)
    assert _same(store, cache, 3)["whole"] == 1 and _same(store, cache, 3)["whole"] == 0
    cache.whole_at -= 3601.0  # an hour later: whole, whatever changed
    assert _same(store, cache, 3)["whole"] == 1


def test_a_refresh_overtaken_by_a_later_one_leaves_the_summaries_to_it(store):
    """Thread view: refresh A publishes; before it writes its summaries, more rows of the scan land
    and refresh B runs and writes. A's older summaries must not overwrite B's."""
    rng = np.random.default_rng(11)
    view = FleetView(store, history_scans=3)
    scan = _scan("s0", 1e9, rng)
    half = len(scan) // 2 + 1  # one device's samples in both batches
    store.ingest(row_tuples(scan[:half]), 1e9 + 60)
    nested = []

    def meanwhile(snap):
        if not nested:
            nested.append(None)
            store.ingest(row_tuples(scan[half:]), 1e9 + 61)
            nested[0] = view.refresh()  # B, inside A's publication
            assert nested[0].error is None

    view.on_refresh = meanwhile
    assert view.refresh().error is None
    got = {
        tuple(r[:4]): r[4]
        for r in store._reader.execute("SELECT host, gpu, probe, settings, value FROM scan_summaries").fetchall()
    }
    want = {
        (g["host"], g["gpu"], p["probe"], p["settings"] or ""): p["value"] for g in nested[0].gpus for p in g["probes"]
    }
    assert got == want  # the summaries are B's: of every device's rows, with all its peers
    stale = store._reader.execute(
        """SELECT count(*) FROM latest_scans l JOIN probe_scans s ON s.host = l.host AND s.gpu = l.gpu
        AND s.probe = l.probe AND s.settings = l.settings AND s.scan_id = l.scan_id
        LEFT JOIN scan_summaries m ON m.host = l.host AND m.gpu = l.gpu AND m.probe = l.probe
        AND m.settings = l.settings AND m.scan_id = l.scan_id WHERE m.writes IS NULL OR m.writes != s.writes"""
    ).fetchone()[0]
    assert stale == 0  # every latest scan's summary is of its present rows


def test_a_device_the_kept_history_missed_resets_it(store, monkeypatch):
    """A writer that does not mark its rows (an older replica) adds a device: the read of the
    latest samples fails once and resets the kept history; the next refresh reads both whole."""
    import straggler.collector.latest as latest_mod

    rng = np.random.default_rng(12)
    view = FleetView(store, history_scans=3)
    store.ingest(row_tuples(_scan("s0", 1e9, rng)), 1e9 + 60)
    assert view.refresh().error is None
    store.ingest(row_tuples(_scan("d0", 1e9 + 10, rng, hosts=("d",))), 1e9 + 70)
    store._writer.execute("UPDATE probe_scans SET changed = -1 WHERE host = 'd'")  # not marked
    store.ingest(row_tuples(_scan("s1", 1e9 + DAY, rng)), 1e9 + DAY + 60)  # a scan of the others
    monkeypatch.setattr(latest_mod, "KEYS_PER_READ", 1)  # so the latest samples are read whole
    with pytest.raises(RuntimeError, match="the kept history does not hold"):
        view.refresh()
    snap = view.refresh()
    assert snap.error is None and {g["host"] for g in snap.gpus if g["probes"]} == {"a", "b", "c", "d"}
    assert view._history.last["whole"] == 1 and view._latest.last["whole"] == 1
