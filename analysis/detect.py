"""The verdict: a device is a straggler when one of its tests (peers, own history, reference) shows
a deficit of at least the minimum effect AND is significant after Benjamini-Hochberg over every
test of every device and probe analysed together, at false-discovery rate ``fdr``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class Test:
    basis: np.ndarray  # per device: name of the basis ("" where the test does not apply)
    deficit: np.ndarray
    p_value: np.ndarray
    min_effect: np.ndarray


@dataclass(frozen=True)
class Verdict:
    straggler: np.ndarray
    basis: np.ndarray  # the firing bases joined by "+", or the primary basis, or "none"
    fired: np.ndarray  # (test, device): True where that test flags the device
    deficit: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray


def decide(tests: list[Test], fdr: float) -> Verdict:
    """``tests`` in order of preference (the first that applies is a device's primary basis)."""
    n = len(tests[0].deficit)
    p_all = np.concatenate([np.where(t.basis != "", t.p_value, np.nan) for t in tests])
    q_all = bh_qvalues(p_all).reshape(len(tests), n)
    fire = np.zeros((len(tests), n), dtype=bool)
    for i, t in enumerate(tests):
        with np.errstate(invalid="ignore"):
            fire[i] = (q_all[i] <= fdr) & (t.deficit >= t.min_effect) & (t.basis != "")
    straggler = fire.any(axis=0)

    basis = np.full(n, NONE, dtype=object)
    deficit = np.full(n, np.nan)
    p = np.full(n, np.nan)
    q = np.full(n, np.nan)
    chosen = np.zeros(n, dtype=bool)
    # Primary basis: the firing test with the smallest q for stragglers, else the first that applies.
    best = np.where(fire, q_all, np.inf).argmin(axis=0)
    for i, t in enumerate(tests):
        take = ((straggler & (best == i)) | (~straggler & (t.basis != ""))) & ~chosen
        basis[take], deficit[take] = t.basis[take], t.deficit[take]
        p[take], q[take] = t.p_value[take], q_all[i][take]
        chosen |= take
    for j in np.flatnonzero(fire.sum(axis=0) > 1):  # several bases agree: name them all
        basis[j] = JOIN.join(t.basis[j] for i, t in enumerate(tests) if fire[i, j])
    return Verdict(straggler, basis, fire, deficit, p, q)
