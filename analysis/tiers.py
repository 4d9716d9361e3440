"""Verdict tiers, the ``degraded`` flag, placement classes and the healthy spread of each peer group.

Tiers (``verdict``), one per device and probe:
- ``straggler``: its deficit is above T (``min_effect``) with confidence (BH at ``fdr``), or it is
  ``degraded`` and its deficit against its peers reaches T ("deficit <= T" rejected by BH at ``fdr``
  among the degraded devices). ``straggler`` (the boolean) is this tier.
- ``undecided``: the data neither show the deficit above T nor below it (re-measure; the device
  table gives ``samples_needed`` and ``undecided_reason``); also a device with nothing to compare with.
- ``slow``: clearly under T, but credibly more than ``slow_sigmas`` healthy spreads below its peer
  group's centre (BH at ``fdr``): an outlier of the healthy population. Shown, never drained.
- ``healthy``: the rest.
``degraded`` (own history, relative to its peers): a change point in its per-scan ratio to its peers
(change.py), significant after BH at ``fdr`` over the devices with history, with a loss of at least
``min_change`` since it.
Placement classes (``perf_class``): per peer group of ``min_group`` or more devices, A (the fastest
quarter by estimated ratio) to D (the slowest quarter); ``ratio_low`` / ``ratio_high`` give the
interval of the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import groups
from .bases import HISTORY, JOIN, NONE
from .codes import Codes
from .detect import bh_qvalues, bh_reject, p_above

TIERS = ("straggler", "undecided", "slow", "healthy")
CLASSES = ("A", "B", "C", "D")
# T lies inside a group's normal spread when T is less than this many healthy spreads: more than
# ~0.1% of normal silicon (normal tails) is then beyond T by itself.
SPREAD_WARN_SIGMAS = 3.0


@dataclass(frozen=True)
class Tiers:
    straggler: np.ndarray
    verdict: np.ndarray  # one of TIERS
    degraded: np.ndarray
    basis: np.ndarray
    reason: np.ndarray  # why undecided ("" otherwise)
    perf_class: np.ndarray  # "A".."D", None outside a peer group of min_group+
    change_loss: np.ndarray  # loss since the change point (NaN without history)
    change_rank: np.ndarray  # scan rank of the first scan after the change
    counts: np.ndarray  # devices per tier, in the order of TIERS


def assign(verdict, pv, hv, has_peers: np.ndarray, codes: Codes, config) -> Tiers:
    n = len(has_peers)
    degraded = np.zeros(n, dtype=bool)
    loss = np.full(n, np.nan)
    rank = np.full(n, -1, dtype=np.int64)
    if hv.change is not None:
        q = bh_qvalues(hv.change.p_value)
        with np.errstate(invalid="ignore"):
            degraded = (q <= config.fdr) & (hv.change.loss >= config.min_change)
        loss, rank = hv.change.loss, hv.change_rank
    # Degraded makes a straggler only where its deficit against its peers also reaches T: among the
    # degraded devices (a family its own history selected), "deficit <= T" rejected by BH at fdr.
    # (Rejected per device at clear_level instead, 6 of the benchmark's 14 such stragglers were
    # below T: a false drain.)
    cand = degraded & has_peers & ~verdict.straggler
    by_history = np.zeros(n, dtype=bool)
    if cand.any():
        p = np.full(n, np.nan)
        p[cand] = p_above(pv.deficit[cand], pv.se[cand], pv.df[cand], pv.min_effect[cand])
        by_history = bh_reject(p, config.fdr)
    straggler = verdict.straggler | by_history
    basis = verdict.basis.copy()
    for j in np.flatnonzero(straggler & degraded & has_peers):
        if HISTORY not in str(basis[j]).split(JOIN):
            basis[j] = f"{basis[j]}{JOIN}{HISTORY}"

    slow = _slow(pv, has_peers, config)
    undecided = (verdict.undecided | (verdict.basis == NONE)) & ~straggler
    code = np.full(n, TIERS.index("healthy"), dtype=np.int8)
    code[slow & ~straggler & ~undecided] = TIERS.index("slow")
    code[undecided] = TIERS.index("undecided")
    code[straggler] = TIERS.index("straggler")
    out = np.asarray(TIERS, dtype=object)[code]
    reason = np.where(straggler, "", verdict.reason).astype(object)
    reason[undecided & (verdict.basis == NONE)] = "nothing to compare with (no peers, history or reference)"
    return Tiers(
        straggler,
        out,
        degraded,
        basis,
        reason,
        _classes(pv, codes.group, codes.n_group, config),
        loss,
        rank,
        np.bincount(code, minlength=len(TIERS)),
    )


def _slow(pv, has_peers: np.ndarray, config) -> np.ndarray:
    """Credibly more than ``slow_sigmas`` healthy spreads below the centre: "deficit <= S" rejected
    by BH at ``fdr`` over every device with a spread. Only a deficit above S can be rejected (its p is
    below 1/2), so the t distribution is evaluated there alone; the others count in the family."""
    with np.errstate(invalid="ignore"):
        slow_at = config.slow_sigmas * pv.spread_net
        family = np.isfinite(slow_at) & has_peers & np.isfinite(pv.deficit)
        maybe = family & (pv.deficit > slow_at)
    p = np.where(family, 1.0, np.nan)
    if maybe.any():
        p[maybe] = p_above(pv.deficit[maybe], pv.se[maybe], pv.df[maybe], slow_at[maybe])
    return bh_reject(p, config.fdr)


def _classes(pv, group: np.ndarray, n_group: int, config) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = 1 - pv.deficit
    ok = (pv.group_size >= config.min_group) & np.isfinite(ratio)
    out = np.full(len(ratio), None, dtype=object)
    if not ok.any():
        return out
    q25, q50, q75 = groups.quantiles(group[ok], ratio[ok], n_group, (0.25, 0.5, 0.75))
    g = group[ok]
    r = ratio[ok]
    idx = np.select([r >= q75[g], r >= q50[g], r >= q25[g]], [0, 1, 2], 3)
    out[ok] = np.asarray(CLASSES, dtype=object)[idx]
    return out


def group_spread(pv, codes: Codes, labels: list[dict], config) -> dict:
    """Per peer group of ``min_group``+ devices: its robust spread, net of measurement noise, and the
    measurement noise; a warning line for each group whose normal spread reaches T."""
    at = groups.first_index(codes.group, codes.n_group)
    out, warnings = [], []
    for g in np.flatnonzero(pv.group_size[at] >= config.min_group):
        i = at[g]
        if not np.isfinite(pv.spread[i]):
            continue
        net = pv.spread_net[i]
        entry = {
            **labels[g],
            "devices": int(pv.group_size[i]),
            "spread": _r(pv.spread[i]),
            "spread_net": _r(net),
            "noise": _r(pv.noise[i]),
        }
        out.append(entry)
        if np.isfinite(net) and net * SPREAD_WARN_SIGMAS > config.min_effect:
            name = "|".join(str(labels[g][k]) for k in ("model", "probe", "settings") if labels[g][k])
            warnings.append(
                f"min_effect {config.min_effect:.1%} lies inside the normal spread of {name} "
                f"(healthy spread {net:.2%}; {SPREAD_WARN_SIGMAS:g} spreads = "
                f"{SPREAD_WARN_SIGMAS * net:.1%}): normal silicon is flagged; raise min_effect"
            )
    return {"groups": out, "warnings": warnings}


def _r(x: float) -> float | None:
    return round(float(x), 6) if np.isfinite(x) else None
