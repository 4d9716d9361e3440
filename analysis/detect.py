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
    # any sort: tied p-values get one q-value whatever their order (the running minimum from the
    # end reaches each of them through the tie's last rank), and quicksort is 0.04 s faster here
    order = ok[np.argsort(p[ok])]
    m = len(order)
    adj = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(adj[::-1])[::-1], 1.0)
    return q


def bh_reject(p: np.ndarray, fdr: float) -> np.ndarray:
    """True where Benjamini-Hochberg rejects at ``fdr`` (NaN is no test). Sorts only the p-values
    that could be rejected (at most ``fdr``), so a large family with few small p costs little."""
    out = np.zeros(p.shape, dtype=bool)
    m = int(np.isfinite(p).sum())
    with np.errstate(invalid="ignore"):
        small = np.flatnonzero(p <= fdr)
    if len(small) == 0:
        return out
    ps = np.sort(p[small])
    ok = np.flatnonzero(ps <= fdr * np.arange(1, len(ps) + 1) / m)
    if len(ok):
        out[small[p[small] <= ps[ok[-1]]]] = True
    return out


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


def decide(
    tests: list[Test], fdr: float, clear_level: float, n_samples: np.ndarray, allowed: np.ndarray | None = None
) -> Verdict:
    """``tests`` in order of preference (the first that applies is a device's primary basis).
    ``allowed[i]``: False where test i may not make a device a straggler alone (it still counts in
    the BH family and is reported). ``n_samples``: samples behind each device's estimate."""
    n = len(tests[0].deficit)
    applies = [t.basis != "" for t in tests]
    p_tests = np.full((len(tests), n), np.nan)
    for i, t in enumerate(tests):  # the t distribution only where the test applies (it is costly)
        if applies[i].all():
            p_tests[i] = t.p_value()
        elif applies[i].any():
            a = applies[i]
            p_tests[i, a] = p_above(t.deficit[a], t.se[a], t.df[a], t.min_effect[a])
    q_all = bh_qvalues(p_tests.ravel()).reshape(len(tests), n)
    fire = np.zeros((len(tests), n), dtype=bool)
    for i in range(len(tests)):
        with np.errstate(invalid="ignore"):
            fire[i] = (q_all[i] <= fdr) & applies[i]
        if allowed is not None and not allowed[i]:
            fire[i] = False
    straggler = fire.any(axis=0)

    basis = np.full(n, NONE, dtype=object)
    pick = np.full(n, -1)
    primary = np.full(n, -1)
    best = np.where(fire, q_all, np.inf).argmin(axis=0)
    for i in range(len(tests)):
        primary[(primary < 0) & applies[i]] = i
        take = ((straggler & (best == i)) | (~straggler & applies[i])) & (pick < 0)
        pick[take] = i
    idx = np.arange(n)
    deficit, se, df, thr, se_c = (np.full(n, np.nan) for _ in range(5))
    p, q = np.full(n, np.nan), np.full(n, np.nan)
    for i, t in enumerate(tests):
        take = pick == i
        if take.any():
            basis[take] = t.basis[take]
            deficit[take] = t.deficit[take]
            p[take], q[take] = p_tests[i, take], q_all[i, take]
        first = primary == i  # the primary test's numbers, for "below T" and the samples needed
        if first.any():
            se[first], df[first], thr[first] = t.se[first], t.df[first], t.min_effect[first]
            se_c[first] = t.se_fixed[first] if t.se_fixed is not None else 0.0
    for j in np.flatnonzero(fire.sum(axis=0) > 1):  # several bases agree: name them all
        basis[j] = JOIN.join(t.basis[j] for i, t in enumerate(tests) if fire[i, j])

    # Below T: the primary test (the device against its typical peer) rejects "deficit >= T",
    # i.e. p("deficit >= T") = 1 - p("deficit <= T") <= clear_level.
    pr = np.maximum(primary, 0)
    d = np.stack([t.deficit for t in tests])[pr, idx]
    p_primary = p_tests[pr, idx]
    with np.errstate(invalid="ignore"):
        below = (primary >= 0) & (1 - p_primary <= clear_level) & ~straggler
    undecided = (primary >= 0) & ~below & ~straggler
    # Samples needed: the device's own error must fall to the margin |d - T| / t (less the fixed part).
    cut = bh_cutoff(p_tests.ravel(), q_all.ravel(), fdr)
    samples_needed = np.full(n, np.nan)
    reachable = np.zeros(n, dtype=bool)
    u = np.flatnonzero(undecided)
    if len(u):
        with np.errstate(invalid="ignore", divide="ignore"):  # the t quantile at today's df (conservative)
            z = np.where(d[u] > thr[u], special.stdtrit(df[u], 1 - cut), special.stdtrit(df[u], 1 - clear_level))
            own2 = np.clip(se[u] ** 2 - se_c[u] ** 2, 0, None)
            room = (np.abs(d[u] - thr[u]) / z) ** 2 - se_c[u] ** 2
            need = np.ceil(n_samples[u] * own2 / room) - n_samples[u]
        ok = (room > 0) & np.isfinite(need) & (own2 > 0)
        reachable[u] = ok
        samples_needed[u[ok]] = np.maximum(need[ok], 1)
    reason = np.full(n, "", dtype=object)
    reason[undecided] = "near the threshold"
    reason[undecided & ~reachable] = "comparison too uncertain to decide at the threshold"
    return Verdict(np.asarray(straggler), basis, fire, deficit, p, q, below, undecided, samples_needed, reason)
