"""/metrics render time for a large fleet (target: <= 1 s for 100,000 GPUs).

Builds a fleet snapshot of N GPUs (8 per host, one verdict per probe, 1% flagged, 1% undecided, each
with its tier and class) and measures,
side by side: preparing the snapshot's text (done once per analysis, off the request path), the
fast render a scrape does, prometheus-client's generic ``generate_latest`` over the same custom
collector (the text is checked identical), and a real ``GET /metrics`` over HTTP on 127.0.0.1 by a
separate process (curl), as Prometheus scrapes it.

    .venv/bin/python benchmarks/collector_metrics.py [--gpus 100000] [--probes 1,2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest

from straggler.collector.fleet import FleetSnapshot, build_gpus
from straggler.collector.metrics import FleetCollector
from straggler.collector.service import BackgroundCollector
from straggler.collector.settings import CollectorSettings

TOKEN = "bench-token-0123456789abcdef"
PROBES = ("matmul", "membw", "pcie", "allreduce")


def snapshot(n_gpus: int, n_probes: int, now: float) -> FleetSnapshot:
    devices = [
        {
            "host": f"node{i // 8:05d}",
            "gpu": f"GPU-{i:08x}-1c2d-3e4f-5a6b-{i:012x}",
            "index": i % 8,
            "model": "NVIDIA H100 80GB HBM3",
            "last_ts": now - 60 - i % 3600,
            "last_scan_id": "s",
        }
        for i in range(n_gpus)
    ]
    verdicts = [
        {
            "host": d["host"],
            "gpu": d["gpu"],
            "probe": p,
            "settings": "n=8192,dtype=bf16",
            "ratio": 1.0 - (i % 97) / 1000,
            "straggler": i % 100 == 0,
            "causes": ["power_capped"] if i % 100 == 0 else [],
            "cost": (i % 97) / 1000,
            "verdict": "straggler" if i % 100 == 0 else "undecided" if i % 100 == 1 else "healthy",
            "degraded": i % 500 == 2,
            "perf_class": "ABCD"[i % 4],
        }
        for i, d in enumerate(devices)
        for p in PROBES[:n_probes]
    ]
    return FleetSnapshot(computed_ts=now, gpus=build_gpus(devices, verdicts))


def scrape(url: str) -> int:
    """GET /metrics as a separate process does it (curl, else httpx here); returns the bytes read."""
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-sSf", "-o", "/dev/null", "-w", "%{size_download}", url],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(out.stdout)
    resp = httpx.get(url, timeout=120)
    resp.raise_for_status()
    return len(resp.content)


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=100_000)
    ap.add_argument("--probes", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"/metrics for {args.gpus:,} GPUs (best of {args.repeat}; target <= 1 s per scrape)")
    print(
        f"{'probes':>6} {'samples':>9} {'MB':>6} {'prepare s':>9} {'render s':>9} {'generate_latest s':>17} "
        f"{'speed-up':>8} {'HTTP GET s':>10}"
    )
    with tempfile.TemporaryDirectory() as d:
        settings = CollectorSettings(port=0, db_path=Path(d) / "c.db", analysis_debounce_s=3600)
        with BackgroundCollector(settings, TOKEN, analyze=lambda s, h: None) as srv:
            for n_probes in (int(p) for p in args.probes.split(",")):
                snap = snapshot(args.gpus, n_probes, time.time())
                fc = FleetCollector(clock=lambda: 1.8e9)
                t_prep, _ = best(lambda: fc.update(snap), 1)
                t_render, text = best(fc.render, args.repeat)
                reg = CollectorRegistry()
                reg.register(fc)
                t_gen, generic = best(lambda: generate_latest(reg), 1)
                assert generic == text, "fast render differs from prometheus-client's text"
                srv.collector.fleet_metrics.update(snap)  # what the analysis thread does
                t_http, size = best(lambda: scrape(srv.url + "/metrics"), args.repeat)
                samples = text.count(b"\n") - text.count(b"\n#") - 1
                print(
                    f"{n_probes:>6} {samples:>9,} {size / 1e6:>6.1f} {t_prep:>9.2f} {t_render:>9.2f} "
                    f"{t_gen:>17.2f} {t_gen / t_render:>8.1f} {t_http:>10.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
