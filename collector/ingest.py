"""What ingest checks before and beside the store: the row count before parsing, how many batches
are parsed at once, and rows that lie about time (with the clock offset seen per agent).

- :func:`count_rows` counts a batch's rows in its raw bytes, so that an oversized batch is refused
  (413) before it is parsed into dicts (parsing takes ~10x the body's size in memory).
- :class:`IngestGate` lets :data:`PARSE_AT_ONCE` batches be parsed and stored at a time: under many
  concurrent maximum batches the collector holds their bodies, not their parsed rows.
- :func:`clock_problem` refuses a row dated more than ``max_clock_skew_s`` ahead of the collector's
  clock (one such row would make its scan the device's latest for good), or before the start of the
  cluster scan it names.
- :class:`ClockOffsets` keeps, per uploading host, the offset between the collector's clock and the
  agent's (sent in the ``X-Straggler-Sent-Ts`` header: the agent's clock when it sent the batch), and
  exports it as ``straggler_collector_agent_clock_offset_seconds{host}``.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from typing import Iterable, Mapping, Sequence

from prometheus_client.core import GaugeMetricFamily

from straggler.records import SENT_TS_HEADER

PARSE_AT_ONCE = 2  # one batch parsed while the one before it is written
# An "id" key opens each row: a "{" or "," before it, a ":" after. Inside a JSON string a quote is
# escaped (\"), so in valid JSON this matches exactly the keys named "id".
_ID_KEY = re.compile(rb'[{,]\s*"id"\s*:')


def count_rows(body: bytes, limit: int) -> int | None:
    """The number of rows in a raw ResultBatch when it is more than ``limit`` (None otherwise, or
    when it cannot tell: the count after parsing decides). Exact for valid JSON; never more than
    the rows a parser would find, so a batch within the limit is never refused by it."""
    if body.count(b'"id"') <= limit:  # an upper bound, at memchr speed: the usual case ends here
        return None
    n = sum(1 for _ in _ID_KEY.finditer(body))
    return n if n > limit else None


class IngestGate:
    """At most :data:`PARSE_AT_ONCE` batches parsed and stored at a time (from the event loop)."""

    def __init__(self, at_once: int = PARSE_AT_ONCE):
        self._sem = asyncio.Semaphore(at_once)

    async def __aenter__(self):
        await self._sem.acquire()

    async def __aexit__(self, *exc):
        self._sem.release()


def clock_problem(
    rows: Sequence[Mapping], now: float, max_skew_s: float, scan_starts: Mapping[str, float]
) -> str | None:
    """The first row whose ``ts`` lies: more than ``max_skew_s`` after ``now``, or more than that
    before the ``start_at`` of the cluster scan it names (``scan_starts``). None when none does."""
    for i, r in enumerate(rows):
        ts = r.get("ts")
        if ts is None:
            continue
        if ts > now + max_skew_s:
            return (
                f"results[{i}].ts: {ts:.3f} is {ts - now:.0f} s ahead of the collector's clock (more than "
                f"max_clock_skew_s={max_skew_s:g}); fix the clock of host {r.get('host')!r} (NTP)"
            )
        start = scan_starts.get(r.get("scan_id") or "")
        if start is not None and ts < start - max_skew_s:
            return (
                f"results[{i}].ts: {ts:.3f} is {start - ts:.0f} s before the start of scan {r['scan_id']!r} "
                f"(more than max_clock_skew_s={max_skew_s:g}); fix the clock of host {r.get('host')!r} (NTP)"
            )
    return None


def scan_ids(rows: Iterable[Mapping]) -> set[str]:
    return {r["scan_id"] for r in rows if r.get("scan_id")}


def sent_ts(headers) -> float | None:
    """The agent's clock when it sent the batch (``X-Straggler-Sent-Ts``), None when absent or not a
    finite number (an old agent, or a bad header: the batch is still taken)."""
    raw = headers.get(SENT_TS_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class ClockOffsets:
    """The latest clock offset seen per uploading host: the collector's clock at receipt minus the
    agent's when it sent (positive: the agent's clock is behind; network delay included)."""

    MAX_HOSTS = 100_000  # a bound on the label set, whatever clients send

    def __init__(self):
        self._lock = threading.Lock()
        self._offsets: dict[str, float] = {}

    def record(self, host: str, offset_s: float) -> None:
        with self._lock:
            if host in self._offsets or len(self._offsets) < self.MAX_HOSTS:
                self._offsets[host] = offset_s

    def get(self, host: str) -> float | None:
        with self._lock:
            return self._offsets.get(host)

    def collect(self):
        g = GaugeMetricFamily(
            "straggler_collector_agent_clock_offset_seconds",
            "Collector clock minus the agent's at its latest upload (X-Straggler-Sent-Ts; "
            "positive: the agent is behind)",
            labels=["host"],
        )
        with self._lock:
            items = sorted(self._offsets.items())
        for host, offset in items:
            g.add_metric([host], offset)
        yield g
