"""The fleet view's read, library by library: the store's two queries into pandas DataFrames.

The collector's fleet refresh reads each device's latest scan and its earlier scans
(``Store.fleet_queries``) and hands both to the analysis as DataFrames. This benchmark builds one
SQLite database with ``benchmarks/collector_scale.py``'s rows (8 GPUs a host, full canonical rows with
telemetry, ``--scans`` earlier scans plus the current one), then reads it with each library that is
installed, each in a fresh process (spawned: nothing loaded or cached from another run), the same
SQL on the same file, ``--repeats`` rounds interleaved:

- ``sqlite3``: the standard library's cursor, ``fetchall`` into tuples, ``DataFrame.from_records``
  (``Store.latest_samples`` and ``Store.earlier_samples`` and the fleet view's frames: the
  collector's read of samples; it reads per-scan summaries instead where it has them, which this
  benchmark's database, built without refreshes, has not);
- ``pandas read_sql``: ``pandas.read_sql`` on the same ``sqlite3`` connection;
- ``adbc``: Apache Arrow's ADBC SQLite driver (``adbc-driver-sqlite``): the rows into an Arrow table,
  then ``to_pandas``;
- ``connectorx``: ``connectorx.read_sql`` into Arrow, then ``to_pandas``;
- ``polars``: ``polars.read_database_uri`` (its connectorx engine), then ``to_pandas``.

Each row of the table: wall and CPU seconds (user + system) of the read (imports excluded: each
process imports its library before the clock starts), the process' peak resident set (``VmHWM``) after
it, and the rows read. "same rows" compares each library's read with the first's by its row counts
(latest and history), distinct devices and sum of ``value`` (not row by row); a difference makes
the benchmark exit 1. Every row is the two queries alone. The last column
says whether the library reads a REAL column whose first 2,000 rows are NULL (telemetry of CPU rows
before GPU rows) as 2,000 NULLs and 10 values, from a small table of its own. The machine is shared:
CPU seconds beside wall.
DuckDB is left out: it reads SQLite through an extension it downloads at first use, which this
machine (and an air-gapped cluster) cannot.

    .venv/bin/python benchmarks/collector_read.py --gpus 10000 [--scans 20] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collector_scale import _cpu, _vm, build

METHODS = ("sqlite3", "pandas read_sql", "adbc", "connectorx", "polars")
# the modules each method imports (polars reads through connectorx; each of them into Arrow)
NEEDS = {
    "adbc": ("adbc_driver_sqlite.dbapi", "pyarrow"),
    "connectorx": ("connectorx", "pyarrow"),
    "polars": ("polars", "connectorx", "pyarrow"),
}
CHILD_TIMEOUT_S = 3600  # one read in its process: a hung library is named, not waited for


def available() -> list[str]:
    """The methods whose library is installed here."""

    def found(name: str) -> bool:
        top = name.split(".")[0]
        return importlib.util.find_spec(top) is not None and (top == name or importlib.util.find_spec(name) is not None)

    return [m for m in METHODS if all(found(n) for n in NEEDS.get(m, ()))]


def _inline(sql: str, params: tuple) -> str:
    """The query with its integer parameters written in (connectorx and polars take none)."""
    for p in params:
        assert isinstance(p, int), p
        sql = sql.replace("?", str(p), 1)
    return sql


def _frames_by(method: str, db: str, queries: list[tuple[str, tuple]]) -> tuple:
    """The DataFrames of ``queries`` read from the SQLite file ``db`` with ``method``."""
    import pandas as pd

    if method == "sqlite3":  # as the store reads (the collector's own path: ``_read``)
        import sqlite3

        with sqlite3.connect(db) as conn:
            parts = []
            for sql, params in queries:
                cur = conn.execute(sql, params)
                parts.append(pd.DataFrame.from_records(cur.fetchall(), columns=[d[0] for d in cur.description]))
            return tuple(parts)
    if method == "pandas read_sql":
        import sqlite3

        with sqlite3.connect(db, isolation_level=None) as conn:
            conn.execute("BEGIN")  # one read transaction, as the store's
            parts = [pd.read_sql(sql, conn, params=params) for sql, params in queries]
            conn.execute("COMMIT")
            return tuple(parts)
    if method == "adbc":
        import adbc_driver_sqlite.dbapi as adbc

        with adbc.connect(db) as conn, conn.cursor() as cur:  # one transaction: autocommit is off
            parts = []
            for sql, params in queries:
                cur.execute(sql, params)
                parts.append(cur.fetch_arrow_table().to_pandas())
            return tuple(parts)
    if method == "connectorx":
        import connectorx as cx

        return tuple(
            cx.read_sql(f"sqlite://{db}", _inline(sql, params), return_type="arrow").to_pandas()
            for sql, params in queries
        )
    import polars as pl

    return tuple(
        pl.read_database_uri(_inline(sql, params), f"sqlite://{db}", engine="connectorx").to_pandas()
        for sql, params in queries
    )


def _nulls_first(method: str, tmp: str) -> str:
    """Whether ``method`` reads a REAL column whose first 2,000 rows are NULL (a telemetry column of
    CPU or older agents' rows before GPU rows): "yes", or the library's error."""
    import sqlite3

    db = str(Path(tmp) / f"nulls-{method.replace(' ', '_')}.db")
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (power_w REAL, host TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [(None, "cpu-node")] * 2000 + [(350.5, "gpu-node")] * 10)
    try:
        (frame,) = _frames_by(method, db, [("SELECT t.power_w, t.host FROM t", ())])
        power = frame["power_w"].astype(float)
        return (
            "yes"
            if power.isna().sum() == 2000 and (power.dropna() == 350.5).all() and len(power) == 2010
            else "wrong values"
        )
    except Exception as e:  # noqa: BLE001 -- the library's refusal is the finding
        return f"no: {type(e).__name__}: {str(e).strip().splitlines()[0][:80]}"


def _read(method: str, db: str, scans: int, out) -> None:
    """In a fresh process: read the fleet view's input with ``method``; sends the timings."""
    import pandas as pd

    from straggler.collector.fleet import input_frames
    from straggler.collector.store import RESULT_COLUMNS, Store, sample_frame

    store = Store(db)
    queries = [store.fleet_queries(scans)[k] for k in ("latest", "history")]  # the samples, summarised or not
    for name in NEEDS.get(method, ()):  # imports before the clock starts
        importlib.import_module(name)
    w, c = time.perf_counter(), _cpu()
    if method == "sqlite3":  # the store's own reads of the samples, then the fleet view's frames
        current, past = input_frames(
            sample_frame([store.latest_samples()[1]], RESULT_COLUMNS), [store.earlier_samples(scans)]
        )
    else:
        current, past = _frames_by(method, db, queries)
    wall, cpu, peak_mb = time.perf_counter() - w, _cpu() - c, _vm("self", "VmHWM") / 2**20
    both = pd.concat([current[["gpu", "value"]], past[["gpu", "value"]]], ignore_index=True)
    store.close()
    with tempfile.TemporaryDirectory() as tmp:
        nulls = _nulls_first(method, tmp)
    out.send(
        {
            "method": method,
            "wall_s": wall,
            "cpu_s": cpu,
            "peak_rss_mb": peak_mb,
            "rows_latest": len(current),
            "rows_history": len(past),
            "value_sum": float(both["value"].astype(float).sum()),
            "devices": int(both["gpu"].nunique()),
            "dtypes": sorted({str(t) for t in current.dtypes}),
            "nulls_first": nulls,
        }
    )


def run(db: str, scans: int, methods: list[str], repeats: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(repeats):  # interleaved: every method sees the same load
        for m in methods:
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_read, args=(m, db, scans, send))
            p.start()
            send.close()
            try:
                if not recv.poll(CHILD_TIMEOUT_S):
                    p.kill()
                    raise SystemExit(f"collector_read: the {m} read did not end within {CHILD_TIMEOUT_S} s")
                runs[m].append(recv.recv())
            except EOFError:
                p.join()
                raise SystemExit(f"collector_read: the {m} read died (exit code {p.exitcode})") from None
            p.join()
    out = []
    for rs in runs.values():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
        out.append({**rs[0], **med, "wall_min_s": min(r["wall_s"] for r in rs), "repeats": len(rs)})
    first = out[0]
    for r in out[1:]:
        same = all(r[k] == first[k] for k in ("rows_latest", "rows_history", "devices"))
        r["same_rows"] = same and abs(r["value_sum"] - first["value_sum"]) <= 1e-9 * abs(first["value_sum"])
    first["same_rows"] = True
    return out


def table(results: list[dict], gpus: int, scans: int) -> str:
    base = results[0]
    lines = [
        f"{gpus:,} GPUs, {scans + 1} scans stored ({base['rows_latest'] + base['rows_history']:,} rows read), median of {base['repeats']}:",
        "",
        "| library | wall | wall min | CPU | CPU / sqlite3 | peak RSS | same rows (counts, sum) | string columns as "
        "| reads a column NULL in its first 2,000 rows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        strings = ", ".join(t for t in r["dtypes"] if t not in ("float64", "int64"))
        lines.append(
            f"| {r['method']} | {r['wall_s']:.2f} s | {r['wall_min_s']:.2f} s | {r['cpu_s']:.2f} s | "
            f"{r['cpu_s'] / base['cpu_s']:.2f}x | {r['peak_rss_mb']:,.0f} MB | "
            f"{'yes' if r['same_rows'] else 'NO'} | {strings} | {r['nulls_first']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=10_000)
    ap.add_argument("--scans", type=int, default=20, help="scans of history before the current one (>= 1)")
    ap.add_argument("--probes", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--samples", type=int, default=3, help="samples a probe a scan")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (>= 1)")
    ap.add_argument("--db", default=None, help="an SQLite file this benchmark built before (kept): read it again")
    ap.add_argument("--keep", default=None, help="build the database at this path and keep it")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.scans < 1 or a.repeats < 1 or a.gpus < 8:
        ap.error("--scans and --repeats must be at least 1, --gpus at least 8")
    methods = available()
    with tempfile.TemporaryDirectory() as tmp:
        db = a.db or a.keep or str(Path(tmp) / "c.db")
        if a.db is None:
            t0 = time.time() - (a.scans + 4) * 3600  # every scan in the past
            print(f"collector_read: building {db} ...", file=sys.stderr, flush=True)
            build(db, a.gpus, a.scans, a.probes, a.samples, t0)
        results = run(db, a.scans, methods, a.repeats)
    print(json.dumps(results, indent=2) if a.json else table(results, a.gpus, a.scans))
    missing = [m for m in METHODS if m not in methods]
    if missing and not a.json:
        print(f"\nnot installed here, not measured: {', '.join(missing)}")
    return 0 if all(r["same_rows"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
