"""What ``PRAGMA synchronous = FULL`` costs the collector's ingest, against ``NORMAL`` (both in WAL mode).

With NORMAL, SQLite syncs the WAL only at checkpoints: a committed batch survives a crash of the
collector, but not a power loss until the next checkpoint. With FULL it syncs the WAL at every
commit: an acknowledged batch survives power loss. This times ``Store.ingest`` (no HTTP: the ratio is
an upper bound on what the sync adds to a request) for batches of each size, on a fresh database in
``--dir`` (put it on the disk the collector will use), alternating the two settings.

    python benchmarks/collector_sync.py [--dir /var/lib/straggler] [--batches 1,10,100,1000,10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from straggler.collector.store import Store, row_tuples
from straggler.records import result_id


def _rows(tag: str, n: int) -> list[tuple]:
    now = time.time()
    out = []
    for i in range(n):
        r = {
            "ts": now,
            "scan_id": f"sync-{tag}",
            "host": f"h{i // 8}",
            "gpu": f"GPU-{i}",
            "index": i % 8,
            "model": "NVIDIA H100 80GB HBM3",
            "probe": "matmul",
            "settings": "n=8192,dtype=bf16",
            "sample": 0,
            "value": 790.0 + i % 13,
            "unit": "TFLOP/s",
            "sm_clock_mhz": 1980.0,
            "power_w": 650.0,
        }
        r["id"] = result_id(r)
        out.append(r)
    return row_tuples(out)


def run(where: Path, sizes: list[int], repeat: int) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        store = Store(Path(tmp) / "c.db")
        try:
            for size in sizes:
                times: dict[str, list[float]] = {"NORMAL": [], "FULL": []}
                k = 0
                for _ in range(repeat):
                    for mode in ("NORMAL", "FULL"):
                        store._writer.execute(f"PRAGMA synchronous = {mode}")
                        rows = _rows(f"{size}-{k}", size)
                        k += 1
                        t0 = time.perf_counter()
                        store.ingest(rows, time.time())
                        times[mode].append(time.perf_counter() - t0)
                med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
                out.append(
                    {
                        "rows": size,
                        "normal_s": med["NORMAL"],
                        "full_s": med["FULL"],
                        "added_s": med["FULL"] - med["NORMAL"],
                        "ratio": med["FULL"] / med["NORMAL"],
                    }
                )
        finally:
            store.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--batches", default="1,10,100,1000,10000")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.dir, [int(x) for x in args.batches.split(",")], args.repeat)
    if args.json:
        print(json.dumps(res))
    else:
        for r in res:
            print(
                f"{r['rows']:>6} rows: NORMAL {r['normal_s'] * 1000:8.2f} ms, FULL {r['full_s'] * 1000:8.2f} ms "
                f"(+{r['added_s'] * 1000:.2f} ms, x{r['ratio']:.2f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
