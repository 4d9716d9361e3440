"""Peak memory of the collector under concurrent maximum batches.

Starts a real collector (``straggler collector``, default limits: 32 MiB bodies, 100,000 rows a
batch), posts ``--concurrent`` batches of ``max_batch_rows`` rows at once (each distinct, so every row
is stored), then as many batches of ``max_batch_rows + 1`` rows (refused with 413), and reads the
collector's peak resident set (``VmHWM`` in /proc) after each round.

    python benchmarks/collector_memory.py --concurrent 4 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scan_fanout import TOKEN, _free_port, start_collector


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _batch(tag: str, rows: int) -> bytes:
    now = time.time()
    # 12,500 devices (8 a host), 8 samples each; every batch is another scan of the same devices
    out = [
        {
            "id": f"{tag}{i:010d}",
            "ts": now - 60,
            "scan_id": f"mem-{tag}",
            "host": f"h{i % 12_500 // 8}",
            "gpu": f"GPU-{i % 12_500}",
            "index": i % 8,
            "model": "NVIDIA H100 80GB HBM3",
            "probe": "matmul",
            "settings": "n=8192,dtype=bf16",
            "sample": i // 12_500,
            "value": 790.0 + i % 13,
            "unit": "TFLOP/s",
            "sm_clock_mhz": 1980.0,
            "power_w": 650.5,
            "temp_c": 61.0,
        }
        for i in range(rows)
    ]
    return json.dumps({"host": "mem", "results": out}).encode()


def run(concurrent: int, rows: int) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        # the fleet analysis is held off (it runs after ingest, on its own thread): this measures ingest
        server = start_collector(
            Path(tmp),
            port,
            {"STRAGGLER_COLLECTOR_ANALYSIS_DEBOUNCE_S": "3600", "STRAGGLER_COLLECTOR_ANALYSIS_MAX_DELAY_S": "3600"},
        )
        try:
            base = _vm(server.pid, "VmRSS")
            bodies = [_batch(f"b{k}x", rows) for k in range(concurrent)]

            def post(body: bytes) -> int:
                r = httpx.post(
                    url + "/api/v1/results",
                    content=body,
                    timeout=600,
                    headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                )
                return r.status_code

            with ThreadPoolExecutor(concurrent) as pool:
                codes = list(pool.map(post, bodies))
            peak_max = _vm(server.pid, "VmHWM")
            bodies = [_batch(f"o{k}x", rows + 1) for k in range(concurrent)]
            with ThreadPoolExecutor(concurrent) as pool:
                over = list(pool.map(post, bodies))
            peak_over = _vm(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait(30)
    return {
        "concurrent": concurrent,
        "rows": rows,
        "body_bytes": len(bodies[0]),
        "baseline_rss_bytes": base,
        "codes": codes,
        "peak_rss_bytes": peak_max,
        "over_codes": over,
        "peak_rss_after_oversized_bytes": peak_over,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--rows", type=int, default=100_000, help="rows a batch (the collector's max_batch_rows)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.concurrent, args.rows)
    if args.json:
        print(json.dumps(res))
    else:
        mib = 1 << 20
        print(
            f"{args.concurrent} x {args.rows} rows ({res['body_bytes'] / mib:.1f} MiB each): {res['codes']}; "
            f"peak RSS {res['peak_rss_bytes'] / mib:.0f} MiB (baseline {res['baseline_rss_bytes'] / mib:.0f} MiB); "
            f"then {args.concurrent} x {args.rows + 1} rows: {res['over_codes']}, peak RSS "
            f"{res['peak_rss_after_oversized_bytes'] / mib:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
