"""The verdict, decided relative to the threshold T (``min_effect``), not relative to zero.

Each test of a device (peers, node-mates, own history, reference) gives a deficit estimate with its
standard error. A device is a straggler when a test rejects "deficit <= T" after Benjamini-Hochberg
over every test of every device and probe analysed together, at false-discovery rate ``fdr``. It is
clearly not one when its primary test rejects "deficit >= T" at ``clear_level``; between the two it
is ``undecided``, with the number of further samples that would decide it (the standard error
falls as 1/sqrt(samples); NaN where more samples of the device cannot decide it because the error
of its comparison value alone is too large).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

from .bases import JOIN, NONE


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN stays NaN and does not count as a test."""
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adj = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(adj[::-1])[::-1], 1.0)
    return q


def bh_cutoff(p: np.ndarray, q: np.ndarray, fdr: float) -> float:
    """The largest p-value rejected at ``fdr`` (BH), or the first step's cutoff when none is."""
    hit = q <= fdr
    if hit.any():
        return float(np.nanmax(np.where(hit, p, np.nan)))
    m = int(np.isfinite(p).sum())
    return fdr / max(m, 1)


def p_above(deficit, se, df, threshold):
    """One-sided p of "deficit <= threshold" (Student t with ``df``; inf df: normal)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return special.stdtr(df, -(deficit - threshold) / se)


@dataclass(frozen=True)
class Test:
    basis: np.ndarray  # per device: name of the basis ("" where the test does not apply)
    deficit: np.ndarray
    se: np.ndarray  # standard error of the deficit (device error and comparison error together)
    df: np.ndarray  # degrees of freedom of se (inf: normal)
    min_effect: np.ndarray  # the threshold T that applies to the device
    se_fixed: np.ndarray | None = None  # the part of se that more samples of the device do not shrink

    def p_value(self) -> np.ndarray:
        return p_above(self.deficit, self.se, self.df, self.min_effect)


@dataclass(frozen=True)
class Verdict:
    straggler: np.ndarray
    basis: np.ndarray  # the firing bases joined by "+", or the primary basis, or "none"
    fired: np.ndarray  # (test, device): True where that test flags the device
    deficit: np.ndarray
    p_value: np.ndarray  # of "deficit <= T" for the basis reported
    q_value: np.ndarray
    below: np.ndarray  # the primary test shows the deficit is below T
    undecided: np.ndarray  # neither above nor below T with confidence (and a test applies)
    samples_needed: np.ndarray  # further samples that would decide an undecided device (NaN: none)
    reason: np.ndarray  # why undecided ("" otherwise)


def decide(tests: list[Test], fdr: float, clear_level: float, n_samples: np.ndarray,
           allowed: np.ndarray | None = None) -> Verdict:
    """``tests`` in order of preference (the first that applies is a device's primary basis).
    ``allowed[i]``: False where test i may not make a device a straggler alone (it still counts in
    the BH family and is reported). ``n_samples``: samples behind each device's estimate."""
    n = len(tests[0].deficit)
    p_tests = np.stack([np.where(t.basis != "", t.p_value(), np.nan) for t in tests])
    q_all = bh_qvalues(p_tests.ravel()).reshape(len(tests), n)
    fire = np.zeros((len(tests), n), dtype=bool)
    for i, t in enumerate(tests):
        with np.errstate(invalid="ignore"):
            fire[i] = (q_all[i] <= fdr) & (t.basis != "")
        if allowed is not None and not allowed[i]:
            fire[i] = False
    straggler = fire.any(axis=0)

    basis = np.full(n, NONE, dtype=object)
    pick = np.full(n, -1)
    primary = np.full(n, -1)
    best = np.where(fire, q_all, np.inf).argmin(axis=0)
    for i, t in enumerate(tests):
        applies = t.basis != ""
        primary = np.where((primary < 0) & applies, i, primary)
        take = ((straggler & (best == i)) | (~straggler & applies)) & (pick < 0)
        pick[take] = i
    idx = np.arange(n)
    has = pick >= 0
    stack = {k: np.stack([getattr(t, k) for t in tests]) for k in ("deficit", "se", "df", "min_effect")}
    fixed = np.stack([t.se_fixed if t.se_fixed is not None else np.zeros(n) for t in tests])
    bases = np.stack([t.basis for t in tests])
    basis[has] = bases[pick[has], idx[has]]
    deficit, p, q = (np.where(has, a[np.maximum(pick, 0), idx], np.nan)
                     for a in (stack["deficit"], p_tests, q_all))
    for j in np.flatnonzero(fire.sum(axis=0) > 1):  # several bases agree: name them all
        basis[j] = JOIN.join(t.basis[j] for i, t in enumerate(tests) if fire[i, j])

    # Below T: the primary test (the device against its typical peer) rejects "deficit >= T".
    pr = np.maximum(primary, 0)
    d, se, df, thr, se_c = (a[pr, idx] for a in (*(stack[k] for k in ("deficit", "se", "df", "min_effect")), fixed))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_below = special.stdtr(df, (d - thr) / se)
    below = (primary >= 0) & (p_below <= clear_level) & ~straggler
    undecided = (primary >= 0) & ~below & ~straggler
    # Samples needed: the device's own error must fall to the margin |d - T| / z (less the fixed part).
    cut = bh_cutoff(p_tests.ravel(), q_all.ravel(), fdr)
    with np.errstate(invalid="ignore"):  # the t quantile at today's degrees of freedom (conservative)
        z = np.where(d > thr, special.stdtrit(df, 1 - cut), special.stdtrit(df, 1 - clear_level))
    with np.errstate(invalid="ignore", divide="ignore"):
        own2 = np.clip(se ** 2 - se_c ** 2, 0, None)
        room = (np.abs(d - thr) / z) ** 2 - se_c ** 2
        need = np.ceil(n_samples * own2 / room) - n_samples
    reachable = undecided & (room > 0) & np.isfinite(need) & (own2 > 0)
    samples_needed = np.where(reachable, np.maximum(need, 1), np.nan)
    reason = np.full(n, "", dtype=object)
    reason[undecided] = "near the threshold"
    reason[undecided & ~reachable] = "comparison too uncertain to decide at the threshold"
    return Verdict(straggler, basis, fire, deficit, p, q, below, undecided, samples_needed, reason)
