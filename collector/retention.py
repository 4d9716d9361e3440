"""Retention: raw results received longer than ``result_retention_s`` ago are deleted in the
background, a few thousand at a time, each chunk its own short write transaction, so that an ingest
waits at most one chunk for the write lock; per-scan summaries (the history the fleet view reads)
of scans older than ``summary_retention_s`` too.

A scan the history is picked from (``probe_scans``) stays while it has a current summary, and goes
with its rows where it has none; each device's latest scan (``latest_scans``) and the device table stay, so a
device whose results all aged out is still listed (with its last result time, and no verdict), never
dropped silently. The SQL is plain (``IN (SELECT ... LIMIT)``, ``NOT EXISTS``): it runs on SQLite
and PostgreSQL alike.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .settings import CollectorSettings

log = logging.getLogger("straggler.collector")

PRUNE_EVERY_S = 3600.0  # how often the background pass runs (and once at start)
CHUNK_ROWS = 5000  # rows deleted per write transaction
_OLD_RESULTS = (
    "DELETE FROM results WHERE id IN (SELECT id FROM results WHERE received_ts < ? ORDER BY received_ts LIMIT ?)"
)
_OLD_SUMMARIES = """DELETE FROM scan_summaries WHERE (host, gpu, probe, settings, scan_id) IN (
    SELECT m.host, m.gpu, m.probe, m.settings, m.scan_id FROM scan_summaries m
    WHERE m.ts < ? AND NOT EXISTS (
        SELECT 1 FROM latest_scans l WHERE l.host = m.host AND l.gpu = m.gpu
        AND l.probe = m.probe AND l.settings = m.settings AND l.scan_id = m.scan_id) ORDER BY m.ts LIMIT ?)"""
# Scans of a time in [?, ?) that are neither a latest scan nor kept by a current summary (one of
# the scan's present ``writes``): a scan with a stale summary goes with its rows too, else it would
# hold a place in the history with nothing to read. By the time index, in chunks.
_OLD_SCANS = """DELETE FROM probe_scans WHERE (host, gpu, probe, settings, scan_id) IN (
    SELECT s.host, s.gpu, s.probe, s.settings, s.scan_id FROM probe_scans s
    WHERE s.last_ts >= ? AND s.last_ts < ? AND NOT EXISTS (
        SELECT 1 FROM latest_scans l WHERE l.host = s.host AND l.gpu = s.gpu
        AND l.probe = s.probe AND l.settings = s.settings AND l.scan_id = s.scan_id)
    AND NOT EXISTS (
        SELECT 1 FROM scan_summaries m WHERE m.host = s.host AND m.gpu = s.gpu AND m.probe = s.probe
        AND m.settings = s.settings AND m.scan_id = s.scan_id AND m.writes = s.writes)
    ORDER BY s.last_ts LIMIT ?)"""

_NEW_EPOCH = "UPDATE fleet_changes SET epoch = epoch + 1 WHERE id = 1"


class Retention:
    """Prunes ``store``'s raw results older than ``keep_s`` (by the collector's receipt time), and
    the per-scan summaries of scans older than ``summary_keep_s`` (by the scan's time)."""

    def __init__(
        self,
        store,
        keep_s: float,
        clock: Callable[[], float] = time.time,
        chunk_rows: int = CHUNK_ROWS,
        every_s: float = PRUNE_EVERY_S,
        summary_keep_s: float = CollectorSettings.summary_retention_s,
    ):
        self.store, self.keep_s, self.summary_keep_s, self.clock = store, keep_s, summary_keep_s, clock
        self.chunk_rows, self.every_s = chunk_rows, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pruned_rows = 0  # since start
        self.pruned_summaries = 0
        self._scans_done_to = float("-inf")  # scans before this time were pruned by an earlier pass

    def _chunks(self, sql: str, *bounds: float, history: bool = False) -> int:
        """``sql`` (a DELETE of at most ``chunk_rows`` rows within ``bounds``) until it deletes fewer.
        ``history``: rows the fleet view's history is read from; a chunk that deleted any counts up
        the change epoch, so that an analysis process holding the history reads it again
        (collector/history.py)."""
        total = 0
        while not self._stop.is_set():
            with self.store._transaction() as conn:
                n = conn.execute(sql, (*bounds, self.chunk_rows)).rowcount
                if n and history:
                    conn.execute(_NEW_EPOCH)
            total += n
            if n < self.chunk_rows:
                break
            time.sleep(0)  # let a waiting ingest take the write lock between chunks
        return total

    def prune_once(self) -> int:
        """Delete what has aged out now; returns the result rows deleted (``pruned_summaries``
        counts the summaries)."""
        cutoff = self.clock() - self.keep_s
        total = self._chunks(_OLD_RESULTS, cutoff, history=True)  # a latest scan's samples too (collector/latest.py)
        self.pruned_summaries += self._chunks(_OLD_SUMMARIES, self.clock() - self.summary_keep_s, history=True)
        # the scans that aged out since the last pass, and all of those of the summaries just pruned
        # (a year of kept scans is not walked again every hour)
        self._chunks(_OLD_SCANS, self._scans_done_to, cutoff, history=True)
        self._chunks(_OLD_SCANS, float("-inf"), min(cutoff, self.clock() - self.summary_keep_s), history=True)
        self._scans_done_to = max(self._scans_done_to, cutoff)
        self.pruned_rows += total
        if total:
            log.info(
                "retention: deleted %d results received before %.0f (result_retention_s=%g)", total, cutoff, self.keep_s
            )
        return total

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.prune_once()
            except Exception:  # e.g. the disk is full: retried at the next pass, ingest goes on
                log.exception("retention pass failed; retrying in %g s", self.every_s)
            self._stop.wait(self.every_s)
