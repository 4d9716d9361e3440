"""The fleet view: the analysis engine over each device's latest scan plus its history.

:class:`FleetView` recomputes off the request path, in its own thread, a short while after results
arrive (debounced, and at most ``max_delay_s`` after the first unprocessed arrival), and publishes
an immutable :class:`FleetSnapshot` that the API and ``/metrics`` read.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from straggler.errors import StragglerError
from straggler.jsonsafe import json_safe
from straggler.verdict import device_tier

from .store import Store

log = logging.getLogger("straggler.collector")

# Columns of the analysis' device table that identify the device (kept once per device); every
# other column is part of the per-probe verdict. These verdict fields are always present:
DEVICE_FIELDS = ("host", "gpu", "index", "model")
REQUIRED_VERDICT = ("probe", "settings", "ratio", "straggler", "causes", "cost")


@dataclass(frozen=True)
class FleetSnapshot:
    """One analysis of the fleet. ``gpus``: one entry per device with its per-probe verdicts."""

    computed_ts: float | None = None
    gpus: tuple[Mapping[str, Any], ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration_s: float | None = None
    verdicts_ts: float | None = None  # when the verdicts shown were computed (earlier than computed_ts after an error)

    def stragglers(self) -> list[Mapping[str, Any]]:
        flagged = [g for g in self.gpus if g["straggler"]]
        return sorted(flagged, key=lambda g: -max((p["cost"] or 0.0) for p in g["probes"]))


def build_gpus(devices: list[dict], verdicts: list[dict]) -> tuple[dict, ...]:
    """Join the device table (host, gpu, index, model, last_ts, last_scan_id) with the analysis rows
    (one per host, gpu, probe). Each device adds its tier from its probes (``straggler.verdict.device_tier``:
    ``verdict``, ``degraded``, ``samples_needed``, ``perf_class``; ``verdict`` null before any analysis)."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    for v in verdicts:
        entry = {f: json_safe(v.get(f)) for f in REQUIRED_VERDICT}
        entry.update({k: json_safe(x) for k, x in v.items() if k not in DEVICE_FIELDS})
        entry["straggler"] = bool(entry["straggler"])
        entry["causes"] = list(entry["causes"] or [])
        by_key.setdefault((v["host"], v["gpu"]), []).append(entry)
    out = []
    for d in devices:
        probes = sorted(by_key.get((d["host"], d["gpu"]), []), key=lambda p: (p["probe"], p["settings"] or ""))
        out.append({**d, "straggler": any(p["straggler"] for p in probes), **device_tier(probes), "probes": probes})
    return tuple(out)


def default_analyze() -> Callable:
    from straggler.analysis import analyze

    return analyze


class FleetView:
    """Holds the latest :class:`FleetSnapshot`; ``notify()`` after every ingest."""

    def __init__(
        self,
        store: Store,
        analyze: Callable | None = None,
        *,
        debounce_s: float = 2.0,
        max_delay_s: float = 30.0,
        history_scans: int = 20,
        on_refresh: Callable[[FleetSnapshot], None] | None = None,
    ):
        self.store = store
        self._analyze = analyze
        self.debounce_s = debounce_s
        self.max_delay_s = max_delay_s
        self.history_scans = history_scans
        self.on_refresh = on_refresh
        self.snapshot = FleetSnapshot()
        self._verdicts: list[dict] = []  # of the latest analysis that succeeded
        self._summary: dict = {}
        self._verdicts_ts: float | None = None
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()

    def notify(self) -> None:
        self._dirty.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fleet-analysis", daemon=True)
        self._thread.start()
        self.notify()  # analyse what the database already holds

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            first = time.monotonic()
            while not self._stop.is_set():
                self._dirty.clear()
                remaining = self.max_delay_s - (time.monotonic() - first)
                if remaining <= 0 or not self._dirty.wait(min(self.debounce_s, remaining)):
                    break  # quiet for debounce_s, or waited long enough
            if not self._stop.is_set():
                try:
                    self.refresh()
                except Exception:  # e.g. the database is unreadable: keep the last view, try again later
                    log.exception("fleet view refresh failed; keeping the previous view")

    def refresh(self) -> FleetSnapshot:
        """Recompute now (in the caller's thread) and publish the result. When the analysis refuses
        the stored data, the snapshot carries the error and the verdicts of the latest analysis that
        succeeded: one bad upload does not blank the fleet."""
        with self._refresh_lock:
            t0, now = time.perf_counter(), time.time()
            devices, samples, history = self.store.fleet_input(self.history_scans)
            error = None
            if devices:
                try:
                    self._verdicts, self._summary = self._run_analysis(samples, history)
                    self._verdicts_ts = now
                except StragglerError as e:  # e.g. too few devices: shown, not fatal
                    error = str(e)
                    log.warning("fleet analysis refused the stored data; keeping the previous verdicts: %s", e)
                except Exception as e:  # a bug in the analysis must not take the service down
                    log.exception("fleet analysis failed; keeping the previous verdicts")
                    error = f"analysis failed: {type(e).__name__}: {e}"
            snap = FleetSnapshot(
                computed_ts=now,
                gpus=build_gpus(devices, self._verdicts),
                summary=self._summary,
                error=error,
                duration_s=time.perf_counter() - t0,
                verdicts_ts=self._verdicts_ts,
            )
            self.snapshot = snap
        if self.on_refresh is not None:
            self.on_refresh(snap)
        return snap

    def _run_analysis(self, samples: tuple[list[str], list[tuple]],
                      history: tuple[list[str], list[tuple]]) -> tuple[list[dict], dict]:
        import pandas as pd

        analyze = self._analyze or default_analyze()
        cols, rows = samples
        current = pd.DataFrame.from_records(rows, columns=cols)
        cols, rows = history
        past = pd.DataFrame.from_records(rows, columns=cols) if rows else None
        res = analyze(current, past)
        return res.devices.to_dict("records"), dict(res.summary)
