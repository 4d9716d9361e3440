"""Combine each device's repeated samples into one robust estimate with its standard error.

A sample further than ``dip_sigmas`` pooled noise scales (1.4826 x the median absolute deviation
of every sample of the peer group from its device's median) from its device's anchor is a
transient - a dip or a spike - and is left out; the device's value is the mean of the samples kept.
Transients slow a device down, never speed it up, so the anchor is the device's upper quartile
(the 2nd best of 5 samples): up to half of a device's samples may dip without moving it.
Its noise is a moderated variance (the device's own variance shrunk towards the pooled variance of
its peer group with ``prior_df`` degrees of freedom), so 3-5 samples give a usable t statistic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import groups


@dataclass(frozen=True)
class Estimates:
    n_samples: np.ndarray  # samples per device
    n_kept: np.ndarray  # samples kept after transients are removed
    median: np.ndarray
    value: np.ndarray  # mean of the kept samples
    se_rel: np.ndarray  # standard error of value, relative to value
    df: np.ndarray  # degrees of freedom of se_rel
    noise_rel: np.ndarray  # the peer group's pooled per-sample noise, relative
    noise_known: np.ndarray  # False where no device of the group has 2 samples kept (noise unknown)
    sum_kept: np.ndarray  # sum and sum of squares of the kept samples (absolute units)
    sumsq_kept: np.ndarray
    kept: np.ndarray  # per sample (row): kept, not a transient


def estimate(
    value: np.ndarray,
    *,
    dev: np.ndarray,
    n_dev: int,
    group_of_dev: np.ndarray,
    n_group: int,
    dip_sigmas: float,
    prior_df: float,
) -> Estimates:
    """``value`` of each sample row, ``dev`` its device (or device and scan: 0..n_dev-1),
    ``group_of_dev`` the peer group (0..n_group-1) of each device."""
    med, anchor = groups.quantiles(dev, value, n_dev, (0.5, 0.75))
    g = group_of_dev[dev]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(med[dev] > 0, value / med[dev] - 1, 0.0)  # relative to the device's median
        x = np.where(anchor[dev] > 0, value / anchor[dev], 1.0)  # relative to its anchor
    scale = np.maximum(groups.median(g, np.abs(r), n_group) * 1.4826, 1e-9)
    kept = np.abs(x - 1) <= dip_sigmas * scale[g]
    n = groups.count(dev, n_dev)
    nk = groups.count(dev, n_dev, kept)
    sx = groups.total(dev, x, n_dev, kept)
    sxx = groups.total(dev, x * x, n_dev, kept)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = sx / nk
        ss = np.clip(sxx - nk * mx * mx, 0, None)  # sum of squared deviations, relative units
        dfi = np.maximum(nk - 1, 0).astype(float)
        pooled_df = np.bincount(group_of_dev, weights=dfi, minlength=n_group)
        pooled = np.where(pooled_df > 0, np.bincount(group_of_dev, weights=ss, minlength=n_group) / pooled_df, scale**2)
        s0 = pooled[group_of_dev]
        df = prior_df + dfi
        s2 = np.where(df > 0, (prior_df * s0 + ss) / df, np.nan)
        se_rel = np.sqrt(s2 / nk)
    return Estimates(
        n_samples=n,
        n_kept=nk,
        median=med,
        value=anchor * mx,
        se_rel=se_rel,
        df=np.where(df > 0, df, np.nan),
        noise_rel=np.sqrt(s0),
        noise_known=(pooled_df > 0)[group_of_dev],
        sum_kept=anchor * sx,
        sumsq_kept=anchor * anchor * sxx,
        kept=kept,
    )
