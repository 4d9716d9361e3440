"""Collector ingest rate over real HTTP on 127.0.0.1, by batch size.

The collector runs as its own process (`python -m straggler collector`, default settings, a fresh
SQLite file per batch size); this process sends full canonical rows (every telemetry column set),
serialised beforehand so that the client's JSON encoding is not counted, one request at a time
(and from 2 connections at once). Target: >= 20,000 results/s on 2 cores.

    .venv/bin/python benchmarks/collector_ingest.py [--rows 50000] [--batches 100,1000,5000,20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from straggler.records import result_id

TOKEN = "bench-token-0123456789abcdef"
TARGET = 20_000
# The telemetry columns of a healthy, power-capped H100 sample (benchmarks/collector_scale.py uses them too)
H100_TELEMETRY = {
    "sm_clock_mhz": 1980.0,
    "sm_clock_max_mhz": 1980.0,
    "mem_clock_mhz": 2619.0,
    "power_w": 690.5,
    "power_limit_w": 700.0,
    "temp_c": 71.0,
    "throttle_reasons": "sw_power_cap=0.800",
    "pcie_gen": 5,
    "pcie_gen_max": 5,
    "pcie_width": 16,
    "pcie_width_max": 16,
    "ecc_corrected_total": 0,
    "ecc_uncorrected_total": 0,
    "retired_pages": 0,
    "remapped_rows": 0,
    "util_pct": 100.0,
    "processes": 1,
}


def make_rows(n: int, tag: str) -> list[dict]:
    rows = []
    for i in range(n):
        host, gpu = f"node{i // 80:05d}", i // 10 % 8
        row = {
            "ts": 1.7e9 + i,
            "scan_id": f"{tag}-s{i // 10_000}",
            "host": host,
            "gpu": f"GPU-{host}-{gpu}",
            "index": gpu,
            "model": "NVIDIA H100 80GB HBM3",
            "driver": "550.54.15",
            "probe": "matmul",
            "settings": "n=8192,dtype=bf16",
            "sample": i % 10,
            "duration_s": 1.0,
            "value": 790.0 - (i % 7),
            "unit": "TFLOP/s",
            **H100_TELEMETRY,
        }
        row["id"] = result_id(row)
        rows.append(row)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_collector(db: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "STRAGGLER_COLLECTOR_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "straggler", "collector", "--port", str(port), "--db", str(db)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/healthz", timeout=2).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("the collector did not start") from None
            time.sleep(0.1)


def send(url: str, bodies: list[bytes]) -> int:
    accepted = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
        for body in bodies:
            r = c.post("/api/v1/results", content=body)
            r.raise_for_status()
            accepted += r.json()["accepted"]
    return accepted


def run(rows_total: int, batch: int, connections: int, workdir: Path) -> float:
    tag = f"b{batch}c{connections}-{time.monotonic_ns()}"
    rows = make_rows(rows_total, tag)
    bodies = [
        json.dumps({"host": "bench", "results": rows[i : i + batch]}).encode() for i in range(0, len(rows), batch)
    ]
    proc, url = start_collector(workdir / f"{tag}.db")
    try:
        send(url, [json.dumps({"host": "bench", "results": make_rows(10, "warm")}).encode()])  # warm up
        shares = [bodies[k::connections] for k in range(connections)]
        got = [0] * connections
        threads = [
            threading.Thread(target=lambda k=k: got.__setitem__(k, send(url, shares[k]))) for k in range(connections)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    if sum(got) != rows_total:
        raise SystemExit(f"stored {sum(got)} of {rows_total} rows")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--batches", default="100,1000,5000,20000")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (the machine is shared: noisy)")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    print(
        f"collector ingest over HTTP on 127.0.0.1: {args.rows} rows per run, {os.cpu_count()} CPUs, "
        f"best and median of {args.repeat} runs, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(
        f"{'batch':>7} {'conns':>5} {'best s':>7} {'best results/s':>14} {'median results/s':>16} {'best x target':>13}"
    )
    with tempfile.TemporaryDirectory() as d:
        for batch in sizes:
            for conns in (1, 2):
                times = sorted(run(args.rows, batch, conns, Path(d)) for _ in range(args.repeat))
                best, median = args.rows / times[0], args.rows / times[len(times) // 2]
                print(
                    f"{batch:>7} {conns:>5} {times[0]:>7.2f} {best:>14,.0f} {median:>16,.0f} {best / TARGET:>13.2f}",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
