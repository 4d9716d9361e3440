"""Background telemetry sampling during a probe window, and the window's summary.

sampler = Sampler(backend, index, interval_s=0.1)
with sampler.window() as w:
    run_probe()
w.readings   # tuple of DeviceReading: one at the start, one every interval, one at the end
w.summary()  # the canonical telemetry columns for that window (missing values are None)
"""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from straggler.records import format_throttle

from .telemetry import STATUS_OK, DeviceReading, TelemetryBackend


def _values(readings: Sequence[DeviceReading], name: str) -> list[Any]:
    return [getattr(r, name) for r in readings if getattr(r, name) is not None]


def _mean(readings, name):
    vals = _values(readings, name)
    return statistics.fmean(vals) if vals else None


def _max(readings, name):
    vals = _values(readings, name)
    return max(vals) if vals else None


def _min(readings, name):
    vals = _values(readings, name)
    return min(vals) if vals else None


def _last(readings, name):
    vals = _values(readings, name)
    return vals[-1] if vals else None


def throttle_shares(readings: Sequence[DeviceReading]) -> dict[str, float] | None:
    """Share of the readings (that report reasons) in which each reason was active; None if none do."""
    known = [r.throttle_reasons for r in readings if r.throttle_reasons is not None]
    if not known:
        return None
    counts: dict[str, int] = {}
    for reasons in known:
        for name in reasons:
            counts[name] = counts.get(name, 0) + 1
    return {name: n / len(known) for name, n in counts.items()}


def summarize(readings: Sequence[DeviceReading]) -> dict[str, Any]:
    """The canonical telemetry columns for a window of readings of one device."""
    shares = throttle_shares(readings)
    return {
        "sm_clock_mhz": _mean(readings, "sm_clock_mhz"),
        "sm_clock_max_mhz": _max(readings, "sm_clock_max_mhz"),
        "mem_clock_mhz": _mean(readings, "mem_clock_mhz"),
        "power_w": _mean(readings, "power_w"),
        "power_limit_w": _last(readings, "power_limit_w"),
        "temp_c": _max(readings, "temp_c"),
        "throttle_reasons": None if shares is None else format_throttle(shares),
        "pcie_gen": _min(readings, "pcie_gen"),
        "pcie_gen_max": _max(readings, "pcie_gen_max"),
        "pcie_width": _min(readings, "pcie_width"),
        "pcie_width_max": _max(readings, "pcie_width_max"),
        "ecc_corrected_total": _last(readings, "ecc_corrected_total"),
        "ecc_uncorrected_total": _last(readings, "ecc_uncorrected_total"),
        "retired_pages": _last(readings, "retired_pages"),
        "remapped_rows": _last(readings, "remapped_rows"),
        "util_pct": _mean(readings, "util_pct"),
        "processes": _max(readings, "processes"),
        "model": _last(readings, "model"),
        "driver": _last(readings, "driver"),
    }


class Window:
    """The readings of one sampling window (filled while the ``with`` block runs)."""

    def __init__(self) -> None:
        self._readings: list[DeviceReading] = []
        self.started_s: float | None = None
        self.ended_s: float | None = None

    @property
    def readings(self) -> tuple[DeviceReading, ...]:
        return tuple(self._readings)

    @property
    def statuses(self) -> dict[str, int]:
        """How many readings had each status (``{"ok": 31, "lost": 2}``)."""
        out: dict[str, int] = {}
        for r in self._readings:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        return summarize(self._readings)

    @property
    def ok(self) -> bool:
        return all(r.status == STATUS_OK for r in self._readings)


class Sampler:
    """Reads ``backend.read(index)`` every ``interval_s`` in a background thread during a window."""

    def __init__(self, backend: TelemetryBackend, index: int, interval_s: float = 0.1) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.backend = backend
        self.index = index
        self.interval_s = interval_s

    def _run(self, window: Window, stop: threading.Event) -> None:
        next_t = time.monotonic() + self.interval_s
        while not stop.wait(max(0.0, next_t - time.monotonic())):
            reading = self.backend.read(self.index)
            if stop.is_set():
                break  # the window closed during a slow read: it is summarised without this one
            window._readings.append(reading)
            # drift-corrected: the next tick is on the grid, skipping ticks a slow read overran
            next_t += self.interval_s * max(1, int((time.monotonic() - next_t) // self.interval_s) + 1)

    @contextmanager
    def window(self) -> Iterator[Window]:
        w = Window()
        w.started_s = time.time()
        w._readings.append(self.backend.read(self.index))
        stop = threading.Event()
        thread = threading.Thread(target=self._run, args=(w, stop), name=f"sampler-{self.index}", daemon=True)
        thread.start()
        try:
            yield w
        finally:
            stop.set()
            thread.join(timeout=max(5.0, 10 * self.interval_s))
            w._readings.append(self.backend.read(self.index))
            w.ended_s = time.time()
