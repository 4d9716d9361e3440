"""A change point in each device's series of per-scan values (its ratio to its peers in each scan, or
its absolute value without peers): the CUSUM change-point statistic, not a comparison of two fixed
windows.

For a series x_1..x_n (oldest first, the current scan last) and each split after tau points, the
standardised CUSUM is Z_tau = (mean(x_1..tau) - mean(x_tau+1..n)) / (sigma sqrt(1/tau + 1/(n-tau))),
which is the cumulative sum of deviations from the overall mean, S_tau = sum_{i<=tau} (x_i - mean),
scaled to unit variance (Hinkley 1971). The change point is the split with the largest Z (one-sided:
a loss); its p-value is Bonferroni over the n-1 splits (conservative for the correlated splits).
sigma, the scan-to-scan standard deviation, is estimated robustly from first differences pooled over
the peer group (1.4826 x the median absolute deviation of x_i - x_i-1 / sqrt 2: a device drifting
steadily moves it little),
moderated with a prior as in history.py. The loss is 1 - current value / mean before the change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

from . import groups


@dataclass(frozen=True)
class Change:
    z: np.ndarray  # the largest standardised CUSUM per device (NaN with fewer than 2 points)
    p_value: np.ndarray  # Bonferroni over the splits
    loss: np.ndarray  # 1 - current / mean before the change point
    start: np.ndarray  # position (0 = oldest) of the first point after the change; -1 where none


def changepoint(
    dev: np.ndarray,
    pos: np.ndarray,
    x: np.ndarray,
    n_dev: int,
    group_of_dev: np.ndarray,
    n_group: int,
    prior_var: np.ndarray,
    prior_df: float,
) -> Change:
    """``dev``, ``pos``, ``x``: one entry per point, sorted by (dev, pos), each device's points at
    positions 0..k-1, the last its current value. ``prior_var``: per device, prior scan-to-scan variance."""
    nan = np.full(n_dev, np.nan)
    k = np.bincount(dev, minlength=n_dev)
    start = np.cumsum(k) - k
    if len(x) == 0:
        return Change(nan, nan.copy(), nan.copy(), np.full(n_dev, -1))
    step = np.r_[np.nan, np.diff(x)]
    step[pos == 0] = np.nan
    g = group_of_dev[dev]
    # Around the group's typical step, so that a group of which only the changed devices have a
    # history (the others measured once) is not taken for a noisy one.
    typical = groups.median(g, step, n_group)
    robust = (1.4826 * groups.median(g, np.abs(step - typical[g]), n_group)) ** 2 / 2
    n_step = groups.count(g, n_group, np.isfinite(step))
    var = (prior_df * prior_var + (n_step * np.nan_to_num(robust))[group_of_dev]) / (prior_df + n_step[group_of_dev])

    c = np.cumsum(x)
    before = np.r_[0.0, c][start]  # the running sum before each device's first point
    s1 = c - before[dev]
    total = s1[start + k - 1][dev] if len(k) else s1
    n = k[dev].astype(float)
    tau = pos + 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = s1 / tau
        m2 = (total - s1) / (n - tau)
        z = (m1 - m2) / np.sqrt(var[dev] * (1 / tau + 1 / (n - tau)))
    z = np.where(tau < n, z, -np.inf)
    order = np.lexsort((-z, dev))  # per device, its largest z first
    first = order[start[k > 0]]
    zmax, best = nan.copy(), np.full(n_dev, -1)
    has = np.flatnonzero(k > 1)
    lead = np.full(n_dev, -1)
    lead[k > 0] = first
    zmax[has] = z[lead[has]]
    best[has] = pos[lead[has]] + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.minimum(1.0, (k - 1) * special.ndtr(-zmax))
        current = x[np.maximum(start + k - 1, 0)]
        loss = np.where(k > 1, 1 - current / m1[np.maximum(lead, 0)], np.nan)
    return Change(zmax, np.where(k > 1, p, np.nan), loss, best)
