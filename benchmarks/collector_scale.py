"""The collector at fleet scale: refresh time, peak memory, ingest under load, read latency, storage.

For each ``--gpus`` size (8 GPUs a host, ``--probes`` probes a device, ``--samples`` samples a probe,
full canonical rows with telemetry) it builds a database of ``--scans`` earlier scans plus the current
one through the collector's own store, then measures:

- **first refresh**: the fleet view's first refresh, in a child process of its own (wall and CPU
  seconds), as after a restart (the history is read whole); then, as in a running collector whose
  analysis process keeps the history, **refresh (full)**: the refresh after the next scan of the
  whole fleet (ingested there), and **refresh (one node)**: the one after one node's new scan
  (each until its verdicts are published; the per-scan summaries it writes after that, in the
  analysis process before its next analysis, on rows of their own); **peak RSS**: that child's resident-set high-water mark (``VmHWM``), i.e. of the
  collector's store and fleet view (no HTTP server in it);
- **ingest under load**: a real collector process (``straggler collector``, analysis debounced by
  0.2 s so that refreshes run throughout) takes a new full-fleet scan in batches of ``--batch-rows``
  while ``--readers`` threads fetch ``GET /api/v1/gpus`` (gzip) back to back: results/s and the p99
  POST latency, with the number of refreshes that ran meanwhile;
- **GET TTFB**: time to first byte of ``GET /api/v1/gpus`` once the page is cached (median of 10);
- **DB bytes per GPU per scan**: over GPUs x scans stored, SQLite's database file (after a
  checkpoint), or on PostgreSQL ``pg_total_relation_size`` (heap, indexes, TOAST, free-space and
  visibility maps) summed over the tables of the run's schema, after ``VACUUM ANALYZE`` of them (what
  autovacuum does on a live server within a minute; it also gives the refresh's planner statistics);
- **WAL bytes per ingested row** of the last scan: SQLite's ``-wal`` file with checkpoints held off
  for that scan, or on PostgreSQL the ``pg_current_wal_lsn()`` difference around it (all of the
  server's WAL meanwhile), after a ``CHECKPOINT`` (an hourly scan comes after the 5-minute
  checkpoints, so it pays its full-page images; where the role may not checkpoint, the figure is
  printed without one and ``wal_after_checkpoint`` is false).

``--backends sqlite,postgresql`` measures each size on each backend, side by side (the ``backend``
row of the table). SQLite's files live in ``--db`` (a directory). For PostgreSQL the benchmark
starts a throwaway server of its own (``tests/pgserver.py``, the test session's server, but with
PostgreSQL's defaults for ``fsync``, ``synchronous_commit``, ``full_page_writes`` and
``shared_buffers``), or uses ``--pg-url`` (a database on an existing server); each size gets a
schema of its own there (dropped at the end), built and read through ``Store(url)`` and served by a
real ``straggler collector --db URL``. A figure a backend does not give is printed as "-". The
machine is shared: CPU seconds are printed beside wall seconds; the PostgreSQL server's own CPU
seconds (all its processes, reaped backends included) on rows of their own, where the benchmark
started the server ("-" on ``--pg-url``).

    .venv/bin/python benchmarks/collector_scale.py --gpus 1000,10000 [--backends sqlite,postgresql] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # pgserver: the tests' PostgreSQL

from collector_ingest import H100_TELEMETRY
from scan_fanout import TOKEN, _free_port, start_collector

PROBES = (
    ("matmul", "n=8192,dtype=bf16", "TFLOP/s", 790.0),
    ("membw", "bytes=4GiB", "GB/s", 3000.0),
    ("allreduce", "bytes=256MiB,world=8", "GB/s", 180.0),
)
TARGETS = {
    "refresh_full_s": {10_000: 1.0, 100_000: 5.0},
    "refresh_node_s": {100_000: 0.5},
    "peak_rss_mb": {100_000: 1536},
    "ingest_rows_s": 20_000,
    "ttfb_ms": {100_000: 50},
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BACKENDS = ("sqlite", "postgresql")


def _vm(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rows(scan: int, gpus: range, probes: int, samples: int, t0: float) -> list[dict]:
    """One scan's rows of these device numbers (host = device // 8). Device 7 of every 97 is 8% slow."""
    from straggler.records import result_id

    out = []
    ts = t0 + scan * 3600.0
    for d in gpus:
        host, g = f"node{d // 8:05d}", d % 8
        slow = 0.92 if d % 97 == 7 else 1.0
        for p, (probe, settings, unit, base) in enumerate(PROBES[:probes]):
            for k in range(samples):
                jitter = 1.0 + 0.01 * (((d * 31 + k * 7 + scan * 13 + p) % 21) - 10) / 10
                r = {
                    "ts": ts + k,
                    "scan_id": f"scan-{scan:04d}",
                    "host": host,
                    "gpu": f"GPU-{d:06d}",
                    "index": g,
                    "model": "NVIDIA H100 80GB HBM3",
                    "driver": "550.54.15",
                    "probe": probe,
                    "settings": settings,
                    "sample": k,
                    "duration_s": 1.0,
                    "value": base * slow * jitter,
                    "unit": unit,
                    **H100_TELEMETRY,
                    "temp_c": 61.0 + d % 5,
                    "throttle_reasons": "",
                }
                r["id"] = result_id(r)
                out.append(r)
    return out


def ingest(store, batch: list[dict], received_ts: float) -> None:
    from straggler.collector.store import row_tuples

    for i in range(0, len(batch), 20_000):
        store.ingest(row_tuples(batch[i : i + 20_000]), received_ts)


def _pg(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True)


def build(db: str, gpus: int, scans: int, probes: int, samples: int, t0: float, history: str = "summaries") -> dict:
    """Scans 0..scans (the last is the current one) of every device through the collector's store;
    returns the build's wall seconds, the write-ahead log bytes per row of the last scan and the
    database's bytes per GPU per scan (the module's docstring says how each backend gives them).
    ``history`` "summaries": a fleet analysis after each earlier scan, as a running collector does
    when a scan's results arrive, stores that scan's per-scan summaries (``summarise_s``: their
    total wall seconds); "samples": none (the history is read from its samples, as before them)."""
    from straggler.collector.db import is_url
    from straggler.collector.fleet import analyse_stored
    from straggler.collector.store import Store

    pg, res = is_url(db), {}
    if pg:
        import psycopg
    start = time.perf_counter()
    store = Store(db)
    try:
        for s in range(scans + 1):
            if s == scans and pg:
                with _pg(db) as conn:
                    try:
                        conn.execute("CHECKPOINT")
                        res["wal_after_checkpoint"] = True
                    except psycopg.errors.InsufficientPrivilege as e:
                        print(f"collector_scale: no CHECKPOINT before the last scan ({e})", file=sys.stderr)
                        res["wal_after_checkpoint"] = False
                    lsn0 = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            elif s == scans:
                store._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                store._writer.execute("PRAGMA wal_autocheckpoint = 0")
            for first in range(0, gpus, 2000):
                ingest(store, rows(s, range(first, min(gpus, first + 2000)), probes, samples, t0), t0 + s * 3600 + 60)
            if history == "summaries" and s < scans:
                w = time.perf_counter()
                out = analyse_stored(store, scans)
                res["summarise_s"] = res.get("summarise_s", 0.0) + time.perf_counter() - w
                if out["error"] is not None or out["summaries"] != gpus * probes:
                    raise RuntimeError(f"scan {s}: {out['summaries']} summaries stored, error {out['error']}")
        if pg:
            with _pg(db) as conn:
                wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn0,)).fetchone()[0]
        else:
            wal = Path(db + "-wal").stat().st_size
            store._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        res["wal_bytes_per_row"] = float(wal) / (gpus * probes * samples)
    finally:
        store.close()
    res["build_s"] = time.perf_counter() - start
    if pg:
        with _pg(db) as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relkind = 'r'"
                    " AND c.relnamespace = current_schema()::regnamespace"
                ).fetchall()
            ]
            for t in tables:
                conn.execute(f"VACUUM ANALYZE {t}")
            size = sum(conn.execute(f"SELECT pg_total_relation_size('{t}')").fetchone()[0] for t in tables)
    else:
        size = sum(Path(db + s).stat().st_size for s in ("", "-wal") if Path(db + s).exists())
    res["db_bytes_per_gpu_scan"] = size / (gpus * (scans + 1))
    return res


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _refresh_child(
    db: str, gpus: int, scans: int, probes: int, samples: int, t0: float, pg_pid: int | None, out
) -> None:
    """In a fresh process: a first refresh (a restarted collector's: it reads the history whole),
    then, as a running collector, one after the next scan of the whole fleet and one after one
    node's scan (its analysis process keeps the history between them). Where the
    fleet view runs its analysis in a process of its own (``worker="process"``), that process' CPU
    seconds count too, and the peak RSS is the larger of the two processes'. The PostgreSQL server's
    CPU seconds meanwhile (``_db_cpu_s``) where the benchmark started it (``pg_pid``)."""
    import inspect

    from straggler.collector.fleet import FleetView
    from straggler.collector.store import Store

    store = Store(db)
    kw = {"worker": "process"} if "worker" in inspect.signature(FleetView).parameters else {}
    fleet = FleetView(store, history_scans=scans, **kw)
    res = {"analysis_in": kw.get("worker", "thread")}

    def timed(prefix: str) -> object:
        w, c, d = time.perf_counter(), _cpu(), _server_cpu(pg_pid)
        snap = fleet.refresh()
        worker_cpu = getattr(fleet, "last_cpu_s", 0.0) if kw else 0.0
        res.update({f"{prefix}_s": time.perf_counter() - w, f"{prefix}_cpu_s": _cpu() - c + worker_cpu})
        if d is not None:
            res[f"{prefix}_db_cpu_s"] = _server_cpu(pg_pid) - d
        # the per-scan summaries the refresh wrote once its verdicts were out (as a running collector,
        # whose next scan comes minutes later); on a build without that, inside the refresh
        written = fleet.settle() if hasattr(fleet, "settle") else None
        if written is not None:
            res[f"{prefix}_summaries_s"], res[f"{prefix}_summaries_cpu_s"] = written["wall_s"], written["cpu_s"]
        return snap

    res["first_error"] = timed("refresh_first").error  # as after a restart: the history read whole
    for first in range(0, gpus, 2000):  # the next scan of the whole fleet, as a running collector takes it
        ingest(
            store,
            rows(scans + 1, range(first, min(gpus, first + 2000)), probes, samples, t0),
            t0 + (scans + 1) * 3600 + 60,
        )
    snap = timed("refresh_full")
    res.update(error=snap.error, stragglers=sum(bool(g["straggler"]) for g in snap.gpus), devices=len(snap.gpus))
    ingest(store, rows(scans + 2, range(0, 8), probes, samples, t0), t0 + (scans + 2) * 3600 + 60)
    res["node_error"] = timed("refresh_node").error
    if kw:
        fleet.stop()
    res["peak_rss_mb"] = (
        max(_vm("self", "VmHWM"), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024) / 2**20
    )
    store.close()
    out.send(res)


def _readers(url: str, n: int, seconds: float, out) -> None:
    """``n`` threads fetching GET /api/v1/gpus (gzip) back to back for ``seconds``, in a process of
    their own (the POSTs' timing does not share their GIL)."""
    import httpx

    reads, deadline = [0], time.monotonic() + seconds

    def read() -> None:
        while time.monotonic() < deadline:
            # a reader starved of CPU past the collector's header_timeout_s is disconnected: reconnect
            try:
                with httpx.Client(base_url=url, headers={**AUTH, "Accept-Encoding": "gzip"}, timeout=600) as rc:
                    while time.monotonic() < deadline:
                        rc.get("/api/v1/gpus").raise_for_status()
                        reads[0] += 1
            except httpx.TransportError:
                continue

    threads = [threading.Thread(target=read) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.send(reads[0])


def refresh_times(
    db: str, gpus: int, scans: int, probes: int, samples: int, t0: float, pg_pid: int | None = None
) -> dict:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_refresh_child, args=(db, gpus, scans, probes, samples, t0, pg_pid, send))
    p.start()
    res = recv.recv()
    p.join()
    return res


def _analysis_runs(c) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('straggler_collector_analysis_runs_total{outcome="ok"}'):
            return float(line.split()[-1])
    return 0.0


def under_load(
    tmp: Path,
    db: str,
    gpus: int,
    scans: int,
    probes: int,
    samples: int,
    t0: float,
    readers: int,
    batch_rows: int,
    max_rows: int,
    pg_pid: int | None = None,
) -> dict:
    """A real collector on the database: a new full-fleet scan posted while readers poll /api/v1/gpus."""
    import httpx

    from straggler.collector.db import is_url

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_collector(
        tmp,
        port,
        {
            "STRAGGLER_COLLECTOR_ANALYSIS_DEBOUNCE_S": "0.2",
            "STRAGGLER_COLLECTOR_ANALYSIS_MAX_DELAY_S": "1",
            "STRAGGLER_COLLECTOR_HISTORY_SCANS": str(scans),
        },
        db=db if is_url(db) else None,
    )
    res: dict = {}
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=600) as c:
            deadline = time.monotonic() + 3600
            while c.get("/healthz").json()["analysis_ts"] is None and time.monotonic() < deadline:
                time.sleep(0.5)
            c.get("/api/v1/gpus")  # the page is built once per snapshot
            ttfb = []
            for _ in range(10):
                s = time.perf_counter()
                with c.stream("GET", "/api/v1/gpus", headers={"Accept-Encoding": "gzip"}) as r:
                    next(r.iter_raw())
                    ttfb.append(time.perf_counter() - s)
            res["ttfb_ms"] = statistics.median(ttfb) * 1000
            bodies, scan, n = [], scans + 3, 0  # after the refresh child's scans + 1 and + 2
            while n < max_rows:  # new full-fleet scans, each its own scan id: max_rows rows in all
                new = rows(scan, range(gpus), probes, samples, t0)[: max_rows - n]
                bodies += [
                    json.dumps({"host": "bench", "results": new[i : i + batch_rows]}).encode()
                    for i in range(0, len(new), batch_rows)
                ]
                n += len(new)
                scan += 1
            del new
            ctx = mp.get_context("spawn")
            recv, send = ctx.Pipe(duplex=False)
            readers_p = ctx.Process(target=_readers, args=(url, readers, 3600.0, send)) if readers else None
            if readers_p is not None:
                readers_p.start()
                time.sleep(3)  # the readers' process is up and reading
            runs0, cpu0, db0 = _analysis_runs(c), _proc_cpu(server.pid), _server_cpu(pg_pid)
            lat = []
            w = time.perf_counter()
            sent = 0
            for body in bodies:
                s = time.perf_counter()
                r = c.post("/api/v1/results", content=body, headers={"Content-Type": "application/json"})
                r.raise_for_status()
                lat.append(time.perf_counter() - s)
                sent += r.json()["accepted"]
            wall = time.perf_counter() - w
            cpu = _proc_cpu(server.pid) - cpu0
            if db0 is not None:
                res["db_cpu_s"] = _server_cpu(pg_pid) - db0
            runs = _analysis_runs(c) - runs0
            if readers_p is not None:
                readers_p.kill()
                readers_p.join()
            lat.sort()
            res.update(
                ingest_rows_s=sent / wall,
                ingest_rows=sent,
                post_p99_s=lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                post_p50_s=lat[len(lat) // 2],
                post_max_s=lat[-1],
                posts=len(lat),
                refreshes_during=runs,
                collector_cpu_s=cpu,
                ingest_wall_s=wall,
            )
            res["collector_peak_rss_mb"] = max(_vm(p, "VmHWM") for p in _tree(server.pid)) / 2**20
    finally:
        server.terminate()
        server.wait(60)
    return res


def _tree(pid: int) -> list[int]:
    """``pid`` and its live child processes (the collector's analysis process)."""
    out = [pid]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _proc_cpu(pid: int, reaped: bool = False) -> float:
    """CPU seconds of ``pid`` and its live children (``reaped``: and of the children they waited for)."""
    total = 0.0
    for p in _tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in f[11 : 15 if reaped else 13]) / os.sysconf("SC_CLK_TCK")
    return total


def _server_cpu(pid: int | None) -> float | None:
    """CPU seconds of the PostgreSQL server the benchmark started (its postmaster, the backends it
    reaped, its live processes: autovacuum and the checkpointer too); None without one (SQLite, --pg-url)."""
    return None if pid is None else _proc_cpu(pid, reaped=True)


def measure(
    dbdir: str,
    gpus: int,
    scans: int,
    probes: int,
    samples: int,
    readers: int,
    batch_rows: int,
    load_rows: int,
    pg_url: str | None = None,
    pg_pid: int | None = None,
    history: str = "summaries",
) -> dict:
    """One fleet size on SQLite (a file under ``dbdir``), or on PostgreSQL where ``pg_url`` names a
    database: a schema of its own there, dropped at the end."""
    from pgserver import new_schema

    load_scans = -(-load_rows // (gpus * probes * samples))
    t0 = time.time() - (scans + 4 + load_scans) * 3600  # every scan in the past
    tmp = Path(tempfile.mkdtemp(prefix=f"scale{gpus}-", dir=dbdir))
    schema = f"scale{gpus}_{os.getpid()}"
    db = new_schema(pg_url, schema) if pg_url else str(tmp / "c.db")  # the collector's --db
    res = {"backend": "postgresql" if pg_url else "sqlite", "gpus": gpus, "scans": scans + 1}
    res.update(probes=probes, samples=samples, history=history)
    try:
        res.update(build(db, gpus, scans, probes, samples, t0, history))
        res["rows"] = gpus * probes * samples * (scans + 1)
        res.update(refresh_times(db, gpus, scans, probes, samples, t0, pg_pid))
        print(json.dumps(res), file=sys.stderr, flush=True)  # a partial result survives a later failure
        if readers >= 0:
            res.update(under_load(tmp, db, gpus, scans, probes, samples, t0, readers, batch_rows, load_rows, pg_pid))
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
        if pg_url:
            with _pg(pg_url) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return res


def _target(name: str, gpus: int) -> str:
    t = TARGETS[name]
    if isinstance(t, dict):
        return f"<= {t[gpus]:g}" if gpus in t else ""
    return f">= {t:g}"


def table(results: list[dict]) -> str:
    figs = [
        ("first refresh (after a restart): wall s", "refresh_first_s", "{:.2f}"),
        ("refresh, full-fleet scan: wall s", "refresh_full_s", "{:.2f}"),
        ("  CPU s", "refresh_full_cpu_s", "{:.2f}"),
        ("  PostgreSQL server CPU s", "refresh_full_db_cpu_s", "{:.2f}"),
        ("  then its summaries written: wall s", "refresh_full_summaries_s", "{:.2f}"),
        ("    CPU s", "refresh_full_summaries_cpu_s", "{:.2f}"),
        ("refresh, one node's scan: wall s", "refresh_node_s", "{:.2f}"),
        ("  CPU s", "refresh_node_cpu_s", "{:.2f}"),
        ("  PostgreSQL server CPU s", "refresh_node_db_cpu_s", "{:.2f}"),
        ("  then its summaries written: wall s", "refresh_node_summaries_s", "{:.2f}"),
        ("peak RSS (store + fleet view), MB", "peak_rss_mb", "{:.0f}"),
        ("collector's largest process peak RSS, MB", "collector_peak_rss_mb", "{:.0f}"),
        ("ingest under load, results/s", "ingest_rows_s", "{:.0f}"),
        ("  POST p50, s", "post_p50_s", "{:.3f}"),
        ("  POST p99, s", "post_p99_s", "{:.3f}"),
        ("  POST max, s", "post_max_s", "{:.3f}"),
        ("  refreshes meanwhile", "refreshes_during", "{:.0f}"),
        ("  POSTs", "posts", "{:.0f}"),
        ("  collector CPU s meanwhile", "collector_cpu_s", "{:.1f}"),
        ("  PostgreSQL server CPU s meanwhile", "db_cpu_s", "{:.1f}"),
        ("  ingest wall s", "ingest_wall_s", "{:.1f}"),
        ("GET /api/v1/gpus TTFB, ms", "ttfb_ms", "{:.1f}"),
        ("DB bytes per GPU per scan", "db_bytes_per_gpu_scan", "{:.0f}"),
        ("WAL bytes per ingested row", "wal_bytes_per_row", "{:.0f}"),
        ("rows stored", "rows", "{:,}"),
        ("history read as", "history", "{}"),
        ("build: summarising each earlier scan, wall s", "summarise_s", "{:.1f}"),
    ]
    several = len({r.get("history") for r in results}) > 1  # then each column says which
    head = ["figure"] + [f"{r['backend']} {r['gpus']:,}" + (f" {r['history']}" if several else "") for r in results]
    head += ["target"]
    out = [head]
    for label, key, fmt in figs:
        tgt = ""
        if key in TARGETS:
            sizes = dict.fromkeys(r["gpus"] for r in results)  # once a size, for all its backends
            tgt = "; ".join(f"{_target(key, n)} @{n:,}" for n in sizes if _target(key, n))
            if not isinstance(TARGETS[key], dict):
                tgt = _target(key, 0)
        out.append([label] + [fmt.format(r[key]) if r.get(key) is not None else "-" for r in results] + [tgt])
    widths = [max(len(row[i]) for row in out) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in out
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1000,10000", help="comma-separated fleet sizes")
    ap.add_argument("--scans", type=int, default=20, help="scans of history before the current one")
    ap.add_argument("--probes", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--samples", type=int, default=3, help="samples a probe a scan")
    ap.add_argument("--readers", type=int, default=6, help="reader threads during ingest (-1: skip that part)")
    ap.add_argument("--batch-rows", type=int, default=5000)
    ap.add_argument("--load-rows", type=int, default=200_000, help="rows posted under load (new full-fleet scans)")
    ap.add_argument("--db", default=tempfile.gettempdir(), help="directory for the SQLite databases")
    ap.add_argument("--backends", default="sqlite", help="comma-separated, side by side per size: sqlite, postgresql")
    ap.add_argument(
        "--pg-url",
        help="postgresql://USER@HOST:PORT/DATABASE to measure in (a schema a size, dropped after); "
        "default: start a throwaway PostgreSQL (Debian's postgresql package)",
    )
    ap.add_argument(
        "--history",
        default="summaries",
        help="comma-separated, side by side per size: summaries (a fleet analysis after each earlier scan "
        "stores its per-scan summaries, as the collector does), samples (none: every sample is read)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    backends, histories = args.backends.split(","), args.history.split(",")
    for h in histories:
        if h not in ("summaries", "samples"):
            ap.error(f"--history: {h!r} is neither summaries nor samples")
    for b in backends:
        if b not in BACKENDS:
            ap.error(f"--backends: unknown backend {b!r} (known: {', '.join(BACKENDS)})")
    results = []
    with contextlib.ExitStack() as stack:
        pg_url, pg_pid = args.pg_url, None
        if "postgresql" in backends and pg_url is None:
            from pgserver import running_postgres

            pg = stack.enter_context(running_postgres(_free_port(), durable=True))
            pg_url, pg_pid = pg.base_url, pg.proc.pid
        for n, b, h in ((int(x), b, h) for x in args.gpus.split(",") for b in backends for h in histories):
            results.append(
                measure(
                    args.db,
                    n,
                    args.scans,
                    args.probes,
                    args.samples,
                    args.readers,
                    args.batch_rows,
                    args.load_rows,
                    pg_url if b == "postgresql" else None,
                    pg_pid if b == "postgresql" else None,
                    h,
                )
            )
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps(results) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
