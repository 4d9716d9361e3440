"""Each device against its own past, keyed by its UUID (``gpu``), probe and settings.

Scans are told apart by ``scan_id`` (ordered by their latest ``ts`` when there is one, else by
first appearance). Per device the latest scan is the current one and earlier scans are its
history; history given separately (the collector's store) is added to them. The baseline is the
median of the device's earliest half of past scans (so a slow drift is measured from where it
started, not from its middle); the change test compares the current value with that baseline
against the scan-to-scan noise pooled over the peer group (and the current value's own error).
A device with peers is followed relative to them (its value over the peer group's centre in each
scan), so a change of the whole fleet is not a change of each device; a device without peers is
followed on its absolute values. That test decides only for a device without peers; the series of
past scans and the current one also gives each device its change point (change.py), from which the
tiers derive ``degraded``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from . import groups, validate
from .change import Change, changepoint
from .codes import Codes, PastScans


def scan_rank(frame: pd.DataFrame) -> np.ndarray:
    """Order of each row's scan (0 = oldest). One scan when there is no ``scan_id``."""
    if "scan_id" not in frame.columns:
        return np.zeros(len(frame), dtype=np.int64)
    sid = validate.blank_missing(validate.as_text(frame["scan_id"]))
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


MEDIAN_MIN = 4  # a centre is the median of at least this many devices, else the others' mean
# Prior scan-to-scan standard deviation of a device's value, used where the peer group's past scans
# cannot estimate it (one past scan each) and weighted by ``prior_df`` against the pooled estimate.
# Relative to its peers a device moves little between scans (0.3% in the benchmark's fleet); its
# absolute value moves with the room, the driver and the firmware, so a lone device needs more.
SCAN_SD_PEERS = 0.005
SCAN_SD_ALONE = 0.02


@dataclass(frozen=True)
class HistoryVerdict:
    n_scans: np.ndarray  # past scans of the device
    baseline: np.ndarray  # its own baseline value (with peers: in terms of today's peer centre)
    deficit: np.ndarray  # 1 - value / baseline
    p_value: np.ndarray
    relative: np.ndarray  # True where compared relative to its peers (False: absolute values)
    se: np.ndarray  # standard error of the deficit (normal)
    change: Change | None = None  # the change point of the series of past scans and the current one
    change_rank: np.ndarray | None = None  # scan rank of the first scan after the change (-1: none)


def centre(key: np.ndarray, value: np.ndarray, n_key: int) -> np.ndarray:
    """Per entry, the centre of its key's values: their median where the key has at least
    ``MEDIAN_MIN`` finite values, the mean of the others' where it has 2-3, else NaN."""
    ok = np.isfinite(value)
    cnt = groups.count(key, n_key, ok)[key]
    tot = groups.total(key, value, n_key, ok)[key]
    with np.errstate(invalid="ignore", divide="ignore"):
        others = (tot - np.where(ok, value, 0.0)) / (cnt - ok)
    big = cnt >= MEDIAN_MIN
    out = np.where(cnt >= 2, others, np.nan)
    if big.any():
        out[big] = groups.median(key, value, n_key)[key][big]
    return out


def compare(
    codes: Codes,
    past: PastScans,
    *,
    value: np.ndarray,
    se_rel: np.ndarray,
    past_value: np.ndarray,
    prior_df: float = 8.0,
) -> HistoryVerdict:
    """``value``: each device's current value; ``past_value``: its value in each past scan of
    ``past`` (``past.value`` or ``past.median``, matching ``value``), by the ``codes`` of the
    devices and their current scans.

    A device with peers (2+ devices in its group now) is compared relative to them: its current
    value over its peers' current centre, each past value over the centre of the group in that
    scan (every device measured in it), so a change of the whole fleet (driver, room temperature)
    cancels out; a past scan in which the device had no peer is left out. A device without peers
    is compared on its absolute values."""
    group_of_dev, n_group, cur_rank = codes.group, codes.n_group, codes.cur_rank
    s_dev, s_rank, s_val = past.dev, past.rank, past_value
    n_dev = len(value)
    nan = np.full(n_dev, np.nan)
    peers_now = np.bincount(group_of_dev, weights=np.isfinite(value), minlength=n_group)[group_of_dev] >= 2
    if len(s_dev) == 0:
        return HistoryVerdict(np.zeros(n_dev, dtype=np.int64), nan, nan.copy(), nan.copy(), peers_now, nan.copy())
    cur_centre = centre(group_of_dev, value, n_group)
    key, n_key = groups.factorize(
        np.concatenate([group_of_dev[s_dev], group_of_dev]), np.concatenate([s_rank, cur_rank])
    )
    past_centre = centre(key, np.concatenate([s_val, value]), n_key)[: len(s_dev)]
    rel = peers_now[s_dev]
    with np.errstate(invalid="ignore", divide="ignore"):
        s_val = np.where(rel, s_val / past_centre, s_val)
        value = np.where(peers_now, value / cur_centre, value)
    use = np.isfinite(s_val)
    if not use.all():
        s_dev, s_rank, s_val = s_dev[use], s_rank[use], s_val[use]
    order = np.lexsort((s_rank, s_dev))
    s_dev, s_val, s_rank = s_dev[order], s_val[order], s_rank[order]
    k = np.bincount(s_dev, minlength=n_dev)
    start = np.cumsum(k) - k
    pos = np.arange(len(s_dev)) - start[s_dev]  # 0 = the device's oldest past scan
    early = pos < (k[s_dev] + 1) // 2
    baseline = groups.median(s_dev[early], s_val[early], n_dev)

    # Scan-to-scan noise: pooled variance of past scan values around each device's past mean,
    # moderated with a prior (SCAN_SD_*, weight prior_df): with one past scan each there is no
    # pooled estimate, and the sampling error alone would take every small change for real.
    mean_past = groups.mean(s_dev, s_val, n_dev)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = s_val / mean_past[s_dev] - 1
        g = group_of_dev[s_dev]
        dof = np.bincount(group_of_dev, weights=np.maximum(k - 1, 0), minlength=n_group)
        ss = np.bincount(g, weights=np.nan_to_num(r * r), minlength=n_group)
        prior_var = np.nan_to_num(se_rel**2) + np.where(peers_now, SCAN_SD_PEERS, SCAN_SD_ALONE) ** 2
        var = (prior_df * prior_var + ss[group_of_dev]) / (prior_df + dof[group_of_dev])
        # A scan's value varies by `var` (sampling error and scan-to-scan change together): the
        # current value by that much, the baseline (a median of ceil(k/2) scans) by 1.57 var / n.
        n_base = np.maximum((k + 1) // 2, 1)
        var_diff = var * (1 + np.where(n_base > 1, 1.57, 1.0) / n_base)
        deficit = 1 - value / baseline
        z = deficit / np.sqrt(var_diff)
    p = np.where(k > 0, special.ndtr(-z), np.nan)
    shown = np.where(peers_now, baseline * cur_centre, baseline)  # in the current value's terms
    change, change_rank = _change(
        s_dev, pos, s_val, s_rank, value, cur_rank, k, group_of_dev, n_group, prior_var, prior_df
    )
    return HistoryVerdict(
        k,
        np.where(k > 0, shown, np.nan),
        np.where(k > 0, deficit, np.nan),
        p,
        peers_now,
        np.where(k > 0, np.sqrt(var_diff), np.nan),
        change,
        change_rank,
    )


def _change(s_dev, pos, s_val, s_rank, value, cur_rank, k, group_of_dev, n_group, prior_var, prior_df):
    """The change point of each device's series: its past scans (sorted by device, then scan) and
    its current value last. Returns (Change, scan rank of the first scan after the change)."""
    n_dev = len(value)
    now = np.flatnonzero((k > 0) & np.isfinite(value))
    dev = np.concatenate([s_dev, now])
    at = np.concatenate([pos, k[now]])
    order = np.lexsort((at, dev))
    x = np.concatenate([s_val, value[now]])[order]
    ranks = np.concatenate([s_rank, cur_rank[now]])[order]
    dev, at = dev[order], at[order]
    keep = np.isin(dev, now)  # a device without a current value has no series to test
    dev, at, x, ranks = dev[keep], at[keep], x[keep], ranks[keep]
    ch = changepoint(dev, at, x, n_dev, group_of_dev, n_group, prior_var, prior_df)
    k_all = np.bincount(dev, minlength=n_dev)
    start = np.cumsum(k_all) - k_all
    rank = (
        np.where(ch.start >= 0, ranks[np.clip(start + ch.start, 0, max(len(ranks) - 1, 0))], -1)
        if len(ranks)
        else np.full(n_dev, -1)
    )
    return ch, rank
