"""What a straggler costs. A synchronous step waits for its slowest device, so a device at rate r
among peers at rate R slows every job it joins by R / r - 1. For the fleet: the expected step time
of a job of N distinct devices drawn at random from a peer group is the expected maximum of their N
relative step times (exact order statistics of drawing N of the group's devices without replacement:
a job of 8 on an 8-device host always includes its straggler); leaving the flagged devices out
shortens it by the ratio reported here."""

from __future__ import annotations

import math

import numpy as np
from scipy import special


def device_cost(value: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """reference / value - 1, at least 0; NaN where unknown."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(reference / value - 1, 0, None)


def expected_max(step: np.ndarray, sizes, presorted: bool = False) -> list[float]:
    """E[max of n distinct devices' step times] for each n in ``sizes``: a job takes n of the m
    devices (without replacement), so P(max = t_i) = C(i-1, n-1) / C(m, n) for the sorted t_1..t_m.
    NaN where n > m (no job of n distinct devices there)."""
    t = step[np.isfinite(step)]
    t = t if presorted else np.sort(t)
    m = len(t)
    out = []
    for n in sizes:
        if m == 0 or not 1 <= n <= m:
            out.append(float("nan"))
            continue
        i = np.arange(n, m + 1, dtype=float)  # the largest of the n can only be t_n .. t_m
        log_choose_m_n = special.gammaln(m + 1) - special.gammaln(n + 1) - special.gammaln(m - n + 1)
        log_w = special.gammaln(i) - special.gammaln(n) - special.gammaln(i - n + 1) - log_choose_m_n
        # einsum, not np.dot: a BLAS dot of 100,000 values took 15-30 ms on a loaded 2-core machine
        # (its threads wait for cores), einsum 0.1 ms.
        out.append(float(np.einsum("i,i->", t[n - 1 :], np.exp(log_w))))
    return out


def job_gain(
    step: np.ndarray, flagged: np.ndarray, group: np.ndarray, n_group: int, labels: list[dict], sizes: tuple[int, ...]
) -> list[dict]:
    """Per peer group with at least one straggler, per job size N no larger than the group: the
    expected step time (relative to the group's healthy centre) with every device and without the
    flagged ones, and the speed-up from leaving them out. None where unknown: fewer than N devices
    left without the flagged ones (an 8-device job on an 8-device host has no choice), or no peers
    (no step time)."""
    out = []
    hit = np.bincount(group, weights=flagged, minlength=n_group) > 0
    size = np.bincount(group, minlength=n_group)
    for g in np.flatnonzero(hit):
        sel = group == g
        fit = [n for n in sizes if n <= size[g]]
        order = np.argsort(step[sel])  # one sort serves both distributions
        t, bad = step[sel][order], flagged[sel][order]
        for n, with_all, without in zip(fit, expected_max(t, fit, True), expected_max(t[~bad], fit, True)):
            # Fewer than n devices left without the flagged ones (or no step time known).
            known = math.isfinite(with_all) and math.isfinite(without) and without > 0
            out.append(
                {
                    **labels[g],
                    "job_devices": int(n),
                    "step_time_all": _round(with_all),
                    "step_time_without_stragglers": _round(without),
                    "speedup": round(with_all / without - 1, 5) if known else None,
                }
            )
    return out


def _round(x: float) -> float | None:
    """Rounded for the JSON document; None where unknown (JSON has no NaN)."""
    return round(x, 5) if math.isfinite(x) else None
