"""The sustained, windowed timing loop every per-device probe shares, and its pure parser.

A probe runs for ``duration_s`` split into ``n_windows`` equal windows; each window is one sample,
so burst and sustained behaviour are both visible. Inside a window the step is timed in batches of
``batch_iters`` calls (CUDA events on a GPU, so launch gaps never reach the host timer); telemetry
is sampled over the window and its summary travels with the raw timings.

Raw form (what a run returns and what tests replay)::

    {"probe": "matmul", "settings": "n=1024,dtype=fp32", "unit": "GFLOP/s",
     "work_per_iter": 2.1e9, "scale": 1e9,
     "windows": [{"t_start": 1.7e9, "t_end": 1.7e9, "batches": [[iters, seconds], ...],
                  "telemetry": {...}}, ...]}
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, ContextManager

# A step batch lasts about this long: long enough that timer overhead is far below 0.1%, short
# enough that a window holds many batches.
BATCH_TARGET_S = 0.05


class NoTelemetry:
    """Stands in for a sampler window when no telemetry backend is available."""

    readings: tuple = ()

    def summary(self) -> dict:
        return {}


def no_telemetry() -> ContextManager:
    return nullcontext(NoTelemetry())


def calibrate(dev, step: Callable[[], None], warmup_iters: int = 2, target_s: float = BATCH_TARGET_S) -> int:
    """Warm up ``step`` and return how many calls make one batch of about ``target_s``."""
    dev.time_batch(step, warmup_iters)
    per_iter = dev.time_batch(step, 1)
    per_iter = min(per_iter, dev.time_batch(step, 1))
    return max(1, int(target_s / max(per_iter, 1e-9)))


def run_windows(
    dev,
    step: Callable[[], None],
    *,
    batch_iters: int,
    duration_s: float,
    n_windows: int,
    telemetry: Callable[[], ContextManager] = no_telemetry,
) -> list[dict]:
    """Run ``step`` for ``duration_s`` in ``n_windows`` windows; raw timings per window."""
    window_s = duration_s / n_windows
    windows = []
    for _ in range(n_windows):
        batches = []
        with telemetry() as tw:
            t_start = time.time()
            stop = time.monotonic() + window_s
            while True:
                batches.append([batch_iters, dev.time_batch(step, batch_iters)])
                if time.monotonic() >= stop:
                    break
            t_end = time.time()
        windows.append(
            {
                "t_start": t_start,
                "t_end": t_end,
                "batches": batches,
                "telemetry": tw.summary(),
                "readings": bad_readings(tw),
            }
        )
    return windows


def bad_readings(tw) -> list[dict]:
    """Telemetry readings of the window whose status was not ok (an NVML error mid-run)."""
    return [
        {"ts": r.ts, "status": r.status, "errors": dict(r.errors)}
        for r in getattr(tw, "readings", ())
        if getattr(r, "status", "ok") != "ok"
    ]


def parse_windows(raw: dict) -> list[dict]:
    """Raw windowed timings -> one sample row per window (probe, settings, sample, ts,
    duration_s, value, unit and the window's telemetry columns). Pure."""
    rows = []
    for i, w in enumerate(raw["windows"]):
        iters = sum(b[0] for b in w["batches"])
        secs = sum(b[1] for b in w["batches"])
        value = iters * raw["work_per_iter"] / secs / raw["scale"] if secs > 0 else math.nan
        row = {
            "probe": raw["probe"],
            "settings": raw["settings"],
            "sample": i,
            "ts": w["t_end"],
            "duration_s": w["t_end"] - w["t_start"],
            "value": value,
            "unit": raw["unit"],
        }
        row.update(w.get("telemetry") or {})
        rows.append(row)
    return rows
