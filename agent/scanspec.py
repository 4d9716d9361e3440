"""What the agent accepts from the network: a cluster scan from ``GET /api/v1/scans/next``, checked.

The collector is trusted with nothing. A scan id names files in the spool directory and a URL path
(``POST /api/v1/scans/{id}/status``): it must match ``straggler.scanproto.SCAN_ID`` (letters, digits, ``.``, ``_``,
``-``; no ``/``, no leading dot, so never ``..``), else the scan is dropped unreported -- there is
no safe path to report it on. Probe names must be known probes, the duration finite, > 0 and at most
:data:`MAX_DURATION_S`, and ``start_at`` finite and at most :data:`MAX_START_AHEAD_S` ahead; a scan
with a valid id and a bad field is reported ``failed`` naming the field. Paths are built from a
:class:`ClusterScan` only, never from the raw reply.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from straggler.records import PROBES
from straggler.scanproto import MAX_DURATION_S, MAX_START_DELAY_S, scan_id_problem

MAX_START_AHEAD_S = MAX_START_DELAY_S + 300.0  # the collector's largest start_delay_s, plus a clock skew


class ScanRefused(Exception):
    """A scan that cannot be run; ``scan_id`` is set when it is safe to report it on."""

    def __init__(self, reason: str, scan_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.scan_id = scan_id


@dataclass(frozen=True)
class ClusterScan:
    scan_id: str
    start_at: float | None = None
    probes: tuple[str, ...] | None = None  # None: the agent's own probes
    duration_s: float | None = None  # None: the agent's own duration


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ScanRefused(f"{name} {value!r} is not a finite number")
    return float(value)


def parse_scan(reply: Any, now: float | None = None) -> ClusterScan:
    """The collector's reply as a :class:`ClusterScan`, or :class:`ScanRefused` saying what is wrong."""
    if not isinstance(reply, dict):
        raise ScanRefused(f"the scan is not a JSON object ({type(reply).__name__})")
    scan_id = reply.get("scan_id")
    problem = scan_id_problem(scan_id)
    if problem:
        raise ScanRefused(problem)
    try:
        start_at = reply.get("start_at")
        if start_at is not None:
            start_at = _number(start_at, "start_at")
            ahead_s = start_at - (time.time() if now is None else now)
            if ahead_s > MAX_START_AHEAD_S:
                raise ScanRefused(f"start_at is {ahead_s:.0f} s ahead, more than {MAX_START_AHEAD_S:g} s")
        probes = reply.get("probes")
        if probes is not None:
            if not isinstance(probes, list) or not probes or len(probes) > len(PROBES):
                raise ScanRefused(f"probes must be a list of 1-{len(PROBES)} probe names")
            unknown = [p for p in probes if p not in PROBES]
            if unknown:
                raise ScanRefused(f"unknown probe {str(unknown[0])[:40]!r}; known: {', '.join(PROBES)}")
            probes = tuple(dict.fromkeys(probes))
        duration_s = reply.get("duration_s")
        if duration_s is not None:
            duration_s = _number(duration_s, "duration_s")
            if not 0 < duration_s <= MAX_DURATION_S:
                raise ScanRefused(f"duration_s {duration_s:g} is not in (0, {MAX_DURATION_S:g}]")
    except ScanRefused as e:
        raise ScanRefused(f"invalid scan from the collector: {e.reason}", scan_id) from None
    return ClusterScan(scan_id=scan_id, start_at=start_at, probes=probes, duration_s=duration_s)
