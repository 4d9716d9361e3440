"""Each device against its own past, keyed by its UUID (``gpu``), probe and settings.

Scans are told apart by ``scan_id`` (ordered by their latest ``ts`` when there is one, else by
first appearance). Per device the latest scan is the current one and earlier scans are its
history; history given separately (the collector's store) is added to them. The baseline is the
median of the device's earliest half of past scans (so a slow drift is measured from where it
started, not from its middle); the change test compares the current value with that baseline
against the scan-to-scan noise pooled over the peer group (and the current value's own error).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from . import groups

HISTORY = "history"


def scan_rank(frame: pd.DataFrame) -> np.ndarray:
    """Order of each row's scan (0 = oldest). One scan when there is no ``scan_id``."""
    if "scan_id" not in frame.columns:
        return np.zeros(len(frame), dtype=np.int64)
    sid = frame["scan_id"].astype("string").fillna("")
    if len(sid) == 0 or bool((sid == sid.iloc[0]).all()):  # one scan (cheaper than factorizing)
        return np.zeros(len(frame), dtype=np.int64)
    code, n = groups.factorize(sid)
    if "ts" in frame.columns:
        ts = pd.to_numeric(frame["ts"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        when = groups.extreme(code, ts, n, "max")
        when = np.where(np.isfinite(when), when, -np.inf)
        order = np.lexsort((np.arange(n), when))  # by time, ties by first appearance
    else:
        order = np.arange(n)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank[code]


def current_rows(dev: np.ndarray, n_dev: int, rank: np.ndarray) -> np.ndarray:
    """True for the rows of each device's latest scan."""
    if len(rank) == 0 or rank.min() == rank.max():
        return np.ones(len(rank), dtype=bool)
    latest = groups.extreme(dev, rank.astype(float), n_dev, "max")
    return rank == latest[dev]


@dataclass(frozen=True)
class HistoryVerdict:
    n_scans: np.ndarray  # past scans of the device
    baseline: np.ndarray  # its own baseline value
    deficit: np.ndarray  # 1 - value / baseline
    p_value: np.ndarray


def compare(value: np.ndarray, se_rel: np.ndarray, group_of_dev: np.ndarray, n_group: int,
            s_dev: np.ndarray, s_rank: np.ndarray, s_val: np.ndarray) -> HistoryVerdict:
    """``s_*``: one entry per (current device, past scan): device index (0..n-1), scan rank and
    the device's value in that scan (estimated like the current one, transients removed)."""
    n_dev = len(value)
    nan = np.full(n_dev, np.nan)
    if len(s_dev) == 0:
        return HistoryVerdict(np.zeros(n_dev, dtype=np.int64), nan, nan.copy(), nan.copy())
    order = np.lexsort((s_rank, s_dev))
    s_dev, s_val = s_dev[order], s_val[order]
    k = np.bincount(s_dev, minlength=n_dev)
    start = np.cumsum(k) - k
    pos = np.arange(len(s_dev)) - start[s_dev]  # 0 = the device's oldest past scan
    early = pos < (k[s_dev] + 1) // 2
    baseline = groups.median(s_dev[early], s_val[early], n_dev)

    # Scan-to-scan noise: pooled variance of past scan values around each device's past mean.
    mean_past = groups.mean(s_dev, s_val, n_dev)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = s_val / mean_past[s_dev] - 1
        g = group_of_dev[s_dev]
        dof = np.bincount(group_of_dev, weights=np.maximum(k - 1, 0), minlength=n_group)
        var = np.bincount(g, weights=np.nan_to_num(r * r), minlength=n_group) / dof
        var = np.where(dof > 0, var, np.nan)[group_of_dev]
        # A scan's value varies by `var` (sampling error and scan-to-scan change together): the
        # current value by that much, the baseline (a median of ceil(k/2) scans) by 1.57 var / n.
        n_base = np.maximum((k + 1) // 2, 1)
        var_diff = np.where(np.isfinite(var), var * (1 + np.where(n_base > 1, 1.57, 1.0) / n_base),
                            2 * se_rel ** 2)  # no repeated past scans: the sampling error only
        deficit = 1 - value / baseline
        z = deficit / np.sqrt(var_diff)
    p = np.where(k > 0, special.ndtr(-z), np.nan)
    return HistoryVerdict(k, np.where(k > 0, baseline, np.nan), np.where(k > 0, deficit, np.nan), p)
