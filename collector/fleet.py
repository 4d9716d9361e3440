"""The fleet view: the analysis engine over each device's latest scan plus its history.

:class:`FleetView` recomputes off the request path, in its own thread, a short while after results
arrive (debounced, and at most ``max_delay_s`` after the first unprocessed arrival), and publishes
an immutable :class:`FleetSnapshot` that the API and ``/metrics`` read.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from straggler.errors import StragglerError
from straggler.jsonsafe import json_safe
from straggler.verdict import device_tier

from .history import HistoryCache
from .latest import LatestSamples
from .store import PastSummaries, Store

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


def verdict_entries(table) -> dict[tuple[str, str], list[dict]]:
    """The analysis' device table (a DataFrame: one row per host, gpu, probe) as JSON-safe
    per-probe entries by device, sorted by probe and settings. Column by column (``json_safe`` of
    each column at once), not value by value: at 100,000 GPUs the device table has 300,000 rows."""
    n = len(table)
    if n == 0:
        return {}
    keys = list(REQUIRED_VERDICT) + [c for c in table.columns if c not in DEVICE_FIELDS and c not in REQUIRED_VERDICT]
    values = [json_safe(table[c]) if c in table.columns else [None] * n for c in keys]
    i_straggler, i_causes = keys.index("straggler"), keys.index("causes")
    values[i_straggler] = [bool(x) for x in values[i_straggler]]
    values[i_causes] = [list(x or []) for x in values[i_causes]]
    by_key: dict[tuple[str, str], list[dict]] = {}
    for host, gpu, row in zip(json_safe(table["host"]), json_safe(table["gpu"]), zip(*values)):
        by_key.setdefault((host, gpu), []).append(dict(zip(keys, row)))
    for probes in by_key.values():
        probes.sort(key=lambda p: (p["probe"], p["settings"] or ""))
    return by_key


def join_gpus(devices: list[dict], entries: Mapping[tuple[str, str], list[dict]]) -> tuple[dict, ...]:
    """The device table (host, gpu, index, model, last_ts, last_scan_id) joined with
    :func:`verdict_entries`. Each device adds its tier from its probes (``straggler.verdict.device_tier``:
    ``verdict``, ``degraded``, ``samples_needed``, ``perf_class``; ``verdict`` null before any analysis)."""
    out = []
    for d in devices:
        probes = list(entries.get((d["host"], d["gpu"]), ()))
        out.append({**d, "straggler": any(p["straggler"] for p in probes), **device_tier(probes), "probes": probes})
    return tuple(out)


def build_gpus(devices: list[dict], verdicts: list[dict]) -> tuple[dict, ...]:
    """Join the device table with the analysis rows, given as dicts (:func:`verdict_entries`,
    :func:`join_gpus`)."""
    import pandas as pd

    return join_gpus(devices, verdict_entries(pd.DataFrame.from_records(verdicts)))


def input_frames(samples, history: tuple):
    """The analysis' input and history DataFrames from the store's reads (``samples``: a DataFrame,
    :attr:`FleetInput.latest`; ``history``: any number of parts, each :class:`PastSummaries` or a
    table of (columns, tuples), e.g. :meth:`Store.earlier_scans`' summaries and samples; None when
    all are empty)."""
    import pandas as pd

    current = samples
    parts = [
        summary_frame(part) if isinstance(part, PastSummaries) else pd.DataFrame.from_records(part[1], columns=part[0])
        for part in history
        if len(part if isinstance(part, PastSummaries) else part[1])
    ]
    past = None if not parts else parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    return current, past


def summary_frame(past: PastSummaries):
    """The summaries as a history DataFrame (SUMMARY_COLUMNS), its text as categoricals made from
    the numbers they were read as (the analysis codes them without hashing a string per row)."""
    import numpy as np
    import pandas as pd

    keys = pd.DataFrame.from_records(past.keys, columns=["host", "gpu", "probe", "settings"])

    def text(codes: np.ndarray, values) -> pd.Categorical:
        """Categories in the order of the numbers; a None value is a missing cell."""
        values = pd.array(values, dtype="string")
        code, cats = pd.factorize(values, use_na_sentinel=True)  # the same text twice: one category
        return pd.Categorical.from_codes(code[codes], categories=pd.Index(cats, dtype="string"))

    frame = {"ts": past.ts, "scan_id": text(past.scan, past.scan_ids)}
    frame.update({c: text(past.device, keys[c]) for c in ("host", "gpu")})
    frame["model"] = text(past.model, past.models)
    frame.update({c: text(past.device, keys[c]) for c in ("probe", "settings")})
    frame.update(value=past.value, median=past.median)
    return pd.DataFrame(frame)


SUMMARY_NEEDS = ("host", "gpu", "probe", "settings", "model", "value", "median", "n_samples")


def summaries_to_write(devices, current: Mapping[str, Sequence]) -> list[tuple]:
    """The per-scan summaries (``SUMMARY_FIELDS`` tuples) of each device's latest scan that this
    analysis' device table (``devices``: ``res.devices``) gives and the store does not hold as they
    are (``current``: :attr:`FleetInput.current`): new, changed, or of a scan that took rows since.
    A device without a finite value and median gets none (its scan is read from its samples later).
    A summary of the same ``writes`` is of the same samples, so of the same ``n_samples``."""
    import numpy as np
    import pandas as pd

    if len(devices) == 0 or any(c not in devices.columns for c in SUMMARY_NEEDS):
        return []  # e.g. a replaced analysis (tests)
    mine = pd.DataFrame({c: devices[c] for c in SUMMARY_NEEDS})
    mine["settings"] = mine["settings"].astype(object).where(mine["settings"].notna(), "")
    for c in ("host", "gpu", "probe", "settings"):
        mine[c] = mine[c].astype(object)
    mine = mine[np.isfinite(mine["value"].to_numpy(float)) & np.isfinite(mine["median"].to_numpy(float))]
    stored = pd.DataFrame(current)
    both = mine.merge(stored, on=["host", "gpu", "probe", "settings"], how="inner", suffixes=("", "_stored"))
    same = (
        (both["value"] == both["value_stored"])
        & (both["median"] == both["median_stored"])
        & (both["writes"] == both["summary_writes"])
        & (both["model"].astype(object) == both["model_stored"].astype(object))
    )
    new = both[~same.fillna(False).to_numpy(bool)]
    out = pd.DataFrame(
        {
            "host": new["host"],
            "gpu": new["gpu"],
            "probe": new["probe"],
            "settings": new["settings"],
            "scan_id": new["scan_id"],
            "model": new["model"].astype(object).where(new["model"].notna(), None),
            "ts": new["last_ts"],
            "value": new["value"].astype(float),
            "median": new["median"].astype(float),
            "n_samples": new["n_samples"].astype("int64"),
            "writes": new["writes"].astype("int64"),
        }
    )
    return [
        (h, g, p, st, sid, m, float(ts), float(v), float(md), int(n), int(w))
        for h, g, p, st, sid, m, ts, v, md, n, w in out.itertuples(index=False, name=None)
        if ts == ts  # a scan without a time (none: latest_scans.last_ts falls back on the receipt time)
    ]


def analyse_stored(
    store: Store,
    history_scans: int,
    analyze: Callable | None = None,
    history: HistoryCache | None = None,
    *,
    latest: LatestSamples | None = None,
    defer_summaries: bool = False,
) -> dict:
    """One fleet analysis of what ``store`` holds: ``devices`` (the device table), ``entries``
    (:func:`verdict_entries`, None when the analysis refused the data or failed), ``summary``,
    ``error`` (None, or one line; ``traceback`` with it when the analysis failed), ``summaries``
    (the per-scan summaries of the latest scans it wrote), ``cpu_s`` (this process' CPU seconds for it).

    After an analysis that succeeded, the device table's estimate of each device's latest scan is
    written as that scan's summary (:func:`summaries_to_write`), which later refreshes read as its
    history instead of the scan's samples. ``history``: the process' copy of the history
    (:class:`HistoryCache`), read from the database only where it changed, and ``latest`` its copy
    of the latest scans' samples (:class:`LatestSamples`), which follows it. ``defer_summaries``:
    not written here; ``pending`` is then the function that writes them (and returns how many),
    for the fleet view to call once it has published the verdicts."""
    cpu = time.process_time()
    read = store.fleet_input(history_scans, history, latest)
    out: dict[str, Any] = {"devices": read.devices, "entries": None, "summary": None, "error": None, "summaries": 0}
    if read.devices:
        try:
            res = (analyze or default_analyze())(*input_frames(read.latest, read.history))
            out["entries"], out["summary"] = verdict_entries(res.devices), dict(res.summary)
        except StragglerError as e:  # e.g. too few devices: shown, not fatal
            out["error"] = str(e)
        except Exception as e:  # noqa: BLE001 -- a bug in the analysis must not take the service down (logged by the view)
            out["error"], out["traceback"] = f"analysis failed: {type(e).__name__}: {e}", traceback.format_exc()
        else:
            write = _summary_writer(store, res.devices, read.current)
            if defer_summaries:
                out["pending"] = write
            else:
                out["summaries"] = write()
    out["cpu_s"] = time.process_time() - cpu
    return out


def _summary_writer(store: Store, devices, current: Mapping[str, Sequence]) -> Callable[[], int]:
    """The function that writes the analysis' per-scan summaries (:func:`summaries_to_write`) and
    returns how many it wrote. ``current`` was read in the analysis' snapshot: a batch that lands
    meanwhile counts up its scan's ``writes``, so a summary of the older samples is not current."""

    def write() -> int:
        try:
            return store.write_summaries(summaries_to_write(devices, current), time.time())
        except store.errors as e:  # e.g. the disk is full: the verdicts stand; the samples are read instead
            log.warning("fleet view: per-scan summaries not stored (%s); their samples are read instead", e)
            return 0

    return write


def _timed_write(write: Callable[[], int] | None) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    n = write() if write is not None else 0
    return {"summaries": n, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


# in the analysis process: its own connection to the database, and its copy of the history
_WORKER_STORE: dict[str, tuple[Store, HistoryCache, LatestSamples]] = {}
_WORKER_PENDING: dict[str, Callable[[], int]] = {}  # the summaries of its latest analysis, not yet written


def _analyse_in_worker(target: str, history_scans: int) -> dict:
    got = _WORKER_STORE.get(target)  # target: an SQLite path or a postgresql:// URL
    if got is None:
        got = _WORKER_STORE[target] = (Store(target), HistoryCache(), LatestSamples())
    _WORKER_PENDING.pop(target, None)  # never written (the view stopped first): this analysis' replace them
    out = analyse_stored(got[0], history_scans, history=got[1], latest=got[2], defer_summaries=True)
    write = out.pop("pending", None)
    if write is not None:
        _WORKER_PENDING[target] = write
    out["pending"] = write is not None
    return out


def _write_in_worker(target: str) -> dict:
    return _timed_write(_WORKER_PENDING.pop(target, None))


def default_analyze() -> Callable:
    from straggler.analysis import analyze

    return analyze


class FleetView:
    """Holds the latest :class:`FleetSnapshot`; ``notify()`` after every ingest.

    ``worker="process"``: the analysis (the store's read, the DataFrames, the engine and the
    JSON-safe verdicts) runs in a child process of its own, so that it holds no lock ingest needs
    (the GIL): the view's thread only waits for it and joins its verdicts with the device table.
    ``"thread"`` runs it in the view's own thread (and always with a replaced ``analyze``)."""

    def __init__(
        self,
        store: Store,
        analyze: Callable | None = None,
        *,
        debounce_s: float = 2.0,
        max_delay_s: float = 30.0,
        history_scans: int = 20,
        on_refresh: Callable[[FleetSnapshot], None] | None = None,
        worker: str = "thread",
    ):
        if worker not in ("thread", "process"):
            raise ValueError(f"worker: 'thread' or 'process', got {worker!r}")
        self.store = store
        self._analyze = analyze
        self.debounce_s = debounce_s
        self.max_delay_s = max_delay_s
        self.history_scans = history_scans
        self.on_refresh = on_refresh
        self.worker = worker if analyze is None else "thread"
        self.snapshot = FleetSnapshot()
        self._entries: Mapping[tuple[str, str], list[dict]] = {}  # of the latest analysis that succeeded
        self._summary: dict = {}
        self._verdicts_ts: float | None = None
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_lock = threading.Lock()
        self._pool = None  # the analysis process (worker="process"), started at the first refresh
        self._history = HistoryCache()  # worker="thread": this process' copy of the history
        self._latest = LatestSamples()  # and of the latest samples
        self.last_cpu_s: float | None = None  # CPU seconds of the latest analysis, where it ran
        # the latest write of per-scan summaries, after its refresh published: summaries, wall_s, cpu_s
        self.last_summaries: dict | None = None
        self._writing = None  # worker="process": the Future of that write, while it runs
        self._analyses = 0  # analyses started (a write of an older one's summaries is skipped)

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
        with self._refresh_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

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

    def _analyse(self) -> dict:
        if self.worker == "thread":
            return analyse_stored(
                self.store, self.history_scans, self._analyze, self._history, latest=self._latest, defer_summaries=True
            )
        from concurrent.futures.process import BrokenProcessPool

        try:
            fut = self._process().submit(_analyse_in_worker, self._target(), self.history_scans)
        except BrokenProcessPool as e:  # it died since the last refresh (e.g. in its write, or killed): a fresh one
            log.warning("fleet view: the analysis process had stopped (%s); starting another", e)
            self._drop_process()
            fut = self._process().submit(_analyse_in_worker, self._target(), self.history_scans)
        try:
            return fut.result()
        except Exception:
            self._drop_process()  # e.g. the process died in this analysis: a fresh one next time
            raise

    def _process(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a fork of this threaded process could inherit a held lock
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _drop_process(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def refresh(self) -> FleetSnapshot:
        """Recompute now (in the caller's thread, or waiting for the analysis process) and publish
        the result. When the analysis refuses the stored data, the snapshot carries the error and
        the verdicts of the latest analysis that succeeded: one bad upload does not blank the fleet."""
        with self._refresh_lock:
            t0, now = time.perf_counter(), time.time()
            self._analyses += 1
            out, mine = self._analyse(), self._analyses
            if out["entries"] is not None:
                self._entries, self._summary, self._verdicts_ts = out["entries"], out["summary"], now
            self.last_cpu_s = out["cpu_s"]
            if "traceback" in out:
                log.error("fleet analysis failed; keeping the previous verdicts\n%s", out["traceback"])
            elif out["error"] is not None:
                log.warning("fleet analysis refused the stored data; keeping the previous verdicts: %s", out["error"])
            snap = FleetSnapshot(
                computed_ts=now,
                gpus=join_gpus(out["devices"], self._entries),
                summary=self._summary,
                error=out["error"],
                duration_s=time.perf_counter() - t0,
                verdicts_ts=self._verdicts_ts,
            )
            self.snapshot = snap
        try:
            if self.on_refresh is not None:
                self.on_refresh(snap)
        finally:
            self._write_summaries(out, mine)
        return snap

    def _target(self) -> str:
        return str(self.store.url or self.store.path)

    def _write_summaries(self, out: dict, analysis: int) -> None:
        """Write the per-scan summaries of the refresh's analysis (number ``analysis``) once its
        verdicts are out: in this thread, or queued in the analysis process (its next analysis
        waits for the write). Not when a later analysis ran meanwhile: it writes its own, newer."""
        with self._refresh_lock:
            if not out.get("pending") or analysis != self._analyses:
                return
            if self.worker == "thread":
                self.last_summaries = _timed_write(out["pending"])
                return
            if self._pool is None:
                return
            try:
                self._writing = self._pool.submit(_write_in_worker, self._target())
            except RuntimeError as e:  # BrokenProcessPool: the next refresh starts another process
                log.warning("fleet view: per-scan summaries not stored (%s)", e)
                return
            self._writing.add_done_callback(self._written)

    def _written(self, fut) -> None:
        """The write's outcome (in whichever thread completes it: it takes no lock)."""
        if fut.cancelled():
            return  # the view stopped first: the next analysis writes its own
        if fut.exception() is not None:  # e.g. the analysis process died: its samples are read instead
            log.warning("fleet view: per-scan summaries not stored (%s)", fut.exception())
        else:
            self.last_summaries = fut.result()

    def settle(self, timeout_s: float | None = None) -> dict | None:
        """Wait for the latest refresh's write of per-scan summaries; returns ``last_summaries``,
        or None when it did not finish within ``timeout_s``."""
        from concurrent.futures import TimeoutError as FutureTimeout

        fut = self._writing
        if fut is not None:
            try:
                fut.result(timeout_s)
            except FutureTimeout:
                return None
            except Exception:  # noqa: BLE001 -- logged by _written; the summaries are read as samples instead
                pass
        return self.last_summaries
