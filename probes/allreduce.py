"""allreduce: torch.distributed all_reduce across every worker (NCCL on GPU, gloo on CPU).

Each iteration starts after a barrier; the barrier's wait times give each rank's arrival skew (how
long after the first rank it arrived: ``max_j wait_j - wait_i``, clock-independent). Bandwidth
follows nccl-tests: ``algbw = bytes / time``, ``busbw = algbw * 2(n-1)/n``; ``value`` is busbw.
Every rank must call the collective the same number of times, so a window ends when the ranks
agree, at each iteration's barrier, that its time is up (the longest any rank has been in it): a
window takes its planned time however the machine's load changes after warm-up (a count fixed from
the warm-up ran several times longer under load and overran the runner's phase deadline).
"""

from __future__ import annotations

import math
import time
from statistics import fmean

from .windows import bad_readings

NAME = "allreduce"
MiB = 1 << 20
MIN_ITERS = 2  # iterations a window measures at least, however long they take


def defaults(kind: str) -> dict:
    return {"nbytes": 256 * MiB if kind == "cuda" else 16 * MiB}


def prepare(dev, group, nbytes: int | None = None):
    nbytes = nbytes or defaults(dev.kind)["nbytes"]
    buf = dev.randn(nbytes // 4, dtype="fp32")

    def step():
        group.all_reduce(buf)

    group.barrier()
    dev.time_batch(step, 2)  # warm-up

    def run(duration_s: float, n_windows: int, telemetry) -> list[dict]:
        window_s = duration_s / n_windows
        windows = []
        for _ in range(n_windows):
            waits, secs = [], []
            with telemetry() as tw:
                t_start, t0 = time.time(), time.perf_counter()
                while True:
                    wait_s, longest_s = group.barrier_max(time.perf_counter() - t0)
                    if len(secs) >= MIN_ITERS and longest_s >= window_s:
                        break
                    waits.append(wait_s)
                    secs.append(dev.time_batch(step, 1))
                t_end = time.time()
            windows.append(
                {
                    "t_start": t_start,
                    "t_end": t_end,
                    "secs": secs,
                    "waits": group.all_gather_floats(waits),
                    "telemetry": tw.summary(),
                    "readings": bad_readings(tw),
                }
            )
        return [
            {
                "probe": NAME,
                "settings": f"bytes={nbytes},dtype=fp32,ranks={group.size}",
                "unit": "GB/s",
                "nbytes": nbytes,
                "ranks": group.size,
                "rank": group.rank,
                "windows": windows,
            }
        ]

    return run


def bus_factor(ranks: int) -> float:
    """nccl-tests all_reduce bus bandwidth factor 2(n-1)/n."""
    return 2.0 * (ranks - 1) / ranks


def parse(raw: dict) -> list[dict]:
    """Raw allreduce timings -> one row per window with busbw as value, plus ``algbw_gbps`` and
    ``arrival_skew_s`` (this rank's mean lateness at the barriers). Pure."""
    rows = []
    rank, n = raw["rank"], raw["ranks"]
    for i, w in enumerate(raw["windows"]):
        secs = sum(w["secs"])
        algbw = raw["nbytes"] * len(w["secs"]) / secs / 1e9 if secs > 0 else math.nan
        lateness = [max(col) - col[rank] for col in zip(*w["waits"])]
        row = {
            "probe": NAME,
            "settings": raw["settings"],
            "sample": i,
            "ts": w["t_end"],
            "duration_s": w["t_end"] - w["t_start"],
            "value": algbw * bus_factor(n),
            "unit": raw["unit"],
            "algbw_gbps": algbw,
            "arrival_skew_s": fmean(lateness) if lateness else math.nan,
        }
        row.update(w.get("telemetry") or {})
        rows.append(row)
    return rows
