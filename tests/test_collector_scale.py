"""The collector at fleet scale (issue 13): the analysis off the ingest path gives the same view."""

from straggler.collector.fleet import FleetView
from straggler.collector.store import Store, row_tuples
from test_collector_api import make_rows


def _fleet(store: Store) -> None:
    for k in range(3):  # history: three earlier scans of two hosts
        for host in ("a", "b"):
            store.ingest(row_tuples(make_rows(host, n_gpus=8, scan_id=f"old{k}", ts=1e9 + 100.0 * k, samples=4)), 1.0)
    store.ingest(row_tuples(make_rows("a", n_gpus=8, scan_id="now", ts=1e9 + 1000, samples=4, slow=(5,))
                            + make_rows("b", n_gpus=8, scan_id="now", ts=1e9 + 1000, samples=4)), 2.0)


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
