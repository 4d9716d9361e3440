"""Retention of raw results: rows received longer than ``result_retention_s`` ago are deleted in
the background, a few thousand at a time, each chunk its own short write transaction, so that an
ingest waits at most one chunk for the write lock.

The scans history is picked from (``probe_scans``) go with their rows; each device's latest scan
(``latest_scans``) and the device table stay, so a device whose results all aged out is still
listed (with its last result time, and no verdict), never dropped silently. The SQL is plain
(``IN (SELECT ... LIMIT)``, ``NOT EXISTS``): it runs on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("straggler.collector")

PRUNE_EVERY_S = 3600.0  # how often the background pass runs (and once at start)
CHUNK_ROWS = 5000  # rows deleted per write transaction
_OLD_RESULTS = (
    "DELETE FROM results WHERE id IN (SELECT id FROM results WHERE received_ts < ? ORDER BY received_ts LIMIT ?)"
)
_OLD_SCANS = """DELETE FROM probe_scans WHERE last_ts < ? AND NOT EXISTS (
    SELECT 1 FROM latest_scans l WHERE l.host = probe_scans.host AND l.gpu = probe_scans.gpu
    AND l.probe = probe_scans.probe AND l.settings = probe_scans.settings AND l.scan_id = probe_scans.scan_id)"""


class Retention:
    """Prunes ``store``'s raw results older than ``keep_s`` (by the collector's receipt time)."""

    def __init__(
        self,
        store,
        keep_s: float,
        clock: Callable[[], float] = time.time,
        chunk_rows: int = CHUNK_ROWS,
        every_s: float = PRUNE_EVERY_S,
    ):
        self.store, self.keep_s, self.clock = store, keep_s, clock
        self.chunk_rows, self.every_s = chunk_rows, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pruned_rows = 0  # since start

    def prune_once(self) -> int:
        """Delete what has aged out now; returns the result rows deleted."""
        cutoff, total = self.clock() - self.keep_s, 0
        while not self._stop.is_set():
            with self.store._transaction() as conn:
                n = conn.execute(_OLD_RESULTS, (cutoff, self.chunk_rows)).rowcount
            total += n
            if n < self.chunk_rows:
                break
            time.sleep(0)  # let a waiting ingest take the write lock between chunks
        with self.store._transaction() as conn:
            conn.execute(_OLD_SCANS, (cutoff,))
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
