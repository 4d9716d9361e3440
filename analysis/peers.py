"""Compare each device with its peers: same model, probe and settings (and power limit and driver
where known), across every host in the input.

Groups of at least ``min_group`` devices: the healthy centre is the median of the device values,
re-estimated without the devices whose deficit reaches the minimum effect (three passes), so up
to 20% slow devices do not drag it down and mask each other. Smaller groups (2-3 devices) are
decided leave-one-out, with the larger ``min_effect_few``: each device's samples against the
other devices' samples taken at the same moments (paired by ``sample``: the devices of a scan are
measured in the same windows, so load that slows the whole machine for a window cancels out), or,
without a ``sample`` column, against all their samples (Welch-style). A device alone in its group
has no peer verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

from . import groups
from .bases import FLEET, HOST, LOO
from .estimate import Estimates


@dataclass(frozen=True)
class PeerVerdict:
    group_size: np.ndarray  # devices in the peer group
    peer_value: np.ndarray  # healthy centre of the peers (leave-one-out: the others' mean)
    deficit: np.ndarray  # 1 - value / peer_value
    p_value: np.ndarray  # one-sided: the device is not slower than its peers
    min_effect: np.ndarray  # the minimum effect that applies to the device
    basis: np.ndarray  # bases.HOST / bases.FLEET (+ bases.LOO), "" without peers
    spread: np.ndarray  # robust std of the healthy devices' ratios in the group


def compare(est: Estimates, group_of_dev: np.ndarray, n_group: int, host_of_dev: np.ndarray,
            min_group: int, min_effect: float, min_effect_few: float,
            rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> PeerVerdict:
    """``rows``: (device code, sample index, value) per sample, for the paired comparison."""
    n_dev = len(group_of_dev)
    size = np.bincount(group_of_dev, minlength=n_group)[group_of_dev]
    pair, n_pair = groups.factorize(group_of_dev, host_of_dev)
    hosts = np.bincount(group_of_dev[groups.first_index(pair, n_pair)], minlength=n_group)
    basis = np.where(hosts[group_of_dev] > 1, FLEET, HOST).astype(object)

    peer = np.full(n_dev, np.nan)
    p = np.full(n_dev, np.nan)
    spread = np.full(n_dev, np.nan)
    big = size >= min_group
    if big.any():
        peer[big], p[big], spread[big] = _population(est, group_of_dev, n_group, big, min_effect)
    few = (size >= 2) & ~big
    with np.errstate(invalid="ignore", divide="ignore"):
        deficit = np.full(n_dev, np.nan)
    if few.any():
        peer[few], p[few] = _leave_one_out(est, group_of_dev, n_group, few)
        with np.errstate(invalid="ignore", divide="ignore"):
            deficit[few] = 1 - est.value[few] / peer[few]
        if rows is not None:
            paired, d_pair, p_pair = _paired(est, group_of_dev, n_group, few, *rows)
            deficit[paired], p[paired] = d_pair[paired], p_pair[paired]
        basis[few] = basis[few] + LOO
    basis[size < 2] = ""
    with np.errstate(invalid="ignore", divide="ignore"):
        deficit = np.where(few, deficit, 1 - est.value / peer)
    return PeerVerdict(size, peer, deficit, p, np.where(big, min_effect, min_effect_few), basis, spread)


def _population(est: Estimates, g_all: np.ndarray, n_group: int, sel: np.ndarray, min_effect: float):
    g = g_all[sel]
    value = est.value[sel]
    healthy = np.isfinite(value)
    for _ in range(3):
        centre = groups.median(g, np.where(healthy, value, np.nan), n_group)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = 1 - value / centre[g]
        healthy = np.abs(d) < max(min_effect, 1e-12)
    centre = groups.median(g, np.where(healthy, value, np.nan), n_group)
    ratio = value / centre[g]
    dev = np.abs(ratio - groups.median(g, np.where(healthy, ratio, np.nan), n_group)[g])
    spread = 1.4826 * groups.median(g, np.where(healthy, dev, np.nan), n_group)
    n_h = groups.count(g, n_group, healthy)
    known = est.noise_known[sel]
    with np.errstate(invalid="ignore", divide="ignore"):
        se_centre = 1.2533 * spread / np.sqrt(n_h)  # standard error of a median
        # One sample per device: the sampling noise is unknown, and the spread between the healthy
        # devices stands in for it (the classic outlier test).
        se_dev = np.where(known, est.se_rel[sel] * ratio, spread[g])
        se = np.sqrt(se_dev ** 2 + se_centre[g] ** 2)
        t = (1 - ratio) / se
        df = np.where(known, est.df[sel], np.maximum(n_h[g] - 1, 1))
    return centre[g], special.stdtr(df, -t), spread[g]


def _leave_one_out(est: Estimates, g_all: np.ndarray, n_group: int, sel: np.ndarray):
    g = g_all[sel]
    n = est.n_kept[sel].astype(float)
    s, ss = est.sum_kept[sel], est.sumsq_kept[sel]
    n_o = np.bincount(g, weights=n, minlength=n_group)[g] - n
    s_o = np.bincount(g, weights=s, minlength=n_group)[g] - s
    ss_o = np.bincount(g, weights=ss, minlength=n_group)[g] - ss
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_o = s_o / n_o
        var_o = np.clip(ss_o - n_o * mean_o ** 2, 0, None) / (n_o - 1) / mean_o ** 2
        noise2 = est.noise_rel[sel] ** 2
        prior = est.df[sel] - np.maximum(n - 1, 0)  # the prior degrees of freedom
        var_o = np.where(n_o > 1, (prior * noise2 + (n_o - 1) * np.nan_to_num(var_o)) / (prior + n_o - 1),
                         noise2)
        ratio = est.value[sel] / mean_o
        se = np.sqrt((est.se_rel[sel] * ratio) ** 2 + var_o / n_o * ratio ** 2)
        t = (1 - ratio) / se
        df = prior + n + n_o - 2
    # Without repeated samples in the group there is no noise to test against: no verdict.
    df = np.where((df > 0) & est.noise_known[sel], df, np.nan)
    return mean_o, special.stdtr(df, -t)


def _paired(est: Estimates, group_of_dev: np.ndarray, n_group: int, sel: np.ndarray, dev: np.ndarray,
            sample: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out on samples paired by their index: per kept sample, log(value / mean of the other
    devices' kept values of the same sample); a moderated one-sample t test of their mean.
    Returns (applies, deficit = 1 - exp(mean), p) per device."""
    n_dev = len(group_of_dev)
    use = sel[dev] & est.kept & np.isfinite(sample) & (value > 0)
    d, v = dev[use], value[use]
    slot, n_slot = groups.factorize(group_of_dev[d], sample[use])
    n_o = np.bincount(slot, minlength=n_slot)[slot] - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        lr = np.log(v / ((np.bincount(slot, weights=v, minlength=n_slot)[slot] - v) / n_o))
    ok = (n_o > 0) & np.isfinite(lr)
    d, lr = d[ok], lr[ok]
    n = np.bincount(d, minlength=n_dev).astype(float)
    m = np.bincount(d, weights=lr, minlength=n_dev)
    ss = np.bincount(d, weights=lr * lr, minlength=n_dev)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = m / n
        ss = np.clip(ss - n * m * m, 0, None)
        dof = np.maximum(n - 1, 0)
        pooled_df = np.bincount(group_of_dev, weights=dof, minlength=n_group)[group_of_dev]
        pooled = np.bincount(group_of_dev, weights=ss, minlength=n_group)[group_of_dev] / pooled_df
        prior = est.df - np.maximum(est.n_kept - 1, 0)  # the prior degrees of freedom
        df = prior + dof
        s2 = (prior * pooled + ss) / df
        t = m / np.sqrt(s2 / n)
    applies = sel & (n >= 2) & (pooled_df > 0) & np.isfinite(t)
    return applies, 1 - np.exp(m), special.stdtr(df, t)


def node_compare(est: Estimates, group_of_dev: np.ndarray, host_of_dev: np.ndarray, fleet: PeerVerdict,
                 min_group: int, min_effect: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each device against the median of its node-mates in the same peer group (leave-one-out), where
    the group spans several hosts and the host has at least ``min_group`` devices in it: a device
    slow within a fast node. A median of a few node-mates is a noisy centre, and this test comes on
    top of the fleet test, so its null hypothesis is "at most half the minimum effect slower than its
    node-mates" (not "not slower"): with "not slower" it raised the benchmark's FPR from 0.11% to
    0.17% under scan-to-scan noise. Returns (node centre, deficit, p); NaN where it does not apply."""
    n = len(group_of_dev)
    nan = np.full(n, np.nan)
    pair, n_pair = groups.factorize(group_of_dev, host_of_dev)
    k = np.bincount(pair, minlength=n_pair)[pair]
    applies = (k >= min_group) & (fleet.basis == FLEET) & np.isfinite(est.value)
    if not applies.any():
        return nan, nan.copy(), nan.copy()
    value = np.where(np.isfinite(est.value), est.value, np.inf)
    a = np.arcsinh(np.where(np.isfinite(value), value, np.nanmax(est.value)))
    span = a.max() - a.min()
    order = np.argsort(pair + (0.5 * (a - a.min()) / span if span > 0 else 0.0))
    sorted_v = value[order]
    start = (np.cumsum(np.bincount(pair, minlength=n_pair)) - np.bincount(pair, minlength=n_pair))[pair]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    rank -= start
    m = k - 1  # node-mates

    def other(idx):  # the idx-th smallest of the node-mates (the device itself left out)
        j = np.where(idx < rank, idx, idx + 1)
        return sorted_v[np.clip(start + j, 0, n - 1)]

    centre = np.where(m % 2 == 1, other((m - 1) // 2), (other(m // 2 - 1) + other(m // 2)) / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = est.value / centre
        se_centre = 1.2533 * fleet.spread / np.sqrt(m)  # a median of m healthy devices
        se_dev = np.where(est.noise_known, est.se_rel * ratio, fleet.spread)
        t = (1 - ratio - min_effect / 2) / np.sqrt(se_dev ** 2 + se_centre ** 2)
        p = special.stdtr(np.where(est.noise_known, est.df, np.maximum(m - 1, 1)), -t)
    centre = np.where(applies, centre, np.nan)
    return centre, np.where(applies, 1 - ratio, np.nan), np.where(applies, p, np.nan)
