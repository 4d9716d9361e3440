"""Ingest while readers poll the fleet view of a 20,000-GPU fleet.

Starts a real collector (its own process, the real analysis), stores ``--gpus`` devices (8 a host, 5
samples each), waits for their verdicts, then times ``--batches`` ingest batches of ``--batch-rows``
rows with no reader, and again while ``--readers`` threads fetch ``GET /api/v1/gpus`` back to back
(``Accept-Encoding: gzip``, as browsers and Grafana send it). Prints both ingest rates and how many
reads were served.

    python benchmarks/collector_readers.py [--gpus 20000] [--readers 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from scan_fanout import TOKEN, _free_port, start_collector

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _rows(scan: str, first_host: int, hosts: int, samples: int) -> list[dict]:
    from straggler.records import result_id

    now = time.time()
    out = []
    for h in range(first_host, first_host + hosts):
        for g in range(8):
            for k in range(samples):
                r = {
                    "ts": now - 60 + k,
                    "scan_id": scan,
                    "host": f"node{h:05d}",
                    "gpu": f"GPU-{h}-{g}",
                    "index": g,
                    "model": "NVIDIA H100 80GB HBM3",
                    "probe": "matmul",
                    "settings": "n=8192,dtype=bf16",
                    "sample": k,
                    "value": 790.0 + (h * 8 + g + k) % 11,
                    "unit": "TFLOP/s",
                    "sm_clock_mhz": 1980.0,
                }
                r["id"] = result_id(r)
                out.append(r)
    return out


def _ingest_rate(c, batches: int, batch_rows: int, tag: str) -> float:
    hosts = max(1, batch_rows // 40)
    bodies = [
        json.dumps({"host": "bench", "results": _rows(f"{tag}-{b}", b * hosts, hosts, 5)}).encode()
        for b in range(batches)
    ]
    t0 = time.perf_counter()
    for body in bodies:
        c.post("/api/v1/results", content=body, headers={"Content-Type": "application/json"}).raise_for_status()
    return sum(len(json.loads(b)["results"]) for b in bodies) / (time.perf_counter() - t0)


def run(gpus: int, readers: int, batches: int, batch_rows: int) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        server = start_collector(Path(tmp), port)
        try:
            with httpx.Client(base_url=url, headers=AUTH, timeout=600) as c:
                hosts = gpus // 8
                for first in range(0, hosts, 250):
                    body = {"host": "fill", "results": _rows("fill", first, min(250, hosts - first), 5)}
                    c.post("/api/v1/results", json=body).raise_for_status()
                deadline = time.monotonic() + 600
                while True:
                    doc = c.get("/api/v1/gpus", params={"limit": 1}).json()
                    if doc.get("total", len(doc["gpus"])) == gpus and doc["gpus"][0]["probes"]:
                        break
                    assert time.monotonic() < deadline, "the analysis did not finish"
                    time.sleep(1)
                page_bytes = len(c.get("/api/v1/gpus", headers={"Accept-Encoding": "identity"}).content)
                alone = _ingest_rate(c, batches, batch_rows, "alone")
                stop, reads = threading.Event(), []

                def read():
                    with httpx.Client(base_url=url, headers={**AUTH, "Accept-Encoding": "gzip"}, timeout=600) as rc:
                        while not stop.is_set():  # raw bytes: the reader's own gunzip is not the collector's cost
                            with rc.stream("GET", "/api/v1/gpus") as r:
                                for _ in r.iter_raw():
                                    pass
                            reads.append(r.status_code)

                threads = [threading.Thread(target=read) for _ in range(readers)]
                for t in threads:
                    t.start()
                time.sleep(1.0)
                busy = _ingest_rate(c, batches, batch_rows, "busy")
                stop.set()
                for t in threads:
                    t.join()
        finally:
            server.terminate()
            server.wait(30)
    return {
        "gpus": gpus,
        "page_bytes": page_bytes,
        "readers": readers,
        "ingest_rows_per_s_alone": alone,
        "ingest_rows_per_s_with_readers": busy,
        "slowdown": alone / busy,
        "reads": len(reads),
        "read_errors": sum(code != 200 for code in reads),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=20_000)
    ap.add_argument("--readers", type=int, default=6)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--batch-rows", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.gpus, args.readers, args.batches, args.batch_rows)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['gpus']} GPUs ({res['page_bytes'] / 2**20:.1f} MiB a page): ingest {res['ingest_rows_per_s_alone']:.0f} "
            f"rows/s alone, {res['ingest_rows_per_s_with_readers']:.0f} rows/s with {res['readers']} readers "
            f"(x{res['slowdown']:.1f} slower; {res['reads']} reads, {res['read_errors']} not 200)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
