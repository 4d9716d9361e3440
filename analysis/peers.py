"""Compare each device with its peers: same model, probe and settings (and power limit and driver
where known), across every host in the input.

Groups of at least ``min_group`` devices: the healthy centre is the median of the device values,
re-estimated without the devices whose deficit reaches the minimum effect (three passes, each
keeping at least half of the group's devices), so up to 20% slow devices do not drag it down and
mask each other, and every device of the group has a centre to be compared with. Smaller groups
(2-3 devices) are decided leave-one-out, with the larger ``min_effect_few``: each device's
samples against the other devices' samples taken at the same moments (paired by ``sample``: the
devices of a scan are measured in the same windows, so load that slows the whole machine for a
window cancels out), or, without a ``sample`` column, against all their samples (Welch-style).
The paired comparison is the one reported: its ratio, deficit and peer value (value / ratio).
A device alone in its group has no peer verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from . import groups
from .bases import FLEET, HOST, LOO
from .codes import Codes
from .estimate import Estimates


@dataclass(frozen=True)
class PeerVerdict:
    group_size: np.ndarray  # devices in the peer group
    peer_value: np.ndarray  # healthy centre (leave-one-out: the others' mean; paired: value / paired ratio)
    deficit: np.ndarray  # 1 - value / peer_value
    se: np.ndarray  # standard error of the deficit (the device's and the centre's together)
    df: np.ndarray  # its degrees of freedom
    se_fixed: np.ndarray  # the centre's part of se (more samples of the device leave it)
    min_effect: np.ndarray  # the threshold T that applies to the device
    basis: np.ndarray  # bases.HOST / bases.FLEET (+ bases.LOO), "" without peers
    spread: np.ndarray  # robust std of the devices' ratios in the group (measurement noise included)
    spread_net: np.ndarray  # the same net of measurement noise: the healthy silicon spread
    noise: np.ndarray  # typical standard error of one device's ratio in the group
    paired: np.ndarray  # decided on samples paired by index (2-3 devices): peer_value = value / (1 - deficit)


def compare(
    est: Estimates,
    codes: Codes,
    min_group: int,
    min_effect: float,
    min_effect_few: float,
    *,
    row_sample: np.ndarray | None = None,
    row_value: np.ndarray | None = None,
) -> PeerVerdict:
    """``row_sample``, ``row_value``: the sample index and value of each sample row of
    ``codes.row_dev``, for the paired comparison (without them, 2-3 devices are compared on all
    their samples)."""
    group_of_dev, n_group, host_of_dev = codes.group, codes.n_group, codes.host
    n_dev = len(group_of_dev)
    size = np.bincount(group_of_dev, minlength=n_group)[group_of_dev]
    pair, n_pair = groups.factorize(group_of_dev, host_of_dev)
    hosts = np.bincount(group_of_dev[groups.first_index(pair, n_pair)], minlength=n_group)
    basis = np.where(hosts[group_of_dev] > 1, FLEET, HOST).astype(object)

    nan = np.full(n_dev, np.nan)
    peer, se, df, fixed = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    spread, spread_net, noise = nan.copy(), nan.copy(), nan.copy()
    big = size >= min_group
    if big.any():
        (peer[big], se[big], df[big], fixed[big], spread[big], spread_net[big], noise[big]) = _population(
            est, group_of_dev, n_group, big, min_effect
        )
    few = (size >= 2) & ~big
    deficit = nan.copy()
    paired = np.zeros(n_dev, dtype=bool)
    if few.any():
        peer[few], se[few], df[few], fixed[few] = _leave_one_out(est, group_of_dev, n_group, few)
        with np.errstate(invalid="ignore", divide="ignore"):
            deficit[few] = 1 - est.value[few] / peer[few]
        if row_sample is not None and row_value is not None:
            paired, d_pair, se_pair, df_pair = _paired(
                est, group_of_dev, n_group, few, codes.row_dev, row_sample, row_value
            )
            deficit[paired], se[paired], df[paired] = d_pair[paired], se_pair[paired], df_pair[paired]
            fixed[paired] = 0.0  # paired: the others' samples of the same moments, all re-measured
            # The comparison value of the paired test: the device's value over its paired ratio, so
            # that the ratio, the cost and the deficit shown are the one comparison the test decided
            # (the plain means of the samples kept can differ from it, even in sign).
            with np.errstate(invalid="ignore", divide="ignore"):
                peer[paired] = est.value[paired] / (1 - d_pair[paired])
        basis[few] = basis[few] + LOO
    basis[size < 2] = ""
    with np.errstate(invalid="ignore", divide="ignore"):
        deficit = np.where(few, deficit, 1 - est.value / peer)
    return PeerVerdict(
        size,
        peer,
        deficit,
        se,
        df,
        fixed,
        np.where(big, min_effect, min_effect_few),
        basis,
        spread,
        spread_net,
        noise,
        paired,
    )


def _population(est: Estimates, g_all: np.ndarray, n_group: int, sel: np.ndarray, min_effect: float):
    g = g_all[sel]
    value = est.value[sel]
    healthy = np.isfinite(value)
    n_known = groups.count(g, n_group, healthy)
    for _ in range(3):
        centre = groups.median(g, np.where(healthy, value, np.nan), n_group)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = 1 - value / centre[g]
        trimmed = np.abs(d) < max(min_effect, 1e-12)
        # A pass keeps at least half of the group's devices: where most lie beyond T of the centre
        # (a wide or noisy group, 4 CPU cores 5-15% apart), what T trims is the spread, not slow
        # devices, and trimming would leave no centre at all. Such a group keeps its last centre.
        enough = 2 * groups.count(g, n_group, trimmed) >= n_known
        healthy = np.where(enough[g], trimmed, healthy)
    centre = groups.median(g, np.where(healthy, value, np.nan), n_group)
    ratio = value / centre[g]
    known = est.noise_known[sel]
    # The spread from the fast side only (ratios above the centre): slow devices, however many,
    # sit on the other side, so the spread is not inflated by them nor truncated at T.
    up = ratio - 1
    spread = 1.4826 * groups.median(g, np.where(up > 0, up, np.nan), n_group)
    # No device above the centre (healthy devices all equal, as in a replayed or synthetic table):
    # the spread is 0, not unknown.
    none_up = (groups.count(g, n_group, up > 0) == 0) & (groups.count(g, n_group, np.isfinite(up)) > 0)
    spread = np.where(none_up, 0.0, spread)
    n_h = groups.count(g, n_group, healthy)
    with np.errstate(invalid="ignore", divide="ignore"):
        own = est.se_rel[sel] * ratio
        noise = np.sqrt(groups.median(g, np.where(known, own**2, np.nan), n_group))
        spread_net = np.sqrt(np.clip(spread**2 - noise**2, 0, None))  # NaN where noise unknown
        se_centre = 1.2533 * spread / np.sqrt(n_h)  # standard error of a median
        # One sample per device: the sampling noise is unknown, and the spread between the healthy
        # devices stands in for it (the classic outlier test).
        se_dev = np.where(known, own, spread[g])
        se = np.sqrt(se_dev**2 + se_centre[g] ** 2)
        df = np.where(known, est.df[sel], np.maximum(n_h[g] - 1, 1))
    return centre[g], se, df, se_centre[g], spread[g], spread_net[g], noise[g]


def _leave_one_out(est: Estimates, g_all: np.ndarray, n_group: int, sel: np.ndarray):
    g = g_all[sel]
    n = est.n_kept[sel].astype(float)
    s, ss = est.sum_kept[sel], est.sumsq_kept[sel]
    n_o = np.bincount(g, weights=n, minlength=n_group)[g] - n
    s_o = np.bincount(g, weights=s, minlength=n_group)[g] - s
    ss_o = np.bincount(g, weights=ss, minlength=n_group)[g] - ss
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_o = s_o / n_o
        var_o = np.clip(ss_o - n_o * mean_o**2, 0, None) / (n_o - 1) / mean_o**2
        noise2 = est.noise_rel[sel] ** 2
        prior = est.df[sel] - np.maximum(n - 1, 0)  # the prior degrees of freedom
        var_o = np.where(n_o > 1, (prior * noise2 + (n_o - 1) * np.nan_to_num(var_o)) / (prior + n_o - 1), noise2)
        ratio = est.value[sel] / mean_o
        se = np.sqrt((est.se_rel[sel] * ratio) ** 2 + var_o / n_o * ratio**2)
        df = prior + n + n_o - 2
    # Without repeated samples in the group there is no noise to test against: no verdict.
    df = np.where((df > 0) & est.noise_known[sel], df, np.nan)
    return mean_o, se, df, np.sqrt(var_o / n_o) * ratio


def _paired(
    est: Estimates,
    group_of_dev: np.ndarray,
    n_group: int,
    sel: np.ndarray,
    dev: np.ndarray,
    sample: np.ndarray,
    value: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out on samples paired by their index: per kept sample, log(value / mean of the other
    devices' kept values of the same sample); a moderated one-sample t test of their mean.
    Returns (applies, deficit = 1 - exp(mean), its standard error, degrees of freedom) per device."""
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
        se = np.exp(m) * np.sqrt(s2 / n)  # of 1 - exp(m), by the delta method
    applies = sel & (n >= 2) & (pooled_df > 0) & np.isfinite(se) & (se > 0)
    return applies, 1 - np.exp(m), se, df


def node_compare(est: Estimates, codes: Codes, fleet: PeerVerdict, min_group: int) -> tuple[np.ndarray, ...]:
    """Each device against the median of its node-mates in the same peer group (leave-one-out), where
    the group spans several hosts and the host has at least ``min_group`` devices in it: a device
    slow within a fast node. The centre's error comes from the group's spread (a median of a few
    node-mates is a noisy centre). Returns (node centre, deficit, se, df, centre's se); NaN where it
    does not apply."""
    group_of_dev, host_of_dev = codes.group, codes.host
    n = len(group_of_dev)
    nan = np.full(n, np.nan)
    pair, n_pair = groups.factorize(group_of_dev, host_of_dev)
    k = np.bincount(pair, minlength=n_pair)[pair]
    applies = (k >= min_group) & (fleet.basis == FLEET) & np.isfinite(est.value)
    if not applies.any():
        return nan, nan.copy(), nan.copy(), nan.copy(), nan.copy()
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
        se = np.sqrt(se_dev**2 + se_centre**2)
        df = np.where(est.noise_known, est.df, np.maximum(m - 1, 1))

    def only(x):
        return np.where(applies, x, np.nan)

    return only(centre), only(1 - ratio), only(se), only(df), only(se_centre)
